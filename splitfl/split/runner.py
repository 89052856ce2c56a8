"""Training loop of the split regimes: hospitals take turns against one server head.

Each hospital runs the (relayed) encoder on its own batch, sends the
activations (plaintext or CKKS-encrypted) to the server, gets logits back,
computes the loss with labels that never leave it, and returns what the
server needs. With one hospital and no DP, ``split-plain`` computes exactly
what centralized training computes (two Adam optimizers over disjoint
parameters are one Adam), and ``split-he`` the same up to CKKS noise.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from lightning.fabric import Fabric
from opacus.accountants import RDPAccountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from tqdm.auto import tqdm

from splitfl.artifacts import write_bytes
from splitfl.config import RunConfig
from splitfl.data import DataSplits, partition_dataset
from splitfl.data.base import ArrayDataset
from splitfl.engine import RunError, epoch_loader, fit, make_optimizer, make_scheduler
from splitfl.he.encrypted_head import FullHeadHospital, FullHeadLayout, full_public_context_bytes
from splitfl.he.parallel import CKKSWorkers, resolve_workers
from splitfl.he.keys import consortium_secret_context, params_of, public_context_bytes
from splitfl.he.mlp import MLP_DEPTH, PackedMLPHE, mlp_public_context_bytes
from splitfl.he.params import HEError, check_depth, get_preset
from splitfl.metrics import TaskMetrics, make_loss
from splitfl.models import build_split_model
from splitfl.models.embeddings import encode_images
from splitfl.plots import plot_learning_curves
from splitfl.split.full_server import FullSplitServer, pack_weight_rows
from splitfl.split.guard import LossGuard
from splitfl.split.server import SplitServer
from splitfl.split.transport import FullHETransport, HETransport, PlainTransport
from splitfl.transcript import RelayRecorder, TranscriptRecorder

SECRET_CONTEXT = "keys/consortium.secret"


def check_split_cut(cfg: RunConfig, remote: bool = False) -> None:
    """split-he needs a linear / MLP head on pooled features; split-plain also takes a stage cut (any head).

    ``remote``: the gRPC split service, whose handshake describes the head as affine layers on pooled
    features, so a stage cut runs in-process only.
    """

    if cfg.regime == "split-he-full" and cfg.model.cut != "pooled":
        raise RunError(f"model.cut={cfg.model.cut!r}: split-he-full trains an encrypted linear head on pooled features; "
                       "use model.cut: pooled")
    if cfg.model.cut in ("pooled", "mlp"):
        return
    if cfg.regime == "split-he":
        raise RunError(
            f"model.cut={cfg.model.cut!r}: split-he runs the server head on pooled features under CKKS; "
            "use model.cut: pooled (linear head) or mlp (linear -> activation -> linear). "
            "Stage cuts (stage:N) are split-plain only."
        )
    if remote:
        raise RunError(
            f"model.cut={cfg.model.cut!r}: the gRPC split service (serve/join/simulate) serves linear or MLP heads "
            "on pooled features only; run a stage cut in-process (splitfl train --regime split-plain), "
            "or use model.cut: pooled or mlp over gRPC."
        )


def full_layout(cfg: RunConfig, in_features: int, num_classes: int) -> Any:
    """split-he-full's slot layout, after refusing what the encrypted head cannot train (RunError).

    Called by the in-process runner, the gRPC server (before it serves) and each gRPC hospital, so a
    configuration is refused the same way wherever it is run: Adam / momentum / weight decay (the server
    applies no plaintext scalar), DP, a batch larger than a ciphertext's slots, a preset without a rescale.
    """

    tcfg = cfg.train
    if tcfg.optimizer != "sgd" or tcfg.momentum != 0 or tcfg.weight_decay != 0:
        raise RunError(f"split-he-full trains the encrypted head by plain SGD on ciphertexts (the server applies no "
                       f"plaintext scalar): set train.optimizer: sgd, train.momentum: 0, train.weight_decay: 0 "
                       f"(got {tcfg.optimizer}, momentum {tcfg.momentum}, weight_decay {tcfg.weight_decay})")
    if cfg.split.dp_noise_multiplier > 0:
        raise RunError("split.dp_noise_multiplier: split-he-full sends no plaintext update to noise (the server "
                       "sees ciphertexts only); DP on the encrypted head is not implemented, use split-he for DP")
    try:
        params = get_preset(full_preset(cfg))
    except HEError as exc:
        raise RunError(f"split.he_preset: {exc}") from None
    if params.levels < 1:
        raise RunError(f"split.he_preset={params.name!r} has no rescaling level; split-he-full rescales each product "
                       "once (use split.he_preset: full)")
    try:
        return FullHeadLayout(in_features, num_classes, tcfg.batch_size, params.slots)
    except HEError as exc:
        raise RunError(f"train.batch_size={tcfg.batch_size}: {exc}") from None


class SplitRunner:
    """Hospitals (encoder, data, labels, loss, secret key) and the server (head), wired by a transport."""

    def __init__(self, fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path,
                 server_factory: Optional[Any] = None) -> None:
        """``server_factory`` (default :class:`SplitServer`) is called with SplitServer's arguments and returns
        the object the transports talk to: a remote stub (``splitfl.net.split.hospital``) makes this runner a
        hospital of a run whose head lives in another process."""

        self.fabric, self.cfg, self.task = fabric, cfg, splits.task
        check_split_cut(cfg)
        self.split_model, report = build_split_model(cfg.model, splits.task.num_outputs, splits.task.n_channels, cfg.data.size)
        if report is not None:
            fabric.print(str(report))
        self.device = fabric.device
        self.encoder = self.split_model.encoder.to(self.device)
        head = self.split_model.head
        # pooled / mlp: the affine layers the HE server evaluates; a stage cut's head (remaining stages,
        # pooling, classifier) is any module, run in plaintext only.
        self.head_layers = list(head.linear_layers()) if hasattr(head, "linear_layers") else []
        self.head_activation = getattr(head, "act", None)  # between the layers of an MLP head; public architecture
        feature_shape = tuple(self.split_model.feature_dim)
        enc_params = [p for p in self.encoder.parameters() if p.requires_grad]
        self.encoder_trainable = bool(enc_params)
        self.enc_opt = make_optimizer(enc_params, cfg.train) if enc_params else None
        self.enc_sched = make_scheduler(self.enc_opt, cfg.train) if self.enc_opt is not None else None
        head_opt = make_optimizer(list(head.parameters()), cfg.train)
        head_sched = make_scheduler(head_opt, cfg.train)
        self.loss_fn = make_loss(splits.task)
        self.metrics = TaskMetrics(splits.task, device="cpu")

        scfg = cfg.split
        self.he = cfg.regime == "split-he"
        self.full = cfg.regime == "split-he-full"
        self.he_preset = full_preset(cfg) if self.full else (scfg.he_preset if self.he else None)
        make_server = SplitServer if server_factory is None else server_factory
        recorder = None
        if scfg.transcript:
            recorder = TranscriptRecorder(
                out_dir / "transcript", scfg.transcript_max_steps,
                {"regime": cfg.regime, "cut": cfg.model.cut, "model": cfg.model.name,
                 "feature_shape": list(feature_shape), "num_classes": splits.task.num_outputs,
                 "in_features": self.head_layers[0].in_features if self.head_layers else None,
                 "head_layers": [[l.in_features, l.out_features] for l in self.head_layers] or None,
                 "batch_size": cfg.train.batch_size,
                 "he_preset": self.he_preset,
                 "dp_noise_multiplier": scfg.dp_noise_multiplier, "dp_max_grad_norm": scfg.dp_max_grad_norm,
                 "config": dataclasses.asdict(cfg)},  # what the server coordinated (the attacker knows it)
            )
        # The hospitals' evaluation key (which images each recorded step used): written next to the
        # transcript for the attack harness's scoring, never sent to the server.
        self._truth_recorder = recorder
        # With a trainable encoder the hospitals relay it to each other: record what each one receives, for the
        # curious-fellow-hospital attack (the server never sees these weights).
        self._relay = (RelayRecorder(out_dir / "relay", self._encoder_flat())
                       if recorder is not None and self.encoder_trainable else None)
        self.head_opt, self.head_sched = head_opt, head_sched  # split-he-full: the hospitals' schedule of lr
        if self.full:
            self.server, self.transport = self._full_parties(out_dir, recorder, server_factory)
        elif self.he:
            # The consortium's key: made once by the hospitals, kept in a file the server never receives.
            secret = consortium_secret_context(out_dir / SECRET_CONTEXT, scfg.he_preset, "split.he_preset")
            public = public_context_bytes(secret)
            self.noninteractive = cfg.model.cut == "mlp" and scfg.mlp_inference == "noninteractive"
            if self.noninteractive:
                public = self._noninteractive_public_context(secret, head)
            if recorder is not None:  # the server's public context, so the transcript can be read as it was held

                write_bytes(recorder.folder / "server_public_context.bin", public, 0o644)
            self.server = make_server(head, head_opt, head_sched, "he", public, cfg.train.batch_size, recorder)
            self.transport: PlainTransport | HETransport = HETransport(self.server, secret, cfg.train.batch_size)
            self.transport.workers = self._workers(secret)
            if isinstance(self.server, SplitServer) and self.server.context is not None:  # in process: its own pool
                self.server.workers = self._workers(self.server.context)
        else:
            # A linear head implies its shapes (and a remote stub takes no more); any other head is told them.
            shapes = {} if self.head_layers else {"feature_shape": feature_shape, "num_classes": splits.task.num_outputs}
            self.server = make_server(head, head_opt, head_sched, "plain", recorder=recorder, **shapes)
            self.transport = PlainTransport(self.server)

        self.noninteractive = getattr(self, "noninteractive", False)
        self.sites = partition_dataset(splits.train, cfg.data.partition)
        self.train_set = splits.train
        self.dp = self.he and scfg.dp_noise_multiplier > 0
        if scfg.dp_noise_multiplier > 0 and not self.he:
            raise RunError("split.dp_noise_multiplier applies to split-he head updates; in split-plain the server sees activations")
        if self.dp and scfg.dp_max_grad_norm <= 0:
            raise RunError("split.dp_noise_multiplier > 0 needs split.dp_max_grad_norm > 0 (the per-sample clipping bound)")
        self.accountants = [RDPAccountant() for _ in self.sites]
        self._feature_cache: dict[int, torch.Tensor] = {}
        self._noise = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        self.loss_guard = (LossGuard(scfg.loss_guard_steps, scfg.loss_guard_ratio)
                           if scfg.loss_guard_steps is not None else None)
        self.train_bytes_up = 0
        self.train_bytes_down = 0
        self.train_samples = 0
        self.epochs_done = 0
        self._extras: dict[str, Any] = {}

    def _full_parties(self, out_dir: Path, recorder: Optional[TranscriptRecorder],
                      server_factory: Optional[Any]) -> tuple[Any, FullHETransport]:
        """split-he-full: the consortium's key, the server's encrypted head (initial weights encrypted here).

        In process the server is a :class:`FullSplitServer`; with ``server_factory`` (a gRPC stub's ``bind``)
        it is called as SplitServer's factory with mode ``"he-full"`` and the packed initial ``enc(W)``, which
        the stub uploads if the remote server still needs them.
        """

        cfg, tcfg = self.cfg, self.cfg.train
        lin = self.head_layers[0]
        layout = full_layout(cfg, lin.in_features, lin.out_features)
        secret = consortium_secret_context(out_dir / SECRET_CONTEXT, self.he_preset, "split.he_preset")
        if params_of(secret).slots != layout.slots:
            raise RunError(f"{out_dir / SECRET_CONTEXT} has {params_of(secret).slots} slots, preset {self.he_preset!r} "
                           f"{layout.slots}: the key file was made for another preset")
        public = full_public_context_bytes(secret, layout)
        if recorder is not None:
            write_bytes(recorder.folder / "server_public_context.bin", public, 0o644)
        initial = pack_weight_rows(FullHeadHospital(secret, layout).encrypt_weights(lin.weight, lin.bias))
        if server_factory is None:
            server: Any = FullSplitServer(public, lin.in_features, lin.out_features, tcfg.batch_size, initial,
                                          cfg.split.full_refresh_every, recorder)
        else:
            server = server_factory(self.split_model.head, self.head_opt, self.head_sched, "he-full", public,
                                    tcfg.batch_size, recorder, initial_weights=initial)
        return server, FullHETransport(server, secret, self._workers(secret))

    def _workers(self, ctx: Any) -> CKKSWorkers | None:
        """This party's CKKS processes (split.he_workers; 1: none), closed with the run's process."""
        n = resolve_workers(self.cfg.split.he_workers)
        return CKKSWorkers(ctx, n) if n > 1 else None

    def _noninteractive_public_context(self, secret: Any, head: nn.Module) -> bytes:
        """Public context with relinearisation and exactly the Galois keys the polynomial MLP head needs."""

        coeffs = getattr(getattr(head, "act", None), "coeffs", None)
        if coeffs is None or len(coeffs) > 3:
            raise RunError("split.mlp_inference=noninteractive needs a polynomial activation of degree <= 2: "
                           "set model.mlp_activation to square or poly2")
        params = params_of(secret)
        check_depth(params, MLP_DEPTH)  # clear error for a preset with too few levels (use split.he_preset: deep)
        fc1, fc2 = head.linear_layers()
        probe = PackedMLPHE(fc1.in_features, fc1.out_features, fc2.out_features, self.cfg.train.batch_size,
                            params.slots, tuple(coeffs))
        return mlp_public_context_bytes(secret, probe.rotation_steps())

    # ------------------------------------------------------------------ hospital side

    def _features(self, dataset: ArrayDataset, images: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        """Encoder output; for a frozen encoder with caching, computed once per image and reused."""
        frozen_cache = not self.encoder_trainable and self.cfg.split.cache_embeddings
        if frozen_cache and index is not None:
            key = id(dataset)
            if key not in self._feature_cache:
                self._feature_cache[key] = self._encode_all(dataset)
            return self._feature_cache[key][index].to(self.device)
        if not self.encoder_trainable:
            with torch.no_grad():
                return self.encoder(images.to(self.device))
        return self.encoder(images.to(self.device))

    def _encode_all(self, dataset: ArrayDataset) -> torch.Tensor:
        return encode_images(self.encoder, dataset._x, self.cfg.train.eval_batch_size, self.device)

    def _head_update(self, deltas: list[torch.Tensor], inputs: list[torch.Tensor], site: int) -> torch.Tensor:
        """The head gradient the server needs: every layer's [dW | db], flattened; per-sample clipped and noised under DP.

        ``deltas[l]`` is dL/d(output of layer l) and ``inputs[l]`` its input, for the
        batch-mean loss. A layer's per-sample gradient is an outer product, so its
        norm is |delta_i| * |[input_i, 1]|; clipping uses the norm over all layers.
        """
        xs = [torch.cat([x.detach().cpu().float(), torch.ones(len(x), 1)], dim=1) for x in inputs]
        gs = [g.detach().cpu().float() for g in deltas]
        scfg = self.cfg.split
        if scfg.dp_max_grad_norm <= 0:
            return torch.cat([(g.t() @ x).flatten() for g, x in zip(gs, xs)])
        batch = len(gs[0])
        per_sample = [g * batch for g in gs]  # gradients of each sample's own loss (the loss is a batch mean)
        norms = torch.sqrt(sum((g.norm(dim=1) * x.norm(dim=1)) ** 2 for g, x in zip(per_sample, xs)))
        factors = (scfg.dp_max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
        summed = torch.cat([((g * factors[:, None]).t() @ x).flatten() for g, x in zip(per_sample, xs)])
        denominator = batch
        if self.dp:
            sigma = scfg.dp_noise_multiplier * scfg.dp_max_grad_norm
            summed = summed + torch.randn(summed.shape, generator=self._noise) * sigma
            denominator = self._sample_rate(site) * len(self.sites[site])  # expected Poisson batch size
            self.accountants[site].step(noise_multiplier=scfg.dp_noise_multiplier, sample_rate=self._sample_rate(site))
        return summed / denominator

    def _sample_rate(self, site: int) -> float:
        return min(1.0, self.cfg.train.batch_size / len(self.sites[site]))

    def _site_batches(self, site: int, epoch: int) -> Iterator[torch.Tensor]:
        """Index batches of one hospital for one epoch: shuffled, or Poisson-sampled under DP (as the accountant assumes)."""
        n = len(self.sites[site])
        if self.dp:
            g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch * 997 + site)
            sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=self._sample_rate(site), generator=g)
            return (torch.as_tensor(b, dtype=torch.long) for b in sampler if len(b) > 0)
        # The very batches the plaintext regimes draw (site 0 = the centralized order), so regimes compare like for like.
        loader = epoch_loader(self.sites[site], self.cfg.train.batch_size, self.cfg.seed + 7919 * site, epoch)
        return (torch.as_tensor(b, dtype=torch.long) for b in loader.batch_sampler)

    def _he_forward(self, feats: torch.Tensor, train: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Layer by layer over CKKS; the hospital applies the activation between layers.

        Returns the logits, each layer's input and the pre-activations (for the backward pass).
        """
        inputs, pre = [feats.detach().cpu().float()], []
        z = self.transport.forward(inputs[0], train=train, layer=0)
        for layer in range(1, len(self.head_layers)):
            pre.append(z)
            with torch.no_grad():
                inputs.append(self.head_activation(z))
            z = self.transport.forward(inputs[-1], train=train, layer=layer)
        return z, inputs, pre

    def _record_truth(self, site: int, index: torch.Tensor) -> None:
        """Append {step, site, indices} to transcript/ground_truth.jsonl for a step the server records."""
        rec = self._truth_recorder
        if rec is None or not rec.active:
            return

        with open(rec.folder / "ground_truth.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": rec.step, "site": int(site), "indices": [int(i) for i in index.tolist()]}) + "\n")

    def _encoder_flat(self) -> torch.Tensor:
        """The encoder's trainable weights as one vector: what a hospital relays to the next."""
        return torch.cat([p.detach().flatten().cpu().float() for p in self.encoder.parameters() if p.requires_grad])

    def _step(self, site: int, index: torch.Tensor) -> float:
        rec = self._truth_recorder
        relay_step = rec.step if self._relay is not None and rec.active else None
        self._record_truth(site, index)
        data = self.sites[site]
        images, labels = data[index]
        feats = self._features(data, images, index)
        if not self.he:  # split-plain and split-he-full: logits in, the logit gradient out
            logits = self.transport.forward(feats).to(self.device).requires_grad_(True)
            loss = self.loss_fn(logits, labels.to(self.device))
            loss.backward()
            if self.full:
                grad_feats = self.transport.backward(logits.grad.detach(), self.lr(), self.encoder_trainable)
                self.transport.refresh_if_needed()
            else:
                grad_feats = self.transport.backward(logits.grad.detach(), tuple(feats.shape))
        else:
            z, inputs, pre = self._he_forward(feats, train=True)
            logits = z.requires_grad_(True)
            loss = self.loss_fn(logits, labels.cpu())
            loss.backward()
            deltas = [logits.grad.detach()]
            for layer in range(len(self.head_layers) - 1, 0, -1):  # encrypted backward through the hidden layers
                grad_act = self.transport.input_grad(deltas[0], layer)
                z_prev = pre[layer - 1].clone().requires_grad_(True)
                self.head_activation(z_prev).backward(grad_act)
                deltas.insert(0, z_prev.grad.detach())
            # A frozen encoder needs no activation gradient: only the head update then travels.
            grad_feats = self.transport.input_grad(deltas[0], 0) if self.encoder_trainable else None
            self.transport.send_update(self._head_update(deltas, inputs, site))
        if self.encoder_trainable:
            self.enc_opt.zero_grad(set_to_none=True)
            feats.backward(grad_feats.to(feats.device, feats.dtype))
            self.enc_opt.step()
            if relay_step is not None:
                self._relay.record(relay_step, site, self.enc_opt.param_groups[0]["lr"], self._encoder_flat())
        return float(loss.item())

    # ------------------------------------------------------------------ runner protocol (see splitfl.engine.fit)

    def train_step(self, site: int, index: torch.Tensor) -> float:
        """One hospital's training step on its batch ``index``; its loss, checked by the loss guard if set."""
        loss = self._step(site, index)
        if self.loss_guard is not None:
            self.loss_guard.observe(loss)
        return loss

    def train_epoch(self, epoch: int, desc: str) -> float:
        self.split_model.train()
        up0, down0 = self.transport.bytes_up, self.transport.bytes_down
        queues = [list(self._site_batches(s, epoch)) for s in range(len(self.sites))]
        order = [(s, b) for step in range(max(map(len, queues), default=0)) for s, q in enumerate(queues) if step < len(q)
                 for b in [q[step]]]
        total, count = 0.0, 0
        bar = tqdm(order, desc=desc, leave=False, disable=not (self.cfg.train.progress and self.fabric.is_global_zero))
        for site, index in bar:
            loss = self.train_step(site, index)
            total += loss * len(index)
            count += len(index)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        self.server.end_epoch()
        if self.full and self.head_sched is not None:  # the hospitals own the encrypted head's learning rate
            self.head_opt.step()  # a no-op (the plaintext head gets no gradients) that keeps the scheduler's order
            self.head_sched.step()
        if self.enc_sched is not None:
            self.enc_sched.step()
        up, down = self.transport.bytes_up - up0, self.transport.bytes_down - down0
        self.train_bytes_up += up
        self.train_bytes_down += down
        self.train_samples += count
        self.epochs_done += 1
        self._extras = {"bytes_up": up, "bytes_down": down}
        if self.dp:
            self._extras["epsilon"] = self.epsilon()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, dataset: ArrayDataset) -> dict[str, Any]:
        self.split_model.eval()
        self.metrics.reset()
        bs = self.cfg.train.eval_batch_size
        frozen_cache = not self.encoder_trainable and self.cfg.split.cache_embeddings
        for start in range(0, len(dataset), bs):
            index = torch.arange(start, min(start + bs, len(dataset)))
            images, labels = dataset[index]
            feats = self._features(dataset, images, index if frozen_cache else None)
            if self.full:
                logits = self.transport.forward(feats, train=False).cpu()
            elif self.noninteractive:
                logits = self.transport.predict(feats.cpu()).cpu()
            elif self.he:
                logits = self._he_forward(feats, train=False)[0].cpu()
            else:
                logits = self.transport.forward(feats, train=False).cpu()
            self.metrics.update(logits, labels, loss=self.loss_fn(logits, labels).item())
        return self.metrics.compute()

    def epsilon(self) -> float:
        """The largest epsilon spent by any hospital (at split.dp_delta); inf without DP noise."""
        if not self.dp:
            return math.inf
        return max(self.site_epsilon(s) for s in range(len(self.accountants)))

    def site_epsilon(self, site: int) -> float:
        """Epsilon spent by hospital ``site`` so far (at split.dp_delta); 0 before its first DP step."""
        acc = self.accountants[site]
        return acc.get_epsilon(self.cfg.split.dp_delta) if len(acc) else 0.0

    def lr(self) -> float:
        if self.full:
            return self.head_opt.param_groups[0]["lr"]
        return self.server.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.state_dict(),
            "enc_opt": self.enc_opt.state_dict() if self.enc_opt is not None else None,
            "enc_sched": self.enc_sched.state_dict() if self.enc_sched is not None else None,
            "server": self.server.state_dict(),
            "accountants": [a.state_dict() for a in self.accountants],
            "noise_rng": self._noise.get_state(),
            "counters": (self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done),
            "transcript_step": self.server.recorder.step if self.server.recorder is not None else 0,
            # split-he-full: the hospitals' schedule of the encrypted head's lr (the optimizer holds the current lr)
            "head_opt": self.head_opt.state_dict() if self.full else None,
            "head_sched": self.head_sched.state_dict() if self.full and self.head_sched is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        if self.enc_opt is not None:
            self.enc_opt.load_state_dict(state["enc_opt"])
        if self.enc_sched is not None and state.get("enc_sched") is not None:
            self.enc_sched.load_state_dict(state["enc_sched"])
        self.server.load_state_dict(state["server"])
        if self.full and state.get("head_opt") is not None:
            self.head_opt.load_state_dict(state["head_opt"])
        if self.full and self.head_sched is not None and state.get("head_sched") is not None:
            self.head_sched.load_state_dict(state["head_sched"])
        for acc, s in zip(self.accountants, state["accountants"]):
            acc.load_state_dict(s)
        self._noise.set_state(state["noise_rng"])
        self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done = state["counters"]

    def model_state(self) -> dict[str, Any]:
        if self.full:  # the release: the key holders decrypt the server's head into the consortium's model
            self._release_head()
        return self.split_model.state_dict()

    def _release_head(self) -> None:
        weight, bias = self.transport.release()
        lin = self.head_layers[0]
        with torch.no_grad():
            lin.weight.copy_(weight.to(lin.weight))
            lin.bias.copy_(bias.to(lin.bias))

    def load_model_state(self, state: dict[str, Any]) -> None:
        """The best epoch's model; split-he-full also puts its head back on the server, encrypted by the key holders,
        so the final test runs through the best epoch's encoder *and* head (not the last epoch's enc(W))."""
        self.split_model.load_state_dict(state)
        self._feature_cache.clear()
        if self.full:
            lin = self.head_layers[0]
            self.transport.restore(lin.weight.detach().double(), lin.bias.detach().double())

    def epoch_extras(self) -> dict[str, Any]:
        return dict(self._extras)

    def result_extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "protocol": {
                "regime": self.cfg.regime,
                "hospitals": len(self.sites),
                "site_sizes": [len(s) for s in self.sites],
                "encoder_trainable": self.encoder_trainable,
                "he_preset": self.he_preset,
                "server_has_secret_key": self.server.has_secret_key(),
            },
            "wire": wire_summary(self.train_bytes_up, self.train_bytes_down, self.train_samples, self.epochs_done),
        }
        if self.full:
            head = self.server.head
            out["protocol"].update(head_encrypted=True, head_updates=head.updates, head_refreshes=head.refreshes,
                                   refresh_every=head.refresh_every)
        if self.dp:
            out["privacy"] = privacy_summary(self.cfg, [self.site_epsilon(s) for s in range(len(self.accountants))])
        return out

    def close(self) -> None:
        self._feature_cache.clear()


