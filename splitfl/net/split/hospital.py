"""A hospital of a split run: the stub :class:`RemoteSplitServer` and the loop of :func:`run_split_site`.

:class:`RemoteSplitServer` is the hospital's view of the remote head, with the methods the transports call
(``forward``, ``backward``, ``predict``, ``apply_update``, ``end_epoch``, ``layers``, ``he``, ``he_mlp``, and in
split-he-full FullSplitServer's refresh and release), so a :class:`~splitfl.split.runner.SplitRunner` built
with ``server_factory=client.bind`` runs the very same hospital code as in process. :func:`run_split_site`
connects (and reconnects when the server goes away), asks for turns, runs its steps, seals and relays the
hospitals' shared state, evaluates or (split-he-full) releases the head when asked, and keeps its place in the
epoch in ``<out>/split_position.json``. The hospital holds the data, labels, encoder and keys, and imports
nothing of the server's side: all it knows of the server is the wire (:mod:`~splitfl.net.split.common`).
"""
from __future__ import annotations

import copy
import io
import json
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import grpc
import torch

from splitfl.artifacts import save_checkpoint, write_bytes, write_json
from splitfl.data import load_splits
from splitfl.engine import BEST_MODEL, RunError, best_model_payload, make_fabric
from splitfl.he.encrypted_head import FullHeadLayout
from splitfl.he.keys import context_fingerprint, load_public_context, params_of
from splitfl.net import DEFAULT_CHUNK_SIZE
from splitfl.net.proto import splitfl_pb2 as pb
from splitfl.net.split.client import RemoteError, SplitClient, site_channel, site_name
from splitfl.net.split.common import (
    _BUILD_LOCK,
    HE_REGIMES,
    REGIMES,
    RELAY_KEY_FILE,
    RelaySealer,
    _fp_bytes,
    _kw,
    config_fingerprint,
    relay_key_material,
    relay_needed,
)
from splitfl.split.runner import SplitRunner, check_split_cut
from splitfl.tensors import ProtocolError


