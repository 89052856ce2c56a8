"""``splitfl attack`` with ``attack.server: malicious``: every active attack of a config, one table.

A curious server (:mod:`attacks.harness`) follows the protocol and attacks what it recorded. A malicious
one deviates from the protocol to make the hospitals leak, while the hospitals run splitfl's own,
unmodified code. Each variant of the config names its attack (``attack:``; by default imprint for
``fedavg``, fsha for the split regimes):

* ``imprint`` (:mod:`attacks.malicious_fed`): the FedAvg server broadcasts a crafted global model
  (Fowl et al., ICLR 2022). The variant's overrides choose the regime: ``fed.secure: he`` is
  ``fedavg+he``, DP noise (``fed.dp_noise_multiplier`` or ``fed.dp_target_epsilon``) is ``fedavg+dp``,
  neither is ``fedavg``; ``fed.model_guard`` is the hospitals' check of the model they receive;
* ``fsha`` (:mod:`attacks.fsha`): the split server returns crafted gradients that hijack the hospitals'
  encoder (Pasquini et al., CCS 2021), on ``split-plain``, ``split-he`` or ``split-he-full``;
* ``labels`` (:mod:`attacks.label_inference`): the split server crafts its head so the returned
  gradients give the labels away, on the same three regimes.

Per variant: ``OUT/NAME/`` holds the attack's own files (``leakage.json`` or ``labels.json``, montages)
and ``active.json`` (its table row and the fingerprint of the config that produced it: a rerun reuses
every variant whose config did not change). Across variants: ``OUT/leakage_summary.{md,csv,json,png}``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

from attacks.config import AttackConfig
from attacks.fsha import run_fsha
from attacks.label_inference import run_label_inference
from attacks.malicious_fed import run_imprint_attack
from attacks.malicious_split import SPLIT_REGIMES
from attacks.plots import plot_active_summary
from splitfl.artifacts import to_jsonable, write_csv, write_json, write_text
from splitfl.config import RunConfig
from splitfl.variants import CompareError, Variant, plan

ACTIVE_FILE = "active.json"
# Which regimes each active attack is built for.
ATTACK_REGIMES: dict[str, tuple[str, ...]] = {"imprint": ("fedavg",), "fsha": SPLIT_REGIMES, "labels": SPLIT_REGIMES}
DEFAULT_ATTACK = {"fedavg": "imprint", **{r: "fsha" for r in SPLIT_REGIMES}}


def attack_of(variant: Variant) -> str:
    """The variant's active attack: its ``attack`` key, else the default for its regime."""
    name = variant.attack or DEFAULT_ATTACK.get(variant.regime)
    if name not in ATTACK_REGIMES:
        raise CompareError(f"variant {variant.name!r}: attack {variant.attack!r} is not an active attack; choose "
                           f"one of {', '.join(ATTACK_REGIMES)} (regime {variant.regime!r})")
    if variant.regime not in ATTACK_REGIMES[name]:
        raise CompareError(f"variant {variant.name!r}: the {name} attack runs on {', '.join(ATTACK_REGIMES[name])}, "
                           f"not on regime {variant.regime!r}; change the variant's regime or its attack")
    return name


def imprint_regime(run_cfg: RunConfig, variant: str) -> str:
    """``fedavg``, ``fedavg+dp`` or ``fedavg+he``, as the variant's FedAvg keys say."""
    dp = run_cfg.fed.dp_noise_multiplier > 0 or run_cfg.fed.dp_target_epsilon is not None
    he = run_cfg.fed.secure == "he"
    if dp and he:
        raise CompareError(f"variant {variant!r}: the imprint attack runs on fedavg+dp or fedavg+he, one at a time; "
                           "drop fed.secure or the DP keys")
    if run_cfg.fed.secure not in ("none", "he"):
        raise CompareError(f"variant {variant!r}: fed.secure={run_cfg.fed.secure!r}; the imprint attack runs with "
                           "fed.secure none (fedavg, fedavg+dp) or he (fedavg+he)")
    return "fedavg+he" if he else "fedavg+dp" if dp else "fedavg"


