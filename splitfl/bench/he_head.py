"""Side-by-side cost of the encrypted linear head: plaintext vs per-sample CKKS vs batch-packed CKKS.

Everything runs in one process on the same data (batch ``B`` x ``d`` features,
``K`` classes); each time is the median of ``--repeats`` runs after warm-up.

* plaintext: ``F.linear`` alone, and the split-plain round trip in its real
  wire format (``splitfl.tensors``: activations to float32 bytes and
  back, server linear, logits to bytes and back);
* per-sample CKKS (earlier HE split-learning code): one ``CKKSVector`` per
  sample and TenSEAL's ``vector @ W.T`` (rotations, Galois keys); timed on a
  few samples and extrapolated linearly to the batch;
* packed CKKS (this package): hospital encrypt + serialise, server parse +
  forward + serialise, hospital parse + decrypt + reduce; with the weight
  plaintexts cached (same weights) and with fresh weights (encoded in the
  round, as after every optimizer step); plus the server alone, the encrypted
  backward (enc(G) -> enc(G W)) and a full training step.

Headline numbers (``--json``): ``speedup_vs_per_sample`` and
``ratio_to_plaintext`` use the packed forward round *with fresh weights* (the
conservative, training-time number); the ratio's plaintext reference is the
split-plain round trip with serialisation, the like-for-like comparison.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from splitfl.artifacts import write_json
from splitfl.bench.he_steps import FullHEStep, SplitHEStep, StepData
from splitfl.he.encrypted_head import EncryptedLinearHead, FullHeadHospital, FullHeadLayout, full_public_context_bytes
from splitfl.he.keys import SealEngine, create_secret_context, load_public_context, public_context_bytes
from splitfl.he.linear import PackedLinearHE
from splitfl.he.mlp import PackedMLPHE, mlp_public_context_bytes
from splitfl.he.parallel import resolve_workers
from splitfl.he.opcount import PRIMITIVES, OpCounter, OpKey, floor_seconds, format_counts, time_primitives
from splitfl.he.params import get_preset, max_abs_value
from splitfl.he.wire import EncryptedBatch
from splitfl.tensors import tensor_from_bytes, tensor_to_bytes

__all__ = ["main", "run_benchmark", "format_table", "run_mlp_benchmark"]


def _median(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_benchmark(
    batch: int = 64,
    dim: int = 512,
    classes: int = 5,
    preset: str = "default",
    repeats: int = 9,
    per_sample: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure everything; returns the JSON-ready result dict (times in seconds)."""
    params = get_preset(preset)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(dim, classes)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = torch.randn(batch, dim) * 3  # pooled-feature scale: |x| ~ 1-10
    g = torch.randn(batch, classes) / batch
    ref = F.linear(x.double(), w.double(), b.double())
    ref_grad = g.double() @ w.double()
    t: dict[str, float] = {}

    # (a) plaintext ---------------------------------------------------------
    t["plain_compute"], _ = _median(lambda: F.linear(x, w, b), max(200, repeats))

    def plain_round() -> torch.Tensor:
        """split-plain's real wire format (splitfl.tensors): float32 + shape header, checked on receipt."""
        xs = tensor_from_bytes(tensor_to_bytes(x), "activations", (None, dim))  # hospital -> server
        reply = tensor_to_bytes(F.linear(xs, w, b))  # server -> hospital
        return tensor_from_bytes(reply, "logits", (batch, classes))

    t["plain_round"], _ = _median(plain_round, max(200, repeats))
    plain_up = len(tensor_to_bytes(x)) / batch
    plain_down = len(tensor_to_bytes(F.linear(x, w, b))) / batch

    # (c) packed CKKS -------------------------------------------------------
    t0 = time.perf_counter()
    ctx = create_secret_context(params)
    pub = load_public_context(public_context_bytes(ctx))
    t["keygen_packed"] = time.perf_counter() - t0
    head = PackedLinearHE(dim, classes, batch, params.slots)
    sizes: dict[str, int] = {}
    state: dict[str, Any] = {}

    def hospital_encrypt() -> bytes:
        data = head.encrypt_activations(ctx, x).to_bytes()
        sizes["up"] = len(data)
        return data

    def server_forward(data: bytes) -> bytes:
        enc = EncryptedBatch.from_bytes(pub, data, expect_kind="activations", expect_dim=dim)
        out = head.forward(enc, w, b).to_bytes()
        sizes["down"] = len(out)
        return out

    def hospital_decrypt(data: bytes) -> torch.Tensor:
        enc = EncryptedBatch.from_bytes(ctx, data, expect_kind="logits", expect_batch=batch)
        return head.decrypt_logits(ctx, enc, dtype=torch.float64)

    def forward_round() -> None:
        state["logits"] = hospital_decrypt(server_forward(hospital_encrypt()))

    def forward_round_fresh() -> None:
        head.clear_cache()
        forward_round()

    def backward_round() -> None:
        up = head.encrypt_logit_grads(ctx, g).to_bytes()
        enc = EncryptedBatch.from_bytes(pub, up, expect_kind="logit_grads", expect_dim=classes)
        down = head.backward_input(enc, w).to_bytes()
        sizes["grad_up"], sizes["grad_down"] = len(up), len(down)
        back = EncryptedBatch.from_bytes(ctx, down, expect_kind="activation_grads")
        state["grad"] = head.decrypt_activation_grads(ctx, back, dtype=torch.float64)

    def training_step() -> None:
        head.clear_cache()
        forward_round()
        backward_round()

    t["packed_round_fresh"], _ = _median(forward_round_fresh, repeats)
    t["packed_round"], _ = _median(forward_round, repeats)
    up_bytes = hospital_encrypt()
    t["packed_hospital_encrypt"], _ = _median(hospital_encrypt, repeats)
    down_bytes = server_forward(up_bytes)
    t["packed_server"], _ = _median(lambda: server_forward(up_bytes), repeats)
    t["packed_hospital_decrypt"], _ = _median(lambda: hospital_decrypt(down_bytes), repeats)

    def encode_weights() -> None:
        head.clear_cache()
        head.prepare(pub, w)

    t["packed_weight_encode"], _ = _median(encode_weights, repeats)
    t["packed_backward_round"], _ = _median(backward_round, repeats)
    g_up = head.encrypt_logit_grads(ctx, g).to_bytes()
    g_enc = EncryptedBatch.from_bytes(pub, g_up)
    t["packed_backward_server"], _ = _median(lambda: head.backward_input(g_enc, w).to_bytes(), repeats)
    t["packed_training_step"], _ = _median(training_step, repeats)
    forward_round()
    backward_round()
    err = (state["logits"] - ref).abs().max().item()
    grad_err = (state["grad"] - ref_grad).abs().max().item()

    # (b) per-sample CKKS (TenSEAL CKKSVector.mm, rotations) ---------------------
    t0 = time.perf_counter()
    ctx_g = create_secret_context(params, galois=True)
    t["keygen_per_sample"] = time.perf_counter() - t0
    galois_context_bytes = len(public_context_bytes(ctx_g, galois=True))
    wt, bl = w.T.tolist(), b.tolist()
    ps_times, ps_err, ps_up, ps_down = [], 0.0, 0, 0
    for i in range(per_sample + 1):  # the first sample is a warm-up
        t0 = time.perf_counter()
        up = ts.ckks_vector(ctx_g, x[i].tolist()).serialize()
        out = (ts.ckks_vector_from(ctx_g, up).mm(wt) + bl).serialize()  # the server holds the Galois keys
        got = ts.ckks_vector_from(ctx_g, out).decrypt()
        elapsed = time.perf_counter() - t0
        if i:
            ps_times.append(elapsed)
        ps_err = max(ps_err, float(np.abs(np.array(got) - ref[i].numpy()).max()))
        ps_up, ps_down = len(up), len(out)
    t["per_sample_one"] = statistics.median(ps_times)
    t["per_sample_round"] = t["per_sample_one"] * batch  # extrapolated: samples are independent

    ours = t["packed_round_fresh"]
    result: dict[str, Any] = {
        "speedup_vs_per_sample": t["per_sample_round"] / ours,
        "ratio_to_plaintext": ours / t["plain_round"],
        "ratio_to_plaintext_compute_only": ours / t["plain_compute"],
        "bytes_per_sample_up": sizes["up"] / batch,
        "bytes_per_sample_down": sizes["down"] / batch,
        "max_abs_error": err,
        "backward_max_abs_error": grad_err,
        "backward_bytes_per_sample_up": sizes["grad_up"] / batch,
        "backward_bytes_per_sample_down": sizes["grad_down"] / batch,
        "samples_per_s": {
            "plaintext_compute": batch / t["plain_compute"],
            "plaintext_round": batch / t["plain_round"],
            "per_sample_ckks": batch / t["per_sample_round"],
            "packed_fresh_weights": batch / t["packed_round_fresh"],
            "packed_cached_weights": batch / t["packed_round"],
            "packed_server_only": batch / t["packed_server"],
            "packed_backward": batch / t["packed_backward_round"],
            "packed_training_step": batch / t["packed_training_step"],
        },
        "timings_s": t,
        "per_sample": {
            "samples_timed": per_sample,
            "extrapolated_to_batch": True,
            "max_abs_error": ps_err,
            "bytes_per_sample_up": ps_up,
            "bytes_per_sample_down": ps_down,
            "galois_public_context_bytes": galois_context_bytes,
        },
        "plaintext_bytes_per_sample": {"up": plain_up, "down": plain_down},
        "params": {
            "preset": params.name,
            "poly_modulus_degree": params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
            "scale_bits": params.scale_bits,
            "max_abs_value": max_abs_value(params),
            "value_bound": head.input_bound(ctx),
            "layout": repr(head),
        },
        "config": {
            "batch": batch,
            "dim": dim,
            "classes": classes,
            "repeats": repeats,
            "statistic": "median after 2 warm-up runs",
            "headline_round": "packed forward round with fresh weights (weights encoded inside the round)",
            "plaintext_reference": (
                "split-plain round (splitfl.tensors): activations to float32 bytes and back + linear + "
                "logits to bytes and back"
            ),
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tenseal": ts.__version__,
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
    }
    return result


def format_table(r: dict[str, Any]) -> str:
    """Readable table of a :func:`run_benchmark` result."""
    t, c, p = r["timings_s"], r["config"], r["params"]
    b = c["batch"]
    ref_ps, ref_plain = t["per_sample_round"], t["plain_round"]
    ps = r["per_sample"]
    rows = [
        ("plaintext head: F.linear only", t["plain_compute"], None, None, r["plaintext_bytes_per_sample"], None),
        ("plaintext round (+ split-plain bytes)", t["plain_round"], None, None, r["plaintext_bytes_per_sample"], None),
        (
            f"per-sample CKKS, vec.mm(W.T) [{ps['samples_timed']} timed, x{b}]",
            t["per_sample_round"],
            1.0,
            None,
            {"up": ps["bytes_per_sample_up"], "down": ps["bytes_per_sample_down"]},
            ps["max_abs_error"],
        ),
        (
            "packed CKKS round, fresh weights *",
            t["packed_round_fresh"],
            None,
            None,
            {"up": r["bytes_per_sample_up"], "down": r["bytes_per_sample_down"]},
            r["max_abs_error"],
        ),
        ("packed CKKS round, cached weights", t["packed_round"], None, None, None, None),
        ("  hospital: encrypt + serialise", t["packed_hospital_encrypt"], None, None, None, None),
        ("  server: parse + forward + serialise", t["packed_server"], None, None, None, None),
        ("  hospital: parse + decrypt + reduce", t["packed_hospital_decrypt"], None, None, None, None),
        ("  server: encode one weight version", t["packed_weight_encode"], None, None, None, None),
        (
            "packed backward round enc(G)->enc(GW)",
            t["packed_backward_round"],
            None,
            None,
            {"up": r["backward_bytes_per_sample_up"], "down": r["backward_bytes_per_sample_down"]},
            r["backward_max_abs_error"],
        ),
        ("  server: backward only", t["packed_backward_server"], None, None, None, None),
        ("training step: encode + fwd + bwd", t["packed_training_step"], None, None, None, None),
    ]
    head = (
        f"{'':41s} {'ms/batch':>10s} {'samples/s':>11s} {'vs per-smpl':>11s} {'x plain rnd':>11s} "
        f"{'up B/smpl':>10s} {'dn B/smpl':>10s} {'max|err|':>9s}"
    )
    lines = [
        f"HE linear head: B={b}, d={c['dim']}, K={c['classes']}, {p['preset']} (N={p['poly_modulus_degree']}, "
        f"{p['coeff_mod_bit_sizes']}, scale 2^{p['scale_bits']}); {p['layout']}",
        head,
        "-" * len(head),
    ]
    for name, sec, _, _, nbytes, err in rows:
        up = f"{nbytes['up']:10.0f}" if nbytes else f"{'':10s}"
        down = f"{nbytes['down']:10.0f}" if nbytes else f"{'':10s}"
        lines.append(
            f"{name:41s} {sec * 1e3:10.3f} {b / sec:11.0f} {ref_ps / sec:10.0f}x {sec / ref_plain:10.1f}x "
            f"{up} {down} {'' if err is None else f'{err:9.1e}'}"
        )
    lines += [
        "",
        f"* headline: speedup vs per-sample {r['speedup_vs_per_sample']:.0f}x, "
        f"{r['ratio_to_plaintext']:.0f}x the plaintext round with serialisation "
        f"({r['ratio_to_plaintext_compute_only']:.0f}x F.linear alone); "
        f"{r['bytes_per_sample_up']:.0f} B up + {r['bytes_per_sample_down']:.0f} B down per sample.",
        "  Per-sample CKKS is extrapolated linearly from the timed samples; it also needs Galois keys "
        f"({ps['galois_public_context_bytes'] / 1e6:.1f} MB public context vs none for the packed head).",
        f"  Times: median of {c['repeats']} runs after 2 warm-ups; one process, "
        f"{r['environment']['torch_threads']} torch thread(s).",
    ]
    return "\n".join(lines)


def run_mlp_benchmark(batch: int, dim: int, classes: int, hidden: int, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """The encrypted MLP head (square activation, 'deep' preset) against the same head in torch."""

    params = get_preset("deep")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g).clamp(-4, 4)
    w1, b1 = torch.randn(hidden, dim, generator=g) * 0.05, torch.randn(hidden, generator=g) * 0.05
    w2, b2 = torch.randn(classes, hidden, generator=g) * 0.05, torch.randn(classes, generator=g) * 0.05

    def plain() -> torch.Tensor:
        return F.linear(F.linear(x, w1, b1).square(), w2, b2)

    secret = create_secret_context(params)
    head = PackedMLPHE(dim, hidden, classes, batch, params.slots, (0.0, 0.0, 1.0))
    server_ctx = load_public_context(mlp_public_context_bytes(secret, head.rotation_steps()))
    out: dict[str, torch.Tensor] = {}

    def encrypted_round() -> None:
        enc = EncryptedBatch.from_bytes(server_ctx, head.encrypt_activations(secret, x).to_bytes())
        reply = head.forward(enc, w1, b1, w2, b2).to_bytes()
        out["logits"] = head.decrypt_logits(secret, EncryptedBatch.from_bytes(secret, reply))

    t_plain, _ = _median(plain, max(repeats, 9))
    t_he, _ = _median(encrypted_round, repeats, warmup=1)
    return {
        "hidden": hidden,
        "preset": params.name,
        "plaintext_seconds": t_plain,
        "packed_round_seconds": t_he,
        "ratio_to_plaintext": t_he / t_plain,
        "samples_per_second": batch / t_he,
        "rotation_steps": len(head.rotation_steps()),
        "max_abs_error": float((out["logits"] - plain()).abs().max()),
    }


def _plain_step_seconds(data: StepData, repeats: int) -> float:
    """split-plain's training step of the same head: float32 tensors on the wire, the server's torch head."""
    w, b, x, lr, (n, k) = data.w0.clone(), data.b0.clone(), data.x, data.lr, (data.batch, data.classes)

    def step() -> None:
        nonlocal w, b
        xs = tensor_from_bytes(tensor_to_bytes(x), "activations", (None, data.dim)).double()
        logits = tensor_from_bytes(tensor_to_bytes(F.linear(xs, w, b)), "logits", (n, k))
        gs = tensor_from_bytes(tensor_to_bytes(data.logit_grad(logits)), "logit grads", (n, k)).double()
        tensor_from_bytes(tensor_to_bytes(gs @ w), "activation grads", (n, data.dim))
        w, b = w - lr * gs.T @ xs, b - lr * gs.sum(0)

    return _median(step, max(repeats, 20))[0]


def _floor_of(runner: SplitHEStep | FullHEStep, repeats: int) -> tuple[dict[str, float], dict[OpKey, list[bytes]],
                                                                        dict[str, Counter]]:
    """Count each part's primitives once (OpCounter), time the parts (median), then the unit costs of all of them."""
    counts: dict[str, Counter] = {}
    samples: dict[OpKey, list[bytes]] = {}
    measured: dict[str, float] = {}
    for name, fn in runner.parts().items():
        fn()  # warm-up, and the weights' first update
        with OpCounter(*runner.engines) as counter:
            fn()
        counts[name], samples = counter.counts, {**samples, **counter.load_samples}
        measured[name] = _median(fn, repeats, warmup=0)[0]
    return measured, samples, counts  # type: ignore[return-value]


def _unit_costs(secret: SealEngine, keys: set[OpKey], samples: dict[OpKey, list[bytes]],
                repeats: int) -> dict[OpKey, float]:
    """Unit cost of every counted primitive, and of each primitive of the issue's list at the top level."""
    top = secret.levels
    reference = {OpKey(p, top, 0 if p in ("encode", "decode") else 2, p == "encrypt")
                 for p in PRIMITIVES if p != "encrypt_public"}
    reference |= {OpKey("serialise", top, 2, True), OpKey("deserialise", top, 2, True)}
    keygen = sa.KeyGenerator(secret.context, secret.secret_key)
    relin, galois = sa.RelinKeys(), sa.GaloisKeys()
    keygen.create_relin_keys(relin)  # this key's own evaluation keys (a key switch costs the same under any key)
    elts = secret.context.key_context_data().galois_tool().get_elts_from_steps([1])
    keygen.create_galois_keys(elts, galois)  # rotation is timed for the table (neither protocol rotates)
    return time_primitives(secret, keys | reference, relin=relin, galois=galois, load_samples=samples,
                           repeats=repeats)


def _unit_rows(unit: dict[OpKey, float]) -> list[dict[str, Any]]:
    return [{"primitive": k.primitive, "level": k.level, "size": k.size, "seeded": k.seeded, "unit_ms": v * 1e3}
            for k, v in sorted(unit.items(), key=lambda kv: (PRIMITIVES.index(kv[0].primitive), kv[0]))]


def _floor_rows(measured: dict[str, float], counts: dict[str, Counter], unit: dict[OpKey, float]) -> dict[str, Any]:
    out = {}
    for name, sec in measured.items():
        floor = floor_seconds(counts[name], unit)
        out[name] = {"measured_ms": sec * 1e3, "floor_ms": floor * 1e3, "ratio_to_floor": sec / floor,
                     "primitives": format_counts(counts[name], unit)}
    return out


def run_full_benchmark(batch: int = 64, dim: int = 512, classes: int = 5, repeats: int = 5, seed: int = 0,
                       lr: float = 0.05, check_steps: int = 100) -> dict[str, Any]:
    """One training step of the head (forward, loss gradient, backward with dL/dx, SGD update), side by side,
    each beside its CKKS floor:

    * split-plain: float32 tensors on the wire, the server's torch head;
    * split-he: activations and logit gradients encrypted, plaintext weights; the server applies the
      hospital's batch-aggregated plaintext update and encodes the new weights;
    * split-he-full: weights encrypted too; the hospital sends ``enc(lr dL/dW)`` in the weights' layout.

    The floor of a step is the sum over the CKKS primitives it runs (counted by :class:`OpCounter` on the real
    code) of count x the primitive's unit cost, timed alone in the same run. After the timing the encrypted
    head is trained up to ``check_steps`` steps on the batch and compared with plaintext SGD.
    """
    data = StepData(dim, classes, batch, seed, lr)
    t_plain = _plain_step_seconds(data, repeats)
    he, full = SplitHEStep(data), FullHEStep(data)
    he_measured, he_samples, he_counts = _floor_of(he, repeats)
    full_measured, full_samples, full_counts = _floor_of(full, repeats)
    he_unit = _unit_costs(he.engines[0], {k for c in he_counts.values() for k in c}, he_samples, max(repeats, 48))
    full_unit = _unit_costs(full.engines[0], {k for c in full_counts.values() for k in c}, full_samples,
                            max(repeats, 48))
    he_rows, full_rows = _floor_rows(he_measured, he_counts, he_unit), _floor_rows(full_measured, full_counts, full_unit)
    while full.server.updates < check_steps:
        full.step()
    t_he, t_full = he_measured["step"], full_measured["step"]
    up = full.bytes["activations"] + full.bytes["logit_grads"] + full.bytes["update"]
    down = full.bytes["logits"] + full.bytes["activation_grads"]
    he_up = sum(he.bytes[k] for k in ("activations", "logit_grads", "update"))
    he_down = he.bytes["logits"] + he.bytes["activation_grads"]
    lay = full.layout
    return {
        "split_plain_step_s": t_plain,
        "split_he_step_s": t_he,
        "split_he_full_step_s": t_full,
        "full_vs_split_he": t_full / t_he,
        "full_vs_split_plain": t_full / t_plain,
        "floor_ms": he_rows["step"]["floor_ms"],
        "ratio_to_floor": he_rows["step"]["ratio_to_floor"],
        "full_floor_ms": full_rows["step"]["floor_ms"],
        "full_ratio_to_floor": full_rows["step"]["ratio_to_floor"],
        "floor": {"split_he": he_rows, "split_he_full": full_rows,
                  "unit_ms": {"split_he": _unit_rows(he_unit), "split_he_full": _unit_rows(full_unit)},
                  "presets": {"split_he": he.params.describe(), "split_he_full": full.params.describe()}},
        "split_he_bytes_per_sample_up": he_up / batch,
        "split_he_bytes_per_sample_down": he_down / batch,
        "full_bytes_per_sample_up": up / batch,
        "full_bytes_per_sample_down": down / batch,
        "full_bytes_per_step": dict(full.bytes),
        "full_weight_error_after_steps": full.weight_error(),
        "full_steps_checked": full.server.updates,
        "full_preset": full.params.describe(),
        "full_layout": {"features_per_block": lay.features_per_block, "blocks": lay.n_blocks, "class_pairs": lay.pairs,
                        "weight_ciphertexts": lay.pairs * lay.n_blocks, "rotations_per_step": 0},
    }


def run_sweep(dims: Sequence[int], classes: Sequence[int], batches: Sequence[int], repeats: int = 3,
              seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """samples/s of a split-he and a split-he-full training step (with dL/dx) at each width, class count, batch."""
    rows = []
    grid = [(d, k, b) for b in batches for k in classes for d in dims]
    for d, k, b in tqdm(grid, desc="he-head sweep", disable=not progress):
        data = StepData(d, k, b, seed)
        he, full = SplitHEStep(data), FullHEStep(data)
        t_he = _median(he.step, repeats, warmup=1)[0]
        t_full = _median(full.step, repeats, warmup=1)[0]
        rows.append({"dim": d, "classes": k, "batch": b, "split_he_step_s": t_he, "split_he_full_step_s": t_full,
                     "split_he_samples_per_s": b / t_he, "split_he_full_samples_per_s": b / t_full,
                     "full_vs_split_he": t_full / t_he,
                     "full_weight_ciphertexts": full.layout.pairs * full.layout.n_blocks,
                     "full_bytes_per_sample_up": (full.bytes["activations"] + full.bytes["logit_grads"]
                                                  + full.bytes["update"]) / b})
    return rows


def run_parallel(shapes: Sequence[tuple[int, int, int]], workers: int, repeats: int = 5,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Each training step in one process and with ``workers`` processes per party, side by side, per shape.

    split-he: the hospital's encryptions and decryptions and the server's products are split over classes;
    split-he-full: the hospital's encryptions (the update's are most of the step) and decryptions.
    """
    rows = []
    for d, k, b in shapes:
        data = StepData(d, k, b, seed)
        row: dict[str, Any] = {"dim": d, "classes": k, "batch": b, "workers": workers}
        for name, make in (("split_he", lambda n: SplitHEStep(data, workers=n)),
                           ("split_he_full", lambda n: FullHEStep(data, workers=n))):
            one, many = make(1), make(workers)
            try:
                t1, tn = [], []
                for _ in range(repeats + 1):  # alternate, so machine noise hits both alike; the first is warm-up
                    for runner, times in ((one, t1), (many, tn)):
                        t0 = time.perf_counter()
                        runner.step()
                        times.append(time.perf_counter() - t0)
            finally:
                many.close()
            row[f"{name}_one_process_s"], row[f"{name}_workers_s"] = statistics.median(t1[1:]), statistics.median(tn[1:])
            row[f"{name}_speedup"] = row[f"{name}_one_process_s"] / row[f"{name}_workers_s"]
        rows.append(row)
    return rows


def format_parallel(rows: list[dict[str, Any]]) -> str:
    lines = [f"Training step in one process vs {rows[0]['workers']} worker processes per party (median, alternating runs)"]
    for r in rows:
        lines.append(f"  d={r['dim']} K={r['classes']} batch {r['batch']}: split-he {r['split_he_one_process_s'] * 1e3:.0f} -> "
                     f"{r['split_he_workers_s'] * 1e3:.0f} ms ({r['split_he_speedup']:.2f}x), split-he-full "
                     f"{r['split_he_full_one_process_s'] * 1e3:.0f} -> {r['split_he_full_workers_s'] * 1e3:.0f} ms "
                     f"({r['split_he_full_speedup']:.2f}x)")
    return "\n".join(lines)


def format_sweep(rows: list[dict[str, Any]]) -> str:
    head = (f"{'d':>5s} {'K':>3s} {'batch':>5s} {'split-he ms':>11s} {'samples/s':>9s} {'full ms':>8s} "
            f"{'samples/s':>9s} {'full/he':>7s} {'enc(W) cts':>10s} {'full up KB/smpl':>15s}")
    lines = ["Training step (forward, dL/dx, update) by width, classes and batch; default preset", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['dim']:5d} {r['classes']:3d} {r['batch']:5d} {r['split_he_step_s'] * 1e3:11.1f} "
                     f"{r['split_he_samples_per_s']:9.0f} {r['split_he_full_step_s'] * 1e3:8.1f} "
                     f"{r['split_he_full_samples_per_s']:9.0f} {r['full_vs_split_he']:7.2f} "
                     f"{r['full_weight_ciphertexts']:10d} {r['full_bytes_per_sample_up'] / 1e3:15.1f}")
    return "\n".join(lines)


def format_floor(full: dict[str, Any]) -> str:
    """The floor table: each protocol part, measured beside count x unit cost, and the unit costs."""
    lines = ["", "CKKS floor (sum over the primitives a part runs of count x unit cost, both timed in this run)",
             f"{'':32s} {'measured ms':>11s} {'floor ms':>9s} {'ratio':>6s}  primitives (count)"]
    for proto, label in (("split_he", "split-he"), ("split_he_full", "split-he-full")):
        for part, row in full["floor"][proto].items():
            prims = Counter()
            for p in row["primitives"]:
                prims[p["primitive"]] += p["count"]
            summary = ", ".join(f"{p} {n}" for p, n in prims.items())
            lines.append(f"{label + ' ' + part:32s} {row['measured_ms']:11.1f} {row['floor_ms']:9.1f} "
                         f"{row['ratio_to_floor']:6.2f}  {summary}")
    for proto, label in (("split_he", "split-he"), ("split_he_full", "split-he-full")):
        lines.append(f"unit costs, {full['floor']['presets'][proto]} (ms; @L level, x3 three polynomials, s seeded): "
                     + ", ".join(f"{u['primitive']}@L{u['level']}{'x3' if u['size'] == 3 else ''}"
                                 f"{'s' if u['seeded'] else ''} {u['unit_ms']:.3f}" for u in full["floor"]["unit_ms"][proto]))
    return "\n".join(lines)


def run_full_drift(updates: int = 3000, dim: int = 32, classes: int = 2, batch: int = 8, lr: float = 0.01,
                   check_every: int = 500, seed: int = 0) -> dict[str, Any]:
    """How far the encrypted weights drift from plaintext SGD over many updates, without any refresh.

    The gradients are fixed random ones (the drift is the CKKS noise of the update path, not the model), so
    the plaintext reference is exact. Small head: thousands of updates take a few minutes.
    """

    params = get_preset("full")
    ctx = create_secret_context(params)
    layout = FullHeadLayout(dim, classes, batch, params.slots)
    pub = load_public_context(full_public_context_bytes(ctx, layout))
    hospital = FullHeadHospital(ctx, layout)
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(classes, dim, generator=g, dtype=torch.float64) * 0.1, torch.zeros(classes, dtype=torch.float64)
    server = EncryptedLinearHead(pub, layout, hospital.encrypt_weights(w, b), refresh_every=10**9)
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(1, updates + 1):
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        grad = torch.randn(batch, classes, generator=g, dtype=torch.float64) / batch
        server.forward(hospital.encrypt_activations(x))
        server.backward(hospital.encrypt_update(grad, x, lr), input_grad=False)
        w, b = w - lr * grad.T @ x, b - lr * grad.sum(0)
        if step % check_every == 0 or step == updates:
            dw, db = hospital.decrypt_weights(server.export_weights())
            curve.append({"updates": step, "max_abs_error": float(max((dw - w).abs().max(), (db - b).abs().max())),
                          "max_abs_weight": float(w.abs().max())})
    return {"updates": updates, "seconds": time.perf_counter() - t0, "curve": curve,
            "layout": {"dim": dim, "classes": classes, "batch": batch}, "preset": params.describe()}



def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--preset", default="default", help="CKKS preset (splitfl.he.PRESETS)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per measurement (median)")
    parser.add_argument("--per-sample", type=int, default=2, help="samples timed for the per-sample baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mlp-hidden", type=int, default=16, help="also time the encrypted MLP head (0: skip)")
    parser.add_argument("--full-drift", type=int, default=0, metavar="N",
                        help="also train a small encrypted head for N updates without refresh and print its drift")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a training step of split-plain, split-he and split-he-full side by side, "
                             "each beside its CKKS floor")
    parser.add_argument("--check-steps", type=int, default=100,
                        help="encrypted split-he-full steps after which its head is compared with plaintext SGD")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time each training step with this many CKKS worker processes per party beside one "
                             "process (0: every core; 1: skip)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=False,
                        help="also time both training steps at every width x classes x batch below")
    parser.add_argument("--sweep-dims", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--sweep-classes", type=int, nargs="+", default=[2, 5, 9])
    parser.add_argument("--sweep-batches", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # SEAL is single-threaded; the hospital's small torch ops would only contend for cores
    result = run_benchmark(
        batch=args.batch,
        dim=args.dim,
        classes=args.classes,
        preset=args.preset,
        repeats=args.repeats,
        per_sample=args.per_sample,
        seed=args.seed,
    )
    print(format_table(result))
    if args.mlp_hidden > 0:
        mlp = run_mlp_benchmark(args.batch, args.dim, args.classes, args.mlp_hidden, seed=args.seed)
        result["mlp_head"] = mlp
        print(
            f"\nMLP head {args.dim}->{args.mlp_hidden}->{args.classes} (square activation, {mlp['preset']} preset, "
            f"{mlp['rotation_steps']} rotation steps per hidden unit): encrypted round {mlp['packed_round_seconds'] * 1e3:.0f} ms "
            f"({mlp['samples_per_second']:.0f} samples/s), plaintext {mlp['plaintext_seconds'] * 1e3:.3f} ms, "
            f"max abs error {mlp['max_abs_error']:.1e}"
        )
    if args.full:
        full = run_full_benchmark(args.batch, args.dim, args.classes, repeats=max(5, args.repeats // 2), seed=args.seed,
                                  check_steps=args.check_steps)
        result["full_head"] = full
        for key in ("floor_ms", "ratio_to_floor", "full_floor_ms", "full_ratio_to_floor", "full_vs_split_he"):
            result[key] = full[key]
        print(
            f"\nTraining step of the head (batch {args.batch}, {args.dim}->{args.classes}; forward, backward with dL/dx, "
            f"SGD update): split-plain {full['split_plain_step_s'] * 1e3:.2f} ms, split-he {full['split_he_step_s'] * 1e3:.0f} ms, "
            f"split-he-full {full['split_he_full_step_s'] * 1e3:.0f} ms = {full['full_vs_split_he']:.2f}x split-he, "
            f"{full['full_vs_split_plain']:.0f}x split-plain; split-he-full {full['full_bytes_per_sample_up'] / 1e3:.0f} KB up + "
            f"{full['full_bytes_per_sample_down'] / 1e3:.0f} KB down per sample (split-he "
            f"{full['split_he_bytes_per_sample_up'] / 1e3:.0f} + {full['split_he_bytes_per_sample_down'] / 1e3:.0f}); "
            f"weights after {full['full_steps_checked']} encrypted steps off plaintext SGD by "
            f"{full['full_weight_error_after_steps']:.1e} ({full['full_layout']['rotations_per_step']} rotations per step)"
        )
        print(format_floor(full))
        print(f"headline: split-he training step {full['ratio_to_floor']:.2f}x its floor ({full['floor_ms']:.1f} ms), "
              f"split-he-full {full['full_ratio_to_floor']:.2f}x its floor ({full['full_floor_ms']:.1f} ms), "
              f"split-he-full / split-he {full['full_vs_split_he']:.2f}")
    workers = resolve_workers(args.workers)
    if workers > 1:
        shapes = [(args.dim, args.classes, args.batch), (1024, 9, 256)]
        par = run_parallel(shapes, workers, seed=args.seed)
        result["parallel"] = par
        print("\n" + format_parallel(par))
    if args.sweep:
        rows = run_sweep(args.sweep_dims, args.sweep_classes, args.sweep_batches, repeats=3, seed=args.seed)
        result["sweep"] = rows
        print("\n" + format_sweep(rows))
    if args.full_drift > 0:
        drift = run_full_drift(args.full_drift)
        result["full_head_drift"] = drift
        points = ", ".join(f"{p['updates']}: {p['max_abs_error']:.1e}" for p in drift["curve"])
        print(f"\nsplit-he-full drift from plaintext SGD without refresh (max |error| after N updates): {points} "
              f"({drift['seconds']:.0f} s)")
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return result