def wire_summary(bytes_up: int, bytes_down: int, samples: int, epochs: int) -> dict[str, Any]:
    """metrics.json's ``wire`` section of a split run (in-process or the gRPC server's count)."""
    samples = max(samples, 1)
    return {
        "train_bytes_up": bytes_up,
        "train_bytes_down": bytes_down,
        "bytes_per_sample_up": bytes_up / samples,
        "bytes_per_sample_down": bytes_down / samples,
        # a "round" of split training is one epoch over every hospital's data
        "bytes_per_round": (bytes_up + bytes_down) / max(epochs, 1),
    }


def privacy_summary(cfg: RunConfig, epsilon_per_site: list[float]) -> dict[str, Any]:
    """metrics.json's ``privacy`` section of a split-he run with DP noise, from each hospital's spent epsilon.

    The same for the in-process run and the gRPC server (whose hospitals report their epsilon at EndEpoch).
    """
    scfg = cfg.split
    return {
        "epsilon": max(epsilon_per_site, default=0.0),
        "epsilon_per_site": list(epsilon_per_site),
        "delta": scfg.dp_delta,
        "noise_multiplier": scfg.dp_noise_multiplier,
        "max_grad_norm": scfg.dp_max_grad_norm,
        "accountant": "opacus RDP, Poisson sampling per hospital; protects the head updates the server receives",
    }


def full_preset(cfg: RunConfig) -> str:
    """split-he-full's CKKS preset: ``full`` unless split.he_preset names another (checked for one rescale)."""
    return "full" if cfg.split.he_preset == "default" else cfg.split.he_preset


def run_split(fabric: Fabric, cfg: RunConfig, splits: DataSplits, out_dir: Path) -> dict[str, Any]:
    """split-plain / split-he: hospitals hold encoders, data and labels; the server holds the head."""
    fabric.seed_everything(cfg.seed, verbose=False)
    runner = SplitRunner(fabric, cfg, splits, out_dir)
    try:
        result = fit(fabric, runner, cfg, splits, out_dir, cfg.regime)
    finally:
        runner.close()
    plot_learning_curves({cfg.regime: result["history"]}, out_dir / "learning_curves.png", f"{cfg.regime}: {splits.task.name}")
    return {k: v for k, v in result.items() if k != "history"}