class RemoteSplitServer(SplitClient):
    """The hospital's view of the remote head: the methods the transports call, over gRPC.

    The RPCs are :class:`~splitfl.net.split.client.SplitClient`'s (the torch-free wire client the load
    benchmark also runs); this adds what SplitRunner expects of a server (``bind``, ``he``, ``optimizer``, ...).
    split-he-full: also FullSplitServer's (``layout``, ``backward(.., input_grad=)``, ``needs_refresh``,
    ``replace_weights``, ``export_weights``), so :class:`~splitfl.split.transport.FullHETransport` runs on it
    unchanged. ``export_weights`` downloads for a refresh, or for the release named by ``release_id``.
    """

    def __init__(self, channel: grpc.Channel, site: int, run_id: str, fingerprint: bytes, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, timeout_s: float = 600.0) -> None:
        super().__init__(channel, site, run_id, fingerprint, chunk_size=chunk_size, timeout_s=timeout_s)
        self.he: Any = None
        self.he_mlp: Any = None
        self.recorder = None
        self.optimizer: Any = None
        self.layout: Any = None  # split-he-full: FullHeadLayout (public: shapes, batch capacity, slots)
        self.release_id = 0  # split-he-full: the release request being served (0: export_weights is a refresh)

    def bind(self, head: Any, optimizer: Any, scheduler: Any, mode: str, public_context: Optional[bytes] = None,
             batch_capacity: int = 64, recorder: Any = None, initial_weights: Optional[bytes] = None) -> "RemoteSplitServer":
        """``SplitRunner(server_factory=client.bind)``: say Hello (uploading the public context if the server needs it).

        split-he-full (``mode="he-full"``): also the packed initial ``enc(W)``, uploaded if Hello says
        ``weights_needed`` (the first hospital to join; a later one is told the head exists and goes on).
        """
        self.optimizer = optimizer
        fp = b""
        ctx = None
        if mode in ("he", "he-full"):
            ctx = load_public_context(public_context)
            fp = _fp_bytes(context_fingerprint(ctx))
        in_features = head.linear_layers()[0].in_features if hasattr(head, "linear_layers") else head.in_features
        r = self.connect(in_features, fp)
        if mode != self.mode:
            raise ProtocolError(f"this hospital runs split-{mode} but the server runs split-{self.mode}")
        local = [(l.in_features, l.out_features) for l in (head.linear_layers() if hasattr(head, "linear_layers") else [head])]
        if local != [(l.in_features, l.out_features) for l in self.layers]:
            raise ProtocolError(f"head layers {local} differ from the server's")
        if mode == "he":
            if r.context_needed:
                self.upload_context(public_context, fp, galois=ctx.has_galois_keys(), relin=False)
            slots = params_of(ctx).slots
            self.he = SimpleNamespace(slots=slots)
            coeffs = getattr(getattr(head, "act", None), "coeffs", None)
            if len(self.layers) == 2 and coeffs is not None and len(coeffs) <= 3:
                self.he_mlp = SimpleNamespace(in_features=self.layers[0].in_features, hidden=self.layers[0].out_features,
                                              num_classes=self.layers[1].out_features, coeffs=tuple(coeffs))
        if mode == "he-full":
            self._bind_full(r, ctx, public_context, fp, batch_capacity, initial_weights)
        return self

    def _bind_full(self, r: Any, ctx: Any, public_context: bytes, fp: bytes, batch_capacity: int,
                   initial_weights: Optional[bytes]) -> None:
        if r.batch_capacity != batch_capacity:
            raise ProtocolError(f"the server's encrypted head takes batches of {r.batch_capacity}, this hospital {batch_capacity}")
        self.layout = FullHeadLayout(self.layers[0].in_features, self.layers[0].out_features, batch_capacity,
                                     params_of(ctx).slots)
        if r.context_needed:
            self.upload_context(public_context, fp, galois=ctx.has_galois_keys(), relin=True)
        if r.weights_needed:
            if initial_weights is None:
                raise ProtocolError("the server needs the initial encrypted head and this hospital has none to give")
            try:
                self.upload_weights(initial_weights, pb.WEIGHTS_PURPOSE_INITIAL)
            except RemoteError as e:  # another hospital uploaded them between our Hello and now: fine
                if e.code != grpc.StatusCode.ALREADY_EXISTS or e.error_code != pb.ERROR_CODE_OUT_OF_ORDER:
                    raise

    # ---------------------------------------------------------------- split-he-full: FullSplitServer's refresh and release

    def needs_refresh(self) -> bool:
        """What the step's Backward said: the server's head spent its update budget."""
        return self._refresh_needed

    def export_weights(self) -> bytes:
        """enc(W) for the key holders: the release being served (``release_id``), else this step's refresh."""
        if self.release_id:
            return self.download_weights(pb.WEIGHTS_PURPOSE_RELEASE, eval_id=self.release_id)
        return self.download_weights(pb.WEIGHTS_PURPOSE_REFRESH, step=self.step)

    def replace_weights(self, payload: bytes) -> None:
        """The refresh's fresh encryption up; it closes the step unless the run relays."""
        self.upload_weights(payload, pb.WEIGHTS_PURPOSE_REFRESH, self.step)
        self._refresh_needed = False

    def end_epoch(self) -> None:
        """In-process API compatibility: the remote epoch ends with :meth:`end_epoch_remote` (a barrier)."""

    def update_size(self) -> int:
        return sum(l.out_features * (l.in_features + 1) for l in self.layers)

    def has_secret_key(self) -> bool:
        return False  # the hospital cannot know; the server reports its own

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ============================================================================ hospital: the loop


