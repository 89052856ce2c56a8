"""Real server and hospital processes for the gRPC tests: started with splitfl.net.launch's commands (what
`splitfl simulate` runs), on 127.0.0.1 with mutual TLS, one log file each under ROOT/logs/."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path


def history(out: Path) -> list[dict[str, str]]:
    """The rows of OUT/history.csv (written after each epoch's checkpoint); [] before the first."""
    path = out / "history.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def wait_for(pred, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def kill(p: subprocess.Popen) -> None:
    """SIGKILL the process (and its process group: `start` opens a new session for each)."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


class Federation:
    """Server and site processes started with splitfl.net.launch's commands (what `splitfl simulate` runs)."""

    def __init__(self, cfg, root: Path, round_timeout: float = 60.0) -> None:
        from splitfl.net.launch import free_port, prepare

        self.cfg, self.root, self.round_timeout = cfg, root, round_timeout
        self.pki, self.config = prepare(cfg, root, cfg.data.partition.num_sites)
        self.address = f"127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}

    def start_server(self, join_timeout: float | None = None) -> None:
        """The server, from its own folder of the PKI (pki/server) alone."""
        from splitfl.net.launch import server_command, start

        cmd = server_command(self.config, self.root / "server", self.pki / "server", self.address, False, self.round_timeout)
        if join_timeout is not None:
            cmd += ["--join-timeout", str(join_timeout)]
        self.procs["server"] = start(cmd, self.root / "logs" / "server.log")

    def start_site(self, i: int) -> None:
        """Hospital ``i``, from its own folder of the PKI (pki/sites/site-i) alone."""
        from splitfl.net.launch import site_command, start

        cmd = site_command(self.config, i, self.address, self.pki / "sites" / f"site-{i}", self.root / "sites" / f"site-{i}", False)
        self.procs[f"site-{i}"] = start(cmd, self.root / "logs" / f"site-{i}.log")

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def history(self) -> list[dict[str, str]]:
        return history(self.root / "server")

    def wait_server(self, timeout: float = 240) -> dict:
        try:
            self.procs["server"].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("server did not finish:\n" + self.log("server")[-3000:]) from None
        assert self.procs["server"].returncode == 0, self.log("server")[-3000:]
        return json.loads((self.root / "server" / "metrics.json").read_text())

    def close(self) -> None:
        for p in self.procs.values():
            kill(p)