def _changed(obj: Any, default: Any) -> dict[str, Any]:
    """``obj``'s fields that differ from ``default``'s, nested sections as dicts of their changed fields."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        mine, theirs = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(mine) and dataclasses.is_dataclass(theirs):
            sub = _changed(mine, theirs)
            if sub:
                out[f.name] = sub
        elif to_jsonable(mine) != to_jsonable(theirs):
            out[f.name] = mine
    return out


def fingerprint(attack: str, run_cfg: RunConfig, settings: Any) -> str:
    """What a finished variant's result depends on; a rerun reuses the result while this is unchanged.

    Only values that differ from the defaults count, so a setting added later at a default that keeps the old
    behaviour does not throw finished results away."""
    blob = json.dumps(to_jsonable({"attack": attack, "run": _changed(run_cfg, RunConfig(regime=run_cfg.regime)),
                                   "settings": _changed(settings, type(settings)())}), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def split_attack_overrides(cfg: AttackConfig) -> tuple[AttackConfig, dict[str, dict[str, Any]]]:
    """The config with each variant's ``imprint.*``, ``fsha.*`` and ``labels.*`` overrides taken out (the run
    config's keys stay), and those overrides per variant, checked against the settings' fields."""
    sections = {name: {f.name for f in dataclasses.fields(getattr(cfg, name))} for name in ATTACK_REGIMES}
    variants, settings = [], {}
    for v in cfg.variants:
        run_keys, mine = {}, {}
        for key, value in (v.overrides or {}).items():
            section, _, name = str(key).partition(".")
            if section not in sections:
                run_keys[key] = value
            elif name not in sections[section]:
                raise CompareError(f"variant {v.name!r}: {key!r} is not a setting of the {section} attack; its "
                                   f"settings are {', '.join(sorted(sections[section]))}")
            else:
                mine.setdefault(section, {})[name] = value
        variants.append(dataclasses.replace(v, overrides=run_keys))
        settings[v.name] = mine
    return dataclasses.replace(cfg, variants=variants), settings


def _imprint_row(run_cfg: RunConfig, variant: Variant, folder: Path, settings: Any,
                 log: Callable[[str], Any]) -> dict[str, Any]:
    regime = imprint_regime(run_cfg, variant.name)
    s = run_imprint_attack(run_cfg, regime, run_cfg.train.batch_size, folder, settings, log=log)
    return {"regime": regime, "view": s["headline_view"], "images": s["images"],
            **{k: s[k] for k in ("leakage_rate", "chance_leakage_rate", "chance_p_value", "ssim_mean", "psnr_mean",
                                 "leakage_vs_margin", "montage", "epsilon", "refused")},
            "defence": f"fed.model_guard {s['model_guard']:g}" if s["model_guard"] is not None else None,
            "details": f"batch {s['batch_size']} x {s['local_steps']} local steps, {s['sites']} sites, gain {s['gain']}",
            "seconds": s["seconds"]}


def _fsha_row(run_cfg: RunConfig, variant: Variant, folder: Path, settings: Any,
              log: Callable[[str], Any]) -> dict[str, Any]:
    r = run_fsha(run_cfg, folder, settings, log=log)
    worst = r.get("worst_view")
    return {"regime": r["regime"], "view": worst, "images": r["by_view"][worst]["images"] if worst else 0,
            **{k: r.get(k) for k in ("leakage_rate", "chance_leakage_rate", "chance_p_value", "ssim_mean", "psnr_mean",
                                     "leakage_vs_margin", "montage")},
            "details": _fsha_details(r),
            "defence": (f"split.loss_guard {r['loss_guard']['steps']} steps, ratio {r['loss_guard']['ratio']:g}"
                        if r["loss_guard"] else None),
            "refused": r["refused"], "disguise": r["disguise"],
            "hospital_losses": r["hospital_losses"], "seconds": r["seconds"]["total"]}


def _fsha_details(r: dict[str, Any]) -> str:
    parts = ["server disguised (honest head's logits)"] if r["disguise"] else []
    parts.append(f"cut {r['cut']}, encoder {'trainable' if r['encoder_trainable'] else 'frozen'}, "
                 f"{r['hospital_steps']} hospital steps")
    if r["hospital_losses"]:
        parts.append(f"hospitals' last epoch loss {r['hospital_losses'][-1]:.3f}")
    if r["refused"]:
        parts.append(f"hospitals stopped training after step {r['hospital_steps']}")
    return "; ".join(parts)


def _labels_row(run_cfg: RunConfig, variant: Variant, folder: Path, settings: Any,
                log: Callable[[str], Any]) -> dict[str, Any]:
    r = run_label_inference(run_cfg, folder, settings, log=log)
    counts = r.get("counts")
    return {"regime": r["regime"], "view": r["strongest_view"], "images": None,
            "label_accuracy": r["label_accuracy"], "label_chance": r["chance"], "label_p_value": r["p_value"],
            "label_samples": r["samples"],
            "details": (f"batch label counts exact in {counts['exact_batches']}/{counts['batches']} steps"
                        if counts else "no plaintext batch counts"),
            "seconds": r["seconds"]}


RUNNERS: dict[str, Callable[[RunConfig, Variant, Path, Any, Callable[[str], Any]], dict[str, Any]]] = {
    "imprint": _imprint_row, "fsha": _fsha_row, "labels": _labels_row}


def attack_settings(cfg: AttackConfig, variant: str, attack: str, overrides: dict[str, dict[str, Any]]) -> Any:
    """AttackConfig's section named after the attack, with the variant's own settings on top."""
    if set(overrides) - {attack}:
        raise CompareError(f"variant {variant!r} runs the {attack} attack but overrides "
                           f"{', '.join(sorted(set(overrides) - {attack}))} settings")
    return dataclasses.replace(getattr(cfg, attack), **overrides.get(attack, {}))


def run_active(cfg: AttackConfig, out: str | Path, only: list[str] | None = None,
               log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Run (or reuse) every selected variant's active attack; write the per-variant and summary files."""
    out = Path(out)
    cfg, attack_overrides = split_attack_overrides(cfg)
    todo = []  # every variant checked before anything trains
    for variant, run_cfg, chosen in plan(cfg, only):
        attack = attack_of(variant)
        if attack == "imprint":
            imprint_regime(run_cfg, variant.name)
        todo.append((variant, run_cfg, chosen, attack, attack_settings(cfg, variant.name, attack,
                                                                        attack_overrides[variant.name])))
    rows = []
    for k, (variant, run_cfg, chosen, attack, settings) in enumerate(todo, 1):
        folder = out / variant.name
        key = fingerprint(attack, run_cfg, settings)
        done = folder / ACTIVE_FILE
        previous = json.loads(done.read_text()) if done.is_file() else None
        head = f"[{k}/{len(todo)}] {variant.name} ({attack} on {variant.regime})"
        if previous is not None and previous.get("fingerprint") == key:
            log(f"{head}: finished, reusing {done}")
            rows.append(previous["row"])
            continue
        if not chosen:
            continue
        log(f"{head}: the hospitals train against a malicious server")
        row = {"variant": variant.name, "attack": attack, "overrides": variant.overrides,
               "attack_overrides": attack_overrides[variant.name].get(attack, {}),
               **RUNNERS[attack](run_cfg, variant, folder, settings, log)}
        write_json(done, {"fingerprint": key, "row": row})
        rows.append(row)
    if rows:
        write_summary(rows, out)
    return rows