def _hospital_state(runner: Any, sched_epochs: int) -> bytes:
    state = {
        "encoder": runner.encoder.state_dict(),
        "enc_opt": runner.enc_opt.state_dict() if runner.enc_opt is not None else None,
        "enc_sched": runner.enc_sched.state_dict() if runner.enc_sched is not None else None,
        "accountants": [a.state_dict() for a in runner.accountants],
        "noise_rng": runner._noise.get_state(),
        "sched_epochs": sched_epochs,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load_hospital_state(runner: Any, data: bytes) -> int:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # authenticated by AES-GCM first
    runner.encoder.load_state_dict(state["encoder"])
    if runner.enc_opt is not None and state["enc_opt"] is not None:
        runner.enc_opt.load_state_dict(state["enc_opt"])
    if runner.enc_sched is not None and state["enc_sched"] is not None:
        runner.enc_sched.load_state_dict(state["enc_sched"])
    for acc, s in zip(runner.accountants, state["accountants"]):
        acc.load_state_dict(s)
    runner._noise.set_state(state["noise_rng"])
    runner._feature_cache.clear()
    return int(state["sched_epochs"])


def _hospital_keys(cfg: Any, out_dir: Path, pki_dir: Any, kw: dict) -> Path:
    """``<out>/keys`` with the hospitals' shared key file, copied in from ``keys_dir`` / ``keys`` / the PKI folder if needed.

    The file is ``consortium.secret`` (split-he) or ``relay.secret`` (split-plain, when something is relayed).
    Looked up in order: ``<out>/keys``, the ``keys_dir`` keyword (a folder), the ``keys`` keyword (the file),
    ``<pki_dir>/<file>``, ``<pki_dir>/keys/<file>``. Missing everywhere, the runner makes one (fine for a
    single hospital; with several, their keys differ and the server refuses the second at Hello).
    """

    target = out_dir / "keys"
    name = "consortium.secret" if cfg.regime in HE_REGIMES else (RELAY_KEY_FILE if relay_needed(cfg) else None)
    if name is None or (target / name).exists():
        return target
    candidates = []
    if kw.get("keys_dir"):
        candidates.append(Path(kw["keys_dir"]) / name)
    if kw.get("keys"):
        candidates.append(Path(kw["keys"]))
    if pki_dir is not None:
        pki = Path(pki_dir)
        candidates += [pki / name, pki / "keys" / name]
        if pki.parent.name == "sites":  # a site folder of a development PKI: the key may sit at the PKI root
            candidates.append(pki.parent.parent / name)
    for c in candidates:
        if c.is_file():
            write_bytes(target / name, c.read_bytes(), 0o600)
            break
    return target


def run_split_site(cfg: Any, site: int, server: str, pki_dir: Any, insecure: bool, out_dir: Any, **kw: Any) -> None:
    """Hospital ``site`` of a split run whose head is served at ``server``; returns when the run is over.

    ``pki_dir``: the PKI root (with manifest.json) or this site's folder (ca.crt, client.crt, client.key, token).
    The hospitals must share one key file, ``consortium.secret`` (split-he) or ``relay.secret`` (split-plain
    with a trainable encoder): it is taken from ``<out_dir>/keys/``, else copied there from the ``keys_dir``
    folder, the ``keys`` file, ``<pki_dir>/``, ``<pki_dir>/keys/`` or the PKI root above a ``sites/<site>``
    folder (see :func:`_hospital_keys`). Keywords: ``run_id`` (as the server's), ``connect_timeout_s``
    (alias ``connect_timeout``; 120), ``reconnect_timeout_s`` (300: how long to wait for a server
    that went away to come back, e.g. restarted to resume from its checkpoint), ``poll_ms`` (10000). Make the
    shared key file first with :func:`ensure_consortium_keys` (two hospitals making it at once would make two
    different keys; the server then refuses one of them at Hello).
    """

    if cfg.regime not in REGIMES:
        raise RunError(f"run_split_site runs {' / '.join(REGIMES)} hospitals, not {cfg.regime!r}")
    check_split_cut(cfg, remote=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = config_fingerprint(cfg)
    run_id = kw.get("run_id") or f"split-{fp.hex()[:16]}"
    fabric = make_fabric(cfg.train)
    splits = load_splits(cfg.data)
    keys_dir = _hospital_keys(cfg, out_dir, pki_dir, kw)
    run_dir = out_dir  # SplitRunner reads <out>/keys/consortium.secret
    site_cfg = copy.deepcopy(cfg)
    site_cfg.split.transcript = False  # the transcript is the server's view: recorded by run_split_server
    channel = site_channel(server, site, pki_dir, insecure)
    reconnect_s = float(kw.get("reconnect_timeout_s", 300.0))
    first = True
    try:
        while True:
            try:
                grpc.channel_ready_future(channel).result(
                    timeout=_kw(kw, "connect_timeout_s", "connect_timeout", 120.0) if first else reconnect_s)
            except grpc.FutureTimeoutError:
                raise RunError(f"{site_name(site)}: no split server at {server}") from None
            first = False
            client = RemoteSplitServer(channel, site, run_id, fp)
            runner = None
            try:
                # Every (re)connection starts from the initial hospital state; the shared state comes from the relay.
                with _BUILD_LOCK:
                    fabric.seed_everything(cfg.seed, verbose=False)
                    runner = SplitRunner(fabric, site_cfg, splits, run_dir, server_factory=client.bind)
                fabric.print(f"[{site_name(site)}] joined run {run_id} at {server}")
                _site_loop(cfg, site, client, runner, splits, keys_dir, run_id, fp, kw)
                return
            except RemoteError as e:
                # The server went away (it resumes from its checkpoint) or replaced our session: join again.
                # OUT_OF_ORDER: this site was skipped (too slow) while it held a step; it starts over from the
                # relayed state, so a half-done step never leaks into the next one.
                if e.code not in _RECONNECT_CODES and e.error_code not in (pb.ERROR_CODE_UNKNOWN_SESSION,
                                                                           pb.ERROR_CODE_OUT_OF_ORDER):
                    raise
                fabric.print(f"[{site_name(site)}] lost the server ({e}); reconnecting")
                time.sleep(0.5)
            finally:
                if runner is not None:
                    runner.close()
    finally:
        channel.close()


_RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


POSITION_FILE = "split_position.json"


def _read_position(path: Path, run_id: str) -> Optional[dict]:
    """The hospital's place in the epoch after its last closed step (written by :func:`_site_loop`), if of this run."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("run_id") == run_id else None


def _site_loop(cfg: Any, site: int, client: RemoteSplitServer, runner: Any, splits: Any, keys_dir: Path,
               run_id: str, fp: bytes, kw: dict) -> None:
    if site >= len(runner.sites):
        raise RunError(f"site {site} does not exist: the partition has {len(runner.sites)} sites")
    relay = relay_needed(cfg)
    if relay and not cfg.model.freeze_encoder and not runner.encoder_trainable:
        raise RunError("model.freeze_encoder is false but the encoder has no trainable parameters")
    sealer = RelaySealer(relay_key_material(keys_dir, runner.he or runner.full), run_id, fp) if relay else None
    my_version, sched_epochs = 0, 0
    head_epochs = 0  # split-he-full: epochs the hospitals' schedule of the encrypted head's lr has stepped here
    poll = int(kw.get("poll_ms", 10_000))  # a long poll costs the server nothing: it wakes this hospital's call only
    position_file = keys_dir.parent / POSITION_FILE  # <out>/split_position.json
    saved = _read_position(position_file, run_id)

    def sync(version: int) -> None:
        nonlocal my_version, sched_epochs
        if not relay or version == my_version:
            return
        got, blob = client.download_relay()
        if got != version and got < version:
            raise ProtocolError(f"relay version {got} is older than announced {version}")
        sched_epochs = _load_hospital_state(runner, sealer.open(blob, got))
        my_version = got

    epoch = 0
    queue = list(runner._site_batches(site, epoch))
    pos, loss_sum, samples, ended, fresh_epoch = 0, 0.0, 0, False, True
    while True:
        r = client.get_turn(epoch, len(queue) - pos, poll)
        if r.state == pb.TURN_STATE_RUN_DONE:
            return
        if r.state == pb.TURN_STATE_EVALUATE:
            sync(r.relay_version)
            dataset = splits.val if r.eval_split == "val" else splits.test
            client.report_eval(r.eval_id, runner.evaluate(dataset))
            continue
        if r.state == pb.TURN_STATE_RELEASE:
            sync(r.relay_version)
            client.report_eval(r.eval_id, _release(cfg, client, runner, splits, keys_dir.parent, r))
            continue
        if r.epoch != epoch and r.state == pb.TURN_STATE_WAIT and r.epoch > epoch:
            epoch = int(r.epoch)
            queue = list(runner._site_batches(site, epoch))
            pos, loss_sum, samples, ended, fresh_epoch = 0, 0.0, 0, False, True
            continue
        if r.state == pb.TURN_STATE_YOURS:
            sync(r.relay_version)
            if fresh_epoch:
                runner.split_model.train()
                fresh_epoch = False
            while runner.enc_sched is not None and sched_epochs < epoch:  # the in-process end-of-epoch step, lazily
                with warnings.catch_warnings():  # a relayed optimizer has stepped, but this object has not
                    warnings.simplefilter("ignore", UserWarning)
                    runner.enc_sched.step()
                sched_epochs += 1
            while runner.full and runner.head_sched is not None and head_epochs < epoch:  # in-process train_epoch's end
                runner.head_opt.step()  # a no-op (no gradients) that keeps the scheduler's order, as in process
                runner.head_sched.step()
                head_epochs += 1
            if saved is not None and pos == 0 and saved["epoch"] == epoch and saved["step"] < r.step:
                # This process restarted mid-epoch (killed after a step) and the server did not: go on after the
                # last step it closed. A server resumed from its checkpoint replays the epoch and grants the same
                # step ids again (saved step >= r.step): the epoch then starts over from the first batch.
                pos, loss_sum, samples = int(saved["pos"]), float(saved["loss_sum"]), int(saved["samples"])
            saved = None
            client.begin_step(r.step)
            index = queue[pos]
            loss = runner.train_step(site, index)  # each hospital's loss guard sees its own losses
            pos += 1
            loss_sum += loss * len(index)
            samples += len(index)
            if relay:
                version = int(r.relay_version) + 1
                client.upload_relay(r.step, version, sealer.seal(_hospital_state(runner, sched_epochs), version))
                my_version = version
            write_json(position_file, {"run_id": run_id, "epoch": epoch, "step": int(r.step), "pos": pos,
                                       "loss_sum": loss_sum, "samples": samples})
            continue
        if r.state == pb.TURN_STATE_EPOCH_DONE and not ended:
            epsilon = 0.0
            if runner.dp:  # this site's accountant as relayed (current even if this runner was rebuilt on a reconnect)
                sync(r.relay_version)
                epsilon = runner.site_epsilon(site)
            client.end_epoch_remote(epoch, loss_sum, samples, epsilon)
            ended = True
            print(f"[{site_name(site)}] epoch {epoch + 1}: {pos} step(s) done, loss {loss_sum / max(samples, 1):.4f}", flush=True)
            continue
        time.sleep(min(r.retry_after_ms, 200) / 1000 if r.state == pb.TURN_STATE_WAIT else 0.05)


def _release(cfg: Any, client: RemoteSplitServer, runner: Any, splits: Any, out_dir: Path, r: Any) -> dict[str, Any]:
    """split-he-full: decrypt the server's head and write the released model, ``<out>/best_model.pt``, here.

    The same file ``splitfl train`` writes for split-he-full (encoder + released head, config, task, epoch,
    validation AUROC): plaintext weights exist only at the key holders. Returns the ReportEval acknowledgement.
    """

    client.release_id = int(r.eval_id)
    try:
        state = runner.model_state()  # SplitRunner: the key holders decrypt enc(W) into the consortium's model
    finally:
        client.release_id = 0
    best = {"epoch": int(r.release_epoch), "score": float(r.release_val_auroc)}
    path = out_dir / BEST_MODEL
    save_checkpoint(path, best_model_payload(state, cfg, splits.task, best))
    print(f"[{site_name(client.site)}] released the head of epoch {best['epoch']} to {path}", flush=True)
    return {"released": True, "epoch": best["epoch"]}
