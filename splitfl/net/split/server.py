"""The server process of a split run: :func:`run_split_server` and the epoch loop's :class:`RemoteServerRunner`.

The server builds the head, the :class:`~splitfl.net.split.coordinator.Coordinator` and the
:class:`~splitfl.net.split.servicer.SplitServicer`, serves them, and runs :func:`splitfl.engine.fit`, the epoch
loop of ``splitfl train``, with :class:`RemoteServerRunner`: ``train_epoch`` coordinates one remote epoch,
``evaluate`` asks one live hospital (``TURN_STATE_EVALUATE``) to evaluate the split through the head and report
the metrics (``ReportEval``), and checkpoints hold the head, its optimizer and the sealed relay blob, so the
usual atomic checkpoints and resume work (hospitals are stateless between steps). ``best_model.pt`` holds the
head (``head.*``) and the sealed hospital state (``_relay.*``).

split-he-full: the server writes ``checkpoint.pt`` (``enc(W)`` and its update/refresh counters, the sealed
relay), ``best_model.pt`` (the sealed relay and the best epoch's ``enc(W)``: never a plaintext head), the
metrics and the transcript; only hospitals write plaintext weights. As in process, the test split is evaluated
through the best epoch's head: the server puts that ``enc(W)`` back before the test.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from splitfl.artifacts import write_csv
from splitfl.data import load_splits
from splitfl.engine import RunError, fit, make_fabric, make_optimizer, make_scheduler, write_run_metrics
from splitfl.models import build_split_model
from splitfl.net.certs import load_server_folder
from splitfl.net.split.common import _BUILD_LOCK, REGIMES, _kw, config_fingerprint, relay_needed
from splitfl.net.split.coordinator import RELEASE, Coordinator
from splitfl.net.split.servicer import SplitServicer, serve
from splitfl.plots import plot_learning_curves
from splitfl.split.runner import check_split_cut, full_layout, full_preset, privacy_summary, wire_summary
from splitfl.transcript import TranscriptRecorder


class RemoteServerRunner:
    """``splitfl.engine.fit``'s runner on the server: epochs and evaluations happen at the hospitals."""

    def __init__(self, cfg: Any, splits: Any, servicer: SplitServicer, coordinator: Coordinator) -> None:
        self.cfg, self.splits, self.svc, self.coord = cfg, splits, servicer, coordinator
        self.train_set = splits.train
        self.train_bytes_up = self.train_bytes_down = self.train_samples = self.epochs_done = 0
        self.dp = cfg.regime == "split-he" and cfg.split.dp_noise_multiplier > 0
        self.full = cfg.regime == "split-he-full"
        self._extras: dict[str, Any] = {}
        self._last_val: dict[str, Any] = {}  # the latest validation metrics (a release records its AUROC)

    def train_epoch(self, epoch: int, desc: str) -> float:
        up0, down0 = self.svc.bytes_up, self.svc.bytes_down
        loss, samples, skipped = self.coord.run_epoch(epoch)
        if self.svc.head_sched is not None:
            self.svc.head_sched.step()  # SplitServer.end_epoch
        up, down = self.svc.bytes_up - up0, self.svc.bytes_down - down0
        self.train_bytes_up += up
        self.train_bytes_down += down
        self.train_samples += samples
        self.epochs_done += 1
        self._extras = {"bytes_up": up, "bytes_down": down, "sites_skipped": len(skipped)}
        if self.dp:
            self._extras["epsilon"] = max(self.epsilon_per_site())
        return loss / max(samples, 1)

    def epsilon_per_site(self) -> list[float]:
        """Each hospital's spent epsilon as it last reported it (0 for one that never did)."""
        with self.coord.cond:
            return [self.coord.epsilons.get(s, 0.0) for s in range(self.coord.num_sites)]

    def evaluate(self, dataset: Any) -> dict[str, Any]:
        split = "val" if dataset is self.splits.val else "test" if dataset is self.splits.test else None
        if split is None:
            raise ValueError("the remote runner evaluates only the validation and test splits")
        result = self.coord.evaluate(split)
        if split == "val":
            self._last_val = result
        return result

    def lr(self) -> float:
        return self.svc.head_opt.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        with self.coord.cond:
            relay = (self.coord.relay_version, self.coord.relay_blob, self.coord.next_step)
            epsilons = dict(self.coord.epsilons)
        return {
            "head": self.svc.head.state_dict(),
            "optimizer": self.svc.head_opt.state_dict(),
            "scheduler": self.svc.head_sched.state_dict() if self.svc.head_sched is not None else None,
            "relay": relay,
            "epsilons": epsilons,
            "full": self.svc.full_state() if self.full else None,  # split-he-full: enc(W) and its counters
            "counters": (self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done,
                         self.svc.bytes_up, self.svc.bytes_down),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.svc.head.load_state_dict(state["head"])
        self.svc.head_opt.load_state_dict(state["optimizer"])
        if self.svc.head_sched is not None and state.get("scheduler") is not None:
            self.svc.head_sched.load_state_dict(state["scheduler"])
        with self.coord.cond:
            self.coord.relay_version, self.coord.relay_blob, self.coord.next_step = state["relay"]
            self.coord.epsilons = dict(state.get("epsilons") or {})
        (self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done,
         self.svc.bytes_up, self.svc.bytes_down) = state["counters"]
        if self.full:
            self.svc.load_full_state(state.get("full"))

    def model_state(self) -> dict[str, Any]:
        """best_model.pt's model: the head (split-plain / split-he) and the sealed relay.

        split-he-full: the server holds no plaintext head, so first one hospital releases it (decrypts enc(W))
        and writes the released model on its side, ``<hospital out>/best_model.pt``; the server's file keeps
        the sealed relay and the best epoch's enc(W) (ciphertexts, for the final test).
        """
        if self.full:
            self.coord.evaluate(RELEASE, release_epoch=self.epochs_done,
                                release_val_auroc=float(self._last_val.get("auroc_macro", math.nan)))
            # the best epoch's enc(W) as the server holds it (ciphertexts only), for the final test
            state = self.svc.full_state()
            out: dict[str, Any] = ({"_full.weights": torch.frombuffer(bytearray(state["weights"]), dtype=torch.uint8).clone()}
                                   if state is not None else {})
        else:
            out = {f"head.{k}": v.detach().clone() for k, v in self.svc.head.state_dict().items()}
        with self.coord.cond:
            if self.coord.relay:
                out["_relay.version"] = torch.tensor(self.coord.relay_version, dtype=torch.int64)
                blob = self.coord.relay_blob
                out["_relay.sealed"] = (torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone() if blob
                                        else torch.zeros(0, dtype=torch.uint8))
        return out

    def load_model_state(self, state: dict[str, Any]) -> None:
        """The best epoch's head and relay; split-he-full: the best epoch's enc(W) back on the head, as the
        in-process run puts back the best epoch's head (there re-encrypted by the key holders)."""
        if not self.full:
            self.svc.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        elif "_full.weights" in state:
            self.svc.restore_full_weights(state["_full.weights"].numpy().tobytes())
        if "_relay.version" in state:
            with self.coord.cond:
                self.coord.relay_version = int(state["_relay.version"])
                self.coord.relay_blob = state["_relay.sealed"].numpy().tobytes()

    def epoch_extras(self) -> dict[str, Any]:
        return dict(self._extras)

    def result_extras(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {
            "protocol": {
                "regime": cfg.regime,
                "hospitals": self.coord.num_sites,
                "encoder_trainable": not cfg.model.freeze_encoder,
                "he_preset": _he_preset(cfg),
                "server_has_secret_key": self.svc.has_secret_key(),
                "transport": "grpc",
                "encoder_relay": self.coord.relay,
            },
            "wire": wire_summary(self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done),
        }
        if self.full:
            out["protocol"].update(head_encrypted=True, **self.svc.full_counters())
        if self.dp:  # as the in-process run reports it, from the epsilons the hospitals reported at EndEpoch
            out["privacy"] = privacy_summary(cfg, self.epsilon_per_site())
        return out


def _he_preset(cfg: Any) -> Optional[str]:
    """The CKKS preset of the run, as the in-process runner reports it (None in split-plain)."""

    return {"split-he": cfg.split.he_preset, "split-he-full": full_preset(cfg)}.get(cfg.regime)


def run_split_server(cfg: Any, out_dir: Any, address: str, pki_dir: Any, insecure: bool, **kw: Any) -> dict[str, Any]:
    """Serve the head of a split-plain / split-he / split-he-full run until it finishes; writes what ``splitfl train`` writes
    (in split-he-full the released plaintext model is written by a hospital, see :mod:`splitfl.net.split`).

    Keywords: ``run_id`` (default: from the config fingerprint), ``turn_timeout_s`` (alias ``round_timeout``;
    300: a hospital silent that long while it should act is skipped for the rest of the epoch),
    ``join_timeout_s`` (600: how long each epoch waits for every hospital's first GetTurn; in the first epoch
    this server runs every hospital must come, else it stops with a RunError naming the missing ones),
    ``eval_timeout_s`` (600), ``finish_grace_s`` (10: how long to wait for every hospital to hear that the run
    is over), ``on_ready`` (called with the bound port once serving), ``max_workers``. ``pki_dir``: the
    server's own folder (``DIR/server`` of ``splitfl certs``: ca.crt, server.crt, server.key, tokens.json),
    refused if it holds a secret (the CA key, a consortium secret, a site's key or token). Rerun on the same
    ``out_dir`` to resume from the checkpoint; the hospitals reconnect by themselves.
    """
    if cfg.regime not in REGIMES:
        raise RunError(f"run_split_server serves {' / '.join(REGIMES)}, not {cfg.regime!r}")
    if pki_dir is not None:  # before loading anything: a wrong folder is refused at once
        load_server_folder(pki_dir, require_tls=not insecure)
    check_split_cut(cfg, remote=True)  # Hello describes the head as affine layers on pooled features
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_id = kw.get("run_id") or f"split-{config_fingerprint(cfg).hex()[:16]}"
    fabric = make_fabric(cfg.train)
    splits = load_splits(cfg.data)
    with _BUILD_LOCK:
        fabric.seed_everything(cfg.seed, verbose=False)
        split_model, _ = build_split_model(cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size)
    head = split_model.head
    feature_shape = list(split_model.feature_dim)
    del split_model  # the server never uses an encoder
    if cfg.regime == "split-he-full":  # refuse what the encrypted head cannot train before serving anyone
        lin = head.linear_layers()[0]
        full_layout(cfg, lin.in_features, lin.out_features)
    head_opt = make_optimizer(list(head.parameters()), cfg.train)
    head_sched = make_scheduler(head_opt, cfg.train)
    relay = relay_needed(cfg)
    close_on = "relay" if relay else ("update" if cfg.regime == "split-he" else "backward")
    coord = Coordinator(cfg.data.partition.num_sites, relay, close_on,
                        turn_timeout_s=_kw(kw, "turn_timeout_s", "round_timeout", 300.0),
                        join_timeout_s=_kw(kw, "join_timeout_s", "join_timeout", 600.0),
                        eval_timeout_s=_kw(kw, "eval_timeout_s", "eval_timeout", 600.0))
    recorder = None
    if cfg.split.transcript:
        layers = head.linear_layers()
        recorder = TranscriptRecorder(
            out_dir / "transcript", cfg.split.transcript_max_steps,
            {"regime": cfg.regime, "cut": cfg.model.cut, "model": cfg.model.name, "feature_shape": feature_shape,
             "in_features": layers[0].in_features, "num_classes": layers[-1].out_features,
             "head_layers": [[l.in_features, l.out_features] for l in layers], "batch_size": cfg.train.batch_size,
             "he_preset": _he_preset(cfg), "transport": "grpc", "dp_noise_multiplier": cfg.split.dp_noise_multiplier,
             "dp_max_grad_norm": cfg.split.dp_max_grad_norm,
             "config": dataclasses.asdict(cfg)})  # what the server coordinated (the attacker knows it), as in process
    svc = SplitServicer(cfg, run_id, head, head_opt, head_sched, coord, recorder=recorder)
    server, port = serve(svc, address, pki_dir, insecure, kw.get("max_workers"))
    fabric.print(f"[split server] run {run_id}: serving {cfg.regime} on port {port} for {coord.num_sites} hospitals")
    if kw.get("on_ready") is not None:
        kw["on_ready"](port)
    runner = RemoteServerRunner(cfg, splits, svc, coord)
    try:
        result = fit(fabric, runner, cfg, splits, out_dir, f"{cfg.regime} server")
        coord.finish(_kw(kw, "finish_grace_s", "finish_grace", 10.0))  # tells the hospitals the run is over
    finally:
        with coord.cond:
            steps = [dict(r) for r in coord.step_times]
        if steps:  # this process's steps (a resumed server writes only its own)
            write_csv(out_dir / "steps.csv", steps)
        # On a crash the hospitals are NOT told the run is over: they wait for the server to come back and
        # resume from its checkpoint (rerun with the same out_dir).
        server.stop(grace=1.0).wait()
    plot_learning_curves({cfg.regime: result["history"]}, out_dir / "learning_curves.png", f"{cfg.regime} (gRPC)")
    metrics = write_run_metrics(cfg, splits, result, t0, out_dir, print)
    return metrics