SUMMARY_COLUMNS = ("variant", "attack", "regime", "view", "images", "leakage_rate", "chance_leakage_rate",
                   "chance_p_value", "ssim_mean", "psnr_mean", "label_accuracy", "label_chance", "label_p_value",
                   "label_samples", "epsilon", "defence", "refused", "details", "seconds", "montage")


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    """``leakage_summary.{json,csv,md,png}`` of the active attacks."""
    flat = [{k: r.get(k) for k in SUMMARY_COLUMNS} for r in rows]
    write_json(out / "leakage_summary.json", flat)
    write_csv(out / "leakage_summary.csv", flat)
    write_text(out / "leakage_summary.md", summary_markdown(rows))
    plot_active_summary(rows, out / "leakage_summary.png")


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _leak(r: dict[str, Any]) -> str:
    if r.get("label_accuracy") is not None:
        return f"labels {r['label_accuracy']:.0%} of {r['label_samples']}"
    if r.get("leakage_rate") is None:
        return "—"
    return f"{r['leakage_rate']:.1%} of {r['images']} images"


def _chance(r: dict[str, Any]) -> str:
    if r.get("label_accuracy") is not None:
        return f"{r['label_chance']:.1%} (p {r['label_p_value']:.2g})"
    if r.get("chance_leakage_rate") is None:
        return "—"
    return f"{r['chance_leakage_rate']:.2%} (p {r['chance_p_value']:.2g})"


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Leakage to a malicious server",
        "",
        "The hospitals run splitfl's own code; the server deviates from the protocol (see attacks/README.md). "
        "Images: leaked = re-identified among the hospital's images and the outside pool, and SSIM at least the "
        "margin above the dataset-mean image's. Labels: per-sample accuracy; chance = always guessing the majority "
        "class. In brackets: P(at least the observed result by luck).",
        "",
        "| variant | attack | regime | strongest view | leaked | by chance (p) | SSIM | PSNR (dB) | epsilon | "
        "hospitals' defence | refused | details |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['attack']} | {r['regime']} | {r.get('view') or '—'} | {_leak(r)} | {_chance(r)} | "
            f"{_fmt(r.get('ssim_mean'), '.3f')} | {_fmt(r.get('psnr_mean'), '.1f')} | {_fmt(r.get('epsilon'), '.2f')} | "
            f"{r.get('defence') or '—'} | {'yes' if r.get('refused') else '—'} | {r.get('details') or ''} |")
    return "\n".join(lines) + "\n"


__all__ = ["ATTACK_REGIMES", "attack_of", "imprint_regime", "run_active", "summary_markdown"]
