"""Record the server's view of a run: every message it received and sent.

The attack harness reads these files, so privacy is measured on what the
server really observed rather than on a separate simulation. Layout::

    transcript/index.jsonl          one JSON line per message: step, kind, file, bytes
    transcript/000003_logits_out.bin  the exact payload
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from splitfl.artifacts import _atomic, write_bytes
from splitfl.tensors import tensor_to_bytes


class TranscriptRecorder:
    """Writes payloads for the first ``max_steps`` training steps."""

    def __init__(self, folder: str | Path, max_steps: int, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_steps = max_steps
        self.step = 0
        self._index = self.folder / "index.jsonl"
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            meta_path.write_text(json.dumps(meta, indent=2))
        if self._index.exists():  # resumed run: continue after the recorded steps
            lines = self._index.read_text().splitlines()
            self.step = 1 + max((json.loads(l)["step"] for l in lines), default=-1)

    @property
    def active(self) -> bool:
        return self.step < self.max_steps

    def record(self, kind: str, payload: bytes) -> None:
        if not self.active:
            return
        # A step can carry several messages of one kind (a Poisson batch larger than the packed capacity travels
        # in parts): each gets its own file, in order, so none overwrites another.
        name = f"{self.step:06d}_{kind}.bin"
        part = 1
        while (self.folder / name).exists():
            name = f"{self.step:06d}_{kind}.{part}.bin"
            part += 1

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(payload)

        _atomic(self.folder / name, write)
        with open(self._index, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, "kind": kind, "file": name, "bytes": len(payload)}) + "\n")

    def next_step(self) -> None:
        self.step += 1


class RelayRecorder:
    """Record what each hospital receives from the one before it: the relayed encoder's trainable weights.

    In sequential split learning the encoder travels hospital to hospital, so the
    next hospital can subtract the version it last held from the one it receives
    and read the other hospitals' encoder updates. The server never sees these
    messages; the attack harness reads them as a curious fellow hospital would
    (:mod:`attacks.fellow_inversion`). Layout::

        relay/initial.bin       flat trainable encoder weights before the first step (public initial weights)
        relay/000003.bin        the weights sent on after step 3
        relay/index.jsonl       {"step", "site" (the sender), "lr", "file"} per recorded step
    """

    def __init__(self, folder: str | Path, initial: "torch.Tensor") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index = self.folder / "index.jsonl"
        if not (self.folder / "initial.bin").exists():  # a resumed run keeps the first run's initial weights
            write_bytes(self.folder / "initial.bin", tensor_to_bytes(initial), 0o644)

    def record(self, step: int, site: int, lr: float, weights: "torch.Tensor") -> None:
        name = f"{step:06d}.bin"
        write_bytes(self.folder / name, tensor_to_bytes(weights), 0o644)
        with open(self._index, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "site": int(site), "lr": float(lr), "file": name}) + "\n")
