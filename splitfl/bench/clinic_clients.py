"""Lightweight hospitals for the clinic load benchmark: many per process, no torch, the real wire clients.

``python -m splitfl.bench.clinic_clients SPEC.json OUT.json`` runs the hospitals listed in the spec (written by
:mod:`splitfl.bench.clinic_load`) as threads, each with its own channel, mutual-TLS certificate and token, so
the server sees one connection per hospital. They speak through the very client code real hospitals use
(:class:`~splitfl.net.split.client.SplitClient`, :class:`~splitfl.net.fed.client.FedClient`) and replay
ciphertext messages made before the run by the real encryption code, so the process does no CKKS work and
imports neither torch nor TenSEAL: what is measured is the server. Each hospital records its calls' latencies
and any error (with its traceback); the process writes them to OUT.json.

* ``split``: the split-he loop of :func:`splitfl.net.split.hospital.run_split_site` with a frozen encoder:
  GetTurn long-polls; on its turn ``Forward`` (enc(activations)) and ``ApplyUpdate`` (the head's update);
  ``EndEpoch`` when its batches are done; on ``EVALUATE`` the evaluation's ``Forward`` calls (train=False)
  and ``ReportEval`` with metrics computed beforehand.
* ``fed``: the FedAvg+HE loop of :class:`splitfl.net.fed.hospital.FedSiteClient`: Join, GetRound,
  ``DownloadModel`` and ``SubmitUpdate`` (float32 part + CKKS part) when sampled, and, for the site asked to,
  ``DownloadModel`` (ENCRYPTED_AGGREGATE) and the decrypted mean, computed beforehand.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import grpc

from splitfl.net.fed.client import FedClient
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.split.client import SplitClient, site_channel

# one TCP connection (and TLS session) per hospital, as separate hospitals would have, not one shared subchannel
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


class _Log:
    """One hospital's record: call latencies (ms) by kind, client-side step latencies, errors."""

    def __init__(self, site: int) -> None:
        self.site = site
        self.calls: dict[str, list[float]] = {}
        self.steps: list[dict[str, float]] = []
        self.errors: list[str] = []
        self.bytes_up = self.bytes_down = 0

    def call(self, kind: str, t0: float) -> None:
        self.calls.setdefault(kind, []).append(_ms(t0))

    def as_dict(self) -> dict[str, Any]:
        return {"site": self.site, "calls": self.calls, "steps": self.steps, "errors": self.errors,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


def _read(spec: dict[str, Any], key: str) -> bytes:
    return Path(spec["messages"][key]).read_bytes()


def _channel(spec: dict[str, Any], site: int) -> grpc.Channel:
    ch = site_channel(spec["address"], site, spec["pki"], False, CHANNEL_OPTIONS)
    grpc.channel_ready_future(ch).result(timeout=spec["connect_timeout_s"])
    return ch


def split_hospital(spec: dict[str, Any], site: int, msgs: dict[str, bytes], log: _Log) -> None:
    """One split-he hospital (frozen encoder): its turns, its epoch's end, evaluations when asked."""
    ch = _channel(spec, site)
    try:
        c = SplitClient(ch, site, spec["run_id"], bytes.fromhex(spec["fingerprint"]))
        ctx_fp = bytes.fromhex(spec["context_fingerprint"])
        t0 = time.perf_counter()
        r = c.connect(spec["feature_dim"], ctx_fp)
        log.call("Hello", t0)
        if r.context_needed and site == spec["context_uploader"]:
            t0 = time.perf_counter()
            c.upload_context(msgs["context"], ctx_fp)
            log.call("UploadContext", t0)
            log.bytes_up += len(msgs["context"])
        rounds, poll = spec["rounds"], spec["poll_ms"]
        epoch, left, ended = 0, rounds, False
        while True:
            t0 = time.perf_counter()
            r = c.get_turn(epoch, left, poll)
            log.call("GetTurn", t0)
            if r.state == pb.TURN_STATE_RUN_DONE:
                return
            if r.state == pb.TURN_STATE_EVALUATE:
                for _ in range(spec["eval_batches"]):
                    t0 = time.perf_counter()
                    c.forward(msgs["forward"], train=False)
                    log.call("Forward(eval)", t0)
                c.report_eval(r.eval_id, spec["eval_metrics"])
                continue
            if r.state == pb.TURN_STATE_WAIT and r.epoch > epoch:
                epoch, left, ended = int(r.epoch), rounds, False
                continue
            if r.state == pb.TURN_STATE_YOURS:
                t_step = time.perf_counter()
                c.begin_step(r.step)
                t0 = time.perf_counter()
                reply = c.forward(msgs["forward"])
                log.call("Forward", t0)
                t0 = time.perf_counter()
                c.apply_update(msgs["update"])
                log.call("ApplyUpdate", t0)
                left -= 1
                log.steps.append({"step": int(r.step), "epoch": epoch, "client_step_ms": _ms(t_step),
                                  "end_unix": time.time()})
                log.bytes_up += len(msgs["forward"]) + len(msgs["update"])
                log.bytes_down += len(reply)
                continue
            if r.state == pb.TURN_STATE_EPOCH_DONE and not ended:
                t0 = time.perf_counter()
                samples = rounds * spec["batch"]
                c.end_epoch_remote(epoch, 0.69 * samples, samples)
                log.call("EndEpoch", t0)
                ended = True
                continue
            time.sleep(min(r.retry_after_ms, 200) / 1000 if r.state == pb.TURN_STATE_WAIT else 0.05)
    finally:
        ch.close()


def fed_hospital(spec: dict[str, Any], site: int, msgs: dict[str, bytes], log: _Log) -> None:
    """One FedAvg+HE site: joins, submits its replayed encrypted update when sampled, decrypts when asked."""
    enc = Path(spec["site_messages"]["enc"].format(site=site)).read_bytes()  # this site's own encryption
    ch = _channel(spec, site)
    try:
        c = FedClient(ch, site, spec["run_id"], bytes.fromhex(spec["fingerprint"]))
        t0 = time.perf_counter()
        c.open_session(spec["sample_count"], bytes.fromhex(spec["context_fingerprint"]))
        log.call("Join", t0)
        next_round = 0
        while True:
            t0 = time.perf_counter()
            info = c.get_round(next_round, spec["poll_ms"])
            log.call("GetRound", t0)
            if info.state == pb.ROUND_STATE_FINISHED:
                return
            if info.decrypt_aggregate:
                t0 = time.perf_counter()
                summed = c.download(info.round, pb.MODEL_PART_ENCRYPTED_AGGREGATE)
                log.call("DownloadModel(aggregate)", t0)
                meta = pb.UpdateMeta(round=info.round, sample_count=spec["sample_count"] * spec["num_sites"])
                t0 = time.perf_counter()
                c.submit(meta, [(pb.UPDATE_ENCODING_DECRYPTED_MEAN, msgs["mean"])])
                log.call("SubmitUpdate(mean)", t0)
                log.bytes_down += len(summed)
                log.bytes_up += len(msgs["mean"])
                log.steps.append({"round": int(info.round), "decrypted_unix": time.time()})
                continue
            if info.state != pb.ROUND_STATE_TRAINING or info.round < next_round:
                continue
            if info.sampled:
                t_round = time.time()
                t0 = time.perf_counter()
                model = c.download(info.round, pb.MODEL_PART_GLOBAL_MODEL)
                log.call("DownloadModel", t0)
                meta = pb.UpdateMeta(round=info.round, sample_count=spec["sample_count"], train_loss=0.69)
                t0 = time.perf_counter()
                resp = c.submit(meta, [(pb.UPDATE_ENCODING_FLOAT32, msgs["plain"]), (pb.UPDATE_ENCODING_CKKS, enc)])
                log.call("SubmitUpdate", t0)
                if not resp.accepted:
                    log.errors.append(f"round {info.round}: update refused: {resp.reason}")
                log.bytes_down += len(model)
                log.bytes_up += len(msgs["plain"]) + len(enc)
                log.steps.append({"round": int(info.round), "sampled_unix": t_round, "submitted_unix": time.time()})
            next_round = info.round + 1
    finally:
        ch.close()


def run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every hospital of the spec as a thread, started ``stagger_s`` apart; their records."""
    msgs = {k: _read(spec, k) for k in spec["messages"]}
    body = split_hospital if spec["mode"] == "split" else fed_hospital
    logs = [_Log(site) for site in spec["sites"]]

    def one(log: _Log) -> None:
        try:
            body(spec, log.site, msgs, log)
        except Exception as e:  # noqa: BLE001  (every failure is a result: counted and shown, never hidden)
            log.errors.append(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")

    threads = [threading.Thread(target=one, args=(log,), name=f"site-{log.site}", daemon=True) for log in logs]
    for t in threads:
        t.start()
        time.sleep(spec["stagger_s"])
    deadline = time.monotonic() + spec["timeout_s"]
    for t, log in zip(threads, logs):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            log.errors.append(f"site-{log.site}: still running after {spec['timeout_s']:.0f} s")
    return [log.as_dict() for log in logs]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m splitfl.bench.clinic_clients SPEC.json OUT.json")
    spec = json.loads(Path(args[0]).read_text())
    out = {"hospitals": run(spec), "torch_loaded": "torch" in sys.modules, "tenseal_loaded": "tenseal" in sys.modules}
    Path(args[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
