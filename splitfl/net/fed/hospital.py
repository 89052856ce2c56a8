"""A hospital (site) of a federation: :class:`FedSiteClient` and its loop.

:class:`FedSiteClient` joins (and rejoins, with backoff, while the server is away or has forgotten its
session), long-polls ``GetRound``, downloads the global model when sampled, trains locally with
:class:`splitfl.fed.site.Site`, packages the update with :func:`splitfl.fed.site.package_update` and submits
it; under ``fed.secure: masks`` it runs its side of the secure aggregation (``SecAggSubmit`` /
``SecAggFetch``), and under ``fed.secure: he`` it decrypts the round's aggregate when asked. Its DP accountant,
top-k residual and place in the run persist in ``<out>/site_state.pt``. The hospital holds the data and the
consortium's secret key, and imports nothing of the server's side: all it knows of the server is the wire
(:mod:`~splitfl.net.fed.common`).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import grpc
import numpy as np
import torch

from splitfl.artifacts import save_checkpoint
from splitfl.config import RunConfig
from splitfl.data import load_splits, partition_dataset
from splitfl.fed import secagg as sa
from splitfl.fed.aggregate import check_update
from splitfl.fed.compress import TopKCompressor
from splitfl.fed.flat import FlatSpec
from splitfl.fed.server import build_fed_model, vector_bytes, vector_from_bytes
from splitfl.fed.site import Site, package_update
from splitfl.he.aggregation import decrypt_aggregate
from splitfl.he.keys import load_secret_context
from splitfl.metrics import make_loss
from splitfl.net import DEFAULT_CHUNK_SIZE, assemble, split_payload
from splitfl.net.fed.client import FedClient, RemoteError
from splitfl.net.fed.common import _context_fp, default_run_id, run_fingerprint
from splitfl.net.proto import splitfl_pb2 as pb

SITE_STATE = "site_state.pt"
# Test-only: a site SIGKILLs itself right after sending this secure-aggregation message (see splitfl.net.fed's docstring).
DIE_AFTER_ENV = "SPLITFL_TEST_SECAGG_DIE_AFTER"


class FedSiteClient(FedClient):
    """One hospital: joins the federation, trains when sampled, submits its update; retries while the server is away.

    The RPCs are :class:`~splitfl.net.fed.client.FedClient`'s (the torch-free wire client the load benchmark also runs).
    """

    def __init__(
        self,
        cfg: RunConfig,
        site: int,
        channel: grpc.Channel,
        out_dir: str | Path,
        *,
        run_id: Optional[str] = None,
        secret_key_file: Optional[str | Path] = None,
        connect_timeout: float = 120.0,
        log: Callable[[str], Any] = print,
    ) -> None:
        super().__init__(channel, site, run_id or default_run_id(cfg), run_fingerprint(cfg))
        self.cfg, self.log = cfg, log
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.connect_timeout = connect_timeout
        splits = load_splits(cfg.data)
        parts = partition_dataset(splits.train, cfg.data.partition)
        if not 0 <= site < len(parts):
            raise ValueError(f"site {site} is not one of the {len(parts)} sites of the partition")
        self.device = torch.device("cpu")
        self.model = build_fed_model(cfg, splits.task.num_outputs, splits.task.n_channels).to(self.device)
        self.spec = FlatSpec(self.model)
        self.trainer = Site(site, parts[site], cfg, make_loss(splits.task), self.device)
        fed = cfg.fed
        self.compressor = TopKCompressor(self.spec.size, fed.topk_fraction) if fed.secure == "none" and fed.topk_fraction > 0 else None
        self.he_mask = self.spec.select(fed.he_layers) if fed.secure == "he" else None
        self.secret_ctx = None
        self.context_fp = b""
        if fed.secure == "he":
            if secret_key_file is None or not Path(secret_key_file).is_file():
                raise FileNotFoundError(f"fed.secure: he: the consortium's secret key file {secret_key_file} is missing")
            self.secret_ctx = load_secret_context(secret_key_file)
            self.context_fp = _context_fp(self.secret_ctx)
        self.next_round = 0
        self.rounds_trained: list[int] = []
        self._load_state()

    # ------------------------------------------------------------------ persistence (DP accountant, top-k residual)

    def _load_state(self) -> None:
        path = self.out_dir / SITE_STATE
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("run_id") == self.run_id:
                self.trainer.load_state_dict(state["site"])
                if self.compressor is not None and state.get("residual") is not None:
                    self.compressor.residual = np.asarray(state["residual"], dtype=np.float32)
                self.next_round = int(state["next_round"])
                self.rounds_trained = list(state.get("rounds_trained", []))

    def _save_state(self) -> None:
        save_checkpoint(
            self.out_dir / SITE_STATE,
            {
                "run_id": self.run_id,
                "site": self.trainer.state_dict(),
                "residual": self.compressor.residual if self.compressor is not None else None,
                "next_round": self.next_round,
                "rounds_trained": self.rounds_trained,
            },
        )

    # ------------------------------------------------------------------ calls

    def join(self) -> pb.FedRunInfo:
        run = self.open_session(len(self.trainer), self.context_fp)
        self.next_round = 0  # a new session (perhaps a restarted server): ask for whatever round is open
        self.log(f"[site {self.site}] joined run {self.run_id} ({len(self.trainer)} samples)")
        return run

    def _retrying(self, fn: Callable[[], Any], rejoin: bool = True) -> Any:
        """Run ``fn``; while the server is unreachable (or has forgotten our session) rejoin with backoff."""
        delay, since = 0.2, None
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                e = RemoteError.from_rpc(err)
                transient = e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
                if not transient and e.error_code != pb.ERROR_CODE_UNKNOWN_SESSION:
                    raise e from None
                since = since or time.monotonic()
                if time.monotonic() - since > self.connect_timeout:
                    raise RemoteError(e.code, f"server unreachable for {self.connect_timeout:.0f} s: {e.message}", e.detail) from None
                self.log(f"[site {self.site}] {e.code.name}: {e.message[:120]}; retrying in {delay:.1f} s")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                if rejoin:
                    try:
                        self.join()
                    except grpc.RpcError:
                        pass

    # ------------------------------------------------------------------ the loop

    def run(self, poll_ms: int = 5000) -> list[int]:
        """Take part until the server says the run is over; the rounds this site trained."""
        self._retrying(self.join, rejoin=False)
        while True:
            info: pb.RoundInfo = self._retrying(
                lambda: self.get_round(self.next_round, poll_ms))
            if info.state == pb.ROUND_STATE_FINISHED:
                self.log(f"[site {self.site}] the run is over; trained rounds {[r + 1 for r in self.rounds_trained]}")
                return self.rounds_trained
            if info.decrypt_aggregate:
                self._retrying(lambda info=info: self._decrypt(info))
                continue
            if info.state != pb.ROUND_STATE_TRAINING or info.round < self.next_round:
                continue
            if info.sampled:
                try:
                    self._retrying(lambda info=info: self._train_round(info))
                except RemoteError as e:
                    if e.error_code in (pb.ERROR_CODE_DEADLINE_PASSED, pb.ERROR_CODE_OUT_OF_ORDER, pb.ERROR_CODE_NOT_SAMPLED):
                        self.log(f"[site {self.site}] round {info.round + 1}: {e.message}")
                    else:
                        raise
            self.next_round = info.round + 1
            self._save_state()

    def _train_round(self, info: pb.RoundInfo) -> None:
        r = info.round
        flat = vector_from_bytes(self.download(r, pb.MODEL_PART_GLOBAL_MODEL), "global model", self.spec.size)
        self.spec.load_into(self.model, flat)
        update, loss = self.trainer.train(self.model, self.spec, flat, r, info.lr)
        n_k = len(self.trainer)
        if self.cfg.fed.secure == "masks":
            self._masked_update(r, update, n_k, loss)
            return
        meta = pb.UpdateMeta(round=r, sample_count=n_k, train_loss=loss)
        if self.trainer.dp:
            meta.epsilon = self.trainer.epsilon()
        try:
            plain, enc = package_update(
                self.cfg, update, n_k, size=self.spec.size, he_mask=self.he_mask, secret_ctx=self.secret_ctx,
                value_bound=info.he_value_bound or None, compressor=self.compressor,
            )
        except (ValueError, RuntimeError) as exc:
            self.log(f"[site {self.site}] round {r + 1}: update could not be packaged: {exc}")
            return
        if self.cfg.fed.secure == "he":
            parts = [(pb.UPDATE_ENCODING_FLOAT32, plain), (pb.UPDATE_ENCODING_CKKS, enc)]
        elif self.compressor is not None:
            parts = [(pb.UPDATE_ENCODING_TOPK, plain)]
        else:
            parts = [(pb.UPDATE_ENCODING_FLOAT32, plain)]
        resp = self.submit(meta, parts)
        self.rounds_trained.append(r)
        self.log(f"[site {self.site}] round {r + 1}: loss {loss:.4f}, update {'accepted' if resp.accepted else 'refused: ' + resp.reason}")

    def sa_submit(self, r: int, kind: int, blob: bytes, **meta: Any) -> pb.SecAggSubmitResponse:
        def messages() -> Iterator[pb.SecAggSubmitRequest]:
            yield pb.SecAggSubmitRequest(header=self.header(), meta=pb.SecAggSubmitMeta(round=r, type=kind, **meta))
            for chunk in split_payload(blob, DEFAULT_CHUNK_SIZE):
                yield pb.SecAggSubmitRequest(chunk=chunk)

        resp = self.stub.SecAggSubmit(messages(), timeout=600)
        step = {pb.SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS: "advertise_keys", pb.SECAGG_MESSAGE_TYPE_SHARE_KEYS: "share_keys",
                pb.SECAGG_MESSAGE_TYPE_MASKED_INPUT: "masked_input"}.get(kind)
        if step is not None and os.environ.get(DIE_AFTER_ENV) == step:  # test hook: a hospital lost mid-round
            self.log(f"[site {self.site}] round {r + 1}: {DIE_AFTER_ENV}={step}: dying now")
            os.kill(os.getpid(), signal.SIGKILL)
        return resp

    def sa_fetch(self, r: int, kind: int, patience_s: float) -> bytes:
        """Long-poll the server's next secure-aggregation message for this site."""
        deadline = time.monotonic() + patience_s
        while True:
            responses = iter(self.stub.SecAggFetch(pb.SecAggFetchRequest(header=self.header(), round=r, type=kind, max_wait_ms=5000), timeout=60))
            first = next(responses)
            if first.status.ready:
                return assemble((m.chunk for m in responses), 1 << 40)
            if time.monotonic() > deadline:
                raise RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, f"secure-aggregation message {kind} of round {r + 1} never came")

    def _masked_update(self, r: int, update: np.ndarray, n_k: int, loss: float) -> None:
        """fed.secure masks: the four-step exchange of Bonawitz et al. (splitfl/fed/secagg/) for this round."""

        problem = check_update(update, self.spec.size)
        if problem:  # the site's own software screens it before masking; the server sees a dropout
            self.log(f"[site {self.site}] round {r + 1}: not sending a bad update ({problem})")
            return
        patience = 3600.0
        client = sa.SecAggClient(self.site, r)
        self.sa_submit(r, pb.SECAGG_MESSAGE_TYPE_ADVERTISE_KEYS, client.advertise_keys().to_bytes())
        broadcast = sa.KeyBroadcast.from_bytes(self.sa_fetch(r, pb.SECAGG_MESSAGE_TYPE_KEY_BROADCAST, patience))
        self.sa_submit(r, pb.SECAGG_MESSAGE_TYPE_SHARE_KEYS, client.share_keys(broadcast).to_bytes())
        delivery = sa.ShareDelivery.from_bytes(self.sa_fetch(r, pb.SECAGG_MESSAGE_TYPE_SHARE_DELIVERY, patience))
        extra: dict[str, Any] = {"sample_count": n_k, "train_loss": loss}
        if self.trainer.dp:
            extra["epsilon"] = self.trainer.epsilon()
        masked = client.masked_input(delivery, float(n_k) * update)
        self.sa_submit(r, pb.SECAGG_MESSAGE_TYPE_MASKED_INPUT, masked.to_bytes(), **extra)
        request = sa.UnmaskRequest.from_bytes(self.sa_fetch(r, pb.SECAGG_MESSAGE_TYPE_UNMASK_REQUEST, patience))
        self.sa_submit(r, pb.SECAGG_MESSAGE_TYPE_UNMASK_RESPONSE, client.unmask(request).to_bytes())
        self.rounds_trained.append(r)
        self.log(f"[site {self.site}] round {r + 1}: loss {loss:.4f}, masked update sent and unmasked")

    def _decrypt(self, info: pb.RoundInfo) -> None:
        r = info.round
        summed = self.download(r, pb.MODEL_PART_ENCRYPTED_AGGREGATE)
        mean, total = decrypt_aggregate(self.secret_ctx, summed, int(self.he_mask.sum()))
        resp = self.submit(pb.UpdateMeta(round=r, sample_count=int(round(total))), [(pb.UPDATE_ENCODING_DECRYPTED_MEAN, vector_bytes(mean))])
        self.log(f"[site {self.site}] round {r + 1}: decrypted the aggregate of {total:.0f} samples ({'accepted' if resp.accepted else resp.reason})")
