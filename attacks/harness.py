"""``splitfl attack``: train each variant with the server's view recorded, attack that view, score it.

An attack config is a compare config (:mod:`splitfl.variants`: shared run keys
plus ``variants``) with an ``attack`` section. Every variant is trained into
``<out>/<name>/run`` with its transcript on (reused when already finished),
then the attack for its regime reads ``run/transcript`` (never the
hospitals' data) and returns reconstructions; only then are they scored
against the hospitals' ground truth. Per variant: ``leakage.json`` and
``montage.png``; across variants: ``leakage_summary.{md,csv,json}`` and
``leakage_summary.png``. With ``attack.server: malicious`` the server deviates from the protocol
instead, and :mod:`attacks.active` runs each variant's active attack.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import attacks.split_inversion as split_inversion
from attacks.active import run_active
from attacks.config import AttackConfig, AttackSettings
from attacks.fed_inversion import aggregate_observations, build_attack_model, fed_observations, invert
from attacks.fellow_inversion import FELLOW_PREFIX, attack_relay
from attacks.leakage import MIN_DISTRACTORS, chance_summary
from attacks.plots import plot_montage, plot_summary
from attacks.reconstruction import Reconstruction
from attacks.runtime import torch_threads
from attacks.scoring import ScoredImage, curves, distractor_pool, label_accuracy, score_observation
from attacks.split_inversion import label_leakage
from splitfl.artifacts import write_csv, write_json, write_text
from splitfl.data import load_splits, partition_dataset
from splitfl.runs import is_finished
from splitfl.runs.transcript import read_transcript
from splitfl.train import run
from splitfl.variants import CompareError, Variant, parse_only, plan

SUMMARY_FILES = ("leakage_summary.md", "leakage_summary.csv", "leakage_summary.json", "leakage_summary.png")


def with_transcript(run_cfg: Any, settings: AttackSettings) -> Any:
    """The variant's run config with the server's view recorded for as many messages as will be attacked."""
    cfg = dataclasses.replace(run_cfg)
    if cfg.regime in ("fedavg", "fedprox"):
        sites = max(1, round(cfg.fed.client_fraction * cfg.data.partition.num_sites))
        # one round more than the site updates attacked: the next broadcast reveals each round's aggregate
        rounds = min(cfg.train.epochs, math.ceil(settings.max_observations / sites) + 1)
        cfg.fed = dataclasses.replace(cfg.fed, transcript=True, transcript_max_rounds=max(rounds, 1))
    elif cfg.regime in ("split-plain", "split-he", "split-he-full"):
        cfg.split = dataclasses.replace(cfg.split, transcript=True, transcript_max_steps=settings.max_observations)
    else:
        raise CompareError(f"regime {cfg.regime!r} has no server to attack: attack fedavg, fedprox, split-plain, split-he or split-he-full")
    return cfg


def attack_fed(run_dir: Path, settings: AttackSettings, data: "SiteData") -> list[Reconstruction]:
    """Gradient inversion on every recorded site update (see :mod:`attacks.fed_inversion`)."""

    transcript = read_transcript(run_dir / "transcript")
    sizes = [len(s) for s in data.sites]
    individual = fed_observations(transcript, sizes)
    rounds = sorted({o.round for o in individual[: settings.max_observations]})
    observations = individual[: settings.max_observations] + aggregate_observations(transcript, sizes, rounds)
    model, spec = build_attack_model(transcript, data.task.num_outputs, data.task.n_channels)
    out = []
    for k, obs in enumerate(observations):
        start = time.perf_counter()
        result = invert(model, spec, obs, data.image_shape, settings.method, iterations=settings.iterations,
                        restarts=settings.restarts, seed=settings.seed + k, progress=False,
                        **({"lr": settings.lr, "tv_weight": settings.tv_weight} if settings.method == "ig" else {}))
        seconds = time.perf_counter() - start
        if obs.site < 0:  # the aggregate: every sampled site's images of that round
            sources = [(site, i) for site in transcript.json(obs.round, "round_info")["chosen"]
                       for batch in transcript.truth(obs.round, site) for i in sorted(set(batch))]
            out.append(Reconstruction(f"round {obs.round} aggregate", obs.view, -1, [], result.images, result.labels,
                                      seconds, sources=sources))
        else:
            indices = sorted({i for batch in transcript.truth(obs.round, obs.site) for i in batch})
            out.append(Reconstruction(f"round {obs.round} site {obs.site}", obs.view, obs.site, indices, result.images,
                                      result.labels, seconds))
    return out


def attack_split(run_dir: Path, settings: AttackSettings, data: "SiteData") -> list[Reconstruction]:
    """The server's view: activation inversion (white-box and decoder) and, in split-he, head-update inversion
    (:mod:`attacks.split_inversion`); with a relayed (trainable) encoder, also the curious fellow hospital's
    view (:mod:`attacks.fellow_inversion`)."""

    transcript = read_transcript(run_dir / "transcript")  # every payload: read once for both views
    recs = split_inversion.attack_split(run_dir, settings, data, transcript)
    if (run_dir / "relay").is_dir():
        recs += attack_relay(run_dir, settings, data, transcript)
    return recs


def label_leakage_split(run_dir: Path, settings: AttackSettings, data: "SiteData") -> dict[str, Any] | None:
    """Li et al.'s norm and direction label attacks on the logit gradients the server received (ROC AUC)."""

    return label_leakage(run_dir, settings, data)


# Attacks per regime: (run dir, settings, data) -> reconstructions.
ATTACKS: dict[str, Callable[[Path, AttackSettings, "SiteData"], list[Reconstruction]]] = {
    "fedavg": attack_fed,
    "fedprox": attack_fed,
    "split-plain": attack_split,
    "split-he": attack_split,
    "split-he-full": attack_split,
}
# Label attacks per regime (a separate metric, not images): (run dir, settings, data) -> leakage.json's label_leakage.
LABEL_ATTACKS: dict[str, Callable[[Path, AttackSettings, "SiteData"], dict[str, Any] | None]] = {
    "split-plain": label_leakage_split,
    "split-he": label_leakage_split,
    "split-he-full": label_leakage_split,
}


@dataclass
class SiteData:
    """The evaluator's copy of the data: each site's images, the outside pool and the mean image."""

    task: Any
    sites: list[Any]
    outside: torch.Tensor
    image_shape: tuple[int, int, int]
    auxiliary: torch.Tensor | None = None  # the attacker's own images (the validation split), not the hospitals'

    @classmethod
    def load(cls, run_cfg: Any, distractors: int) -> "SiteData":
        if distractors < MIN_DISTRACTORS:
            raise CompareError(f"attack.distractors={distractors}: the re-identification pool needs at least {MIN_DISTRACTORS}")
        splits = load_splits(run_cfg.data)
        sites = partition_dataset(splits.train, run_cfg.data.partition)
        outside = torch.stack([splits.test[i][0] for i in range(min(distractors, len(splits.test)))])
        if len(outside) < MIN_DISTRACTORS:
            raise CompareError(f"the test split has only {len(outside)} images; {MIN_DISTRACTORS} are needed as distractors")
        auxiliary = torch.stack([splits.val[i][0] for i in range(len(splits.val))]) if len(splits.val) else None
        return cls(splits.task, sites, outside, tuple(outside.shape[1:]), auxiliary)

    def images(self, site: int, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.sites[site][i][0] for i in indices])

    def labels(self, site: int, indices: list[int]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.sites[site][i][1]) for i in indices])

    def site_images(self, site: int) -> torch.Tensor:
        return self.sites[site]._x if hasattr(self.sites[site], "_x") else self.images(site, list(range(len(self.sites[site]))))


def score(recs: list[Reconstruction], data: SiteData, settings: AttackSettings) -> dict[str, Any]:
    """Every reconstruction against its ground truth: per-image rows, rates, curves, label accuracy."""

    rows, pairs, label_acc = [], [], []
    pairs_by_view: dict[str, list[Any]] = {}
    mean_image = torch.cat([data.site_images(s) for s in range(len(data.sites))]).float().mean(dim=0)
    for rec in recs:
        behind = rec.originals()
        if not behind:  # DP-SGD's Poisson sampling drew an empty batch: the update is noise, no image behind it
            continue
        originals = torch.stack([data.sites[site][i][0] for site, i in behind])
        true_labels = torch.stack([torch.as_tensor(data.sites[site][i][1]) for site, i in behind])
        # the re-identification pool: every involved hospital's other images, then the outside images
        pool = torch.cat([distractor_pool(data.site_images(site), [i for s, i in behind if s == site], data.outside[:0])
                          for site in sorted({s for s, _ in behind})] + [data.outside])
        scored, paired = score_observation(rec.images, originals, [i for _, i in behind], pool, mean_image, rec.label,
                                           settings.margin)
        rows += [dict(s.as_dict(), view=rec.view, seconds=rec.seconds / max(len(scored), 1)) for s in scored]
        pairs.append((originals, paired, rec.label))
        pairs_by_view.setdefault(rec.view, []).append((originals, paired, rec.label))
        if rec.labels is not None:
            label_acc.append(label_accuracy(rec.labels, true_labels))
    finite = [r for r in rows if not math.isnan(r["ssim"])]

    def by_chance(mine: list[dict[str, Any]]) -> dict[str, float]:
        return chance_summary([r["chance"] for r in mine], sum(bool(r["leaked"]) for r in mine))

    summary = {
        "images": len(rows),
        "observations": len(recs),
        "views": sorted({r.view for r in recs}),
        "leakage_rate": float(np.mean([r["leaked"] for r in rows])) if rows else 0.0,
        **by_chance(rows),
        "reidentified_rate": float(np.mean([r["reidentified"] for r in rows])) if rows else 0.0,
        "ssim_mean": float(np.mean([r["ssim"] for r in finite])) if finite else None,
        "psnr_mean": float(np.mean([r["psnr"] for r in finite])) if finite else None,
        "mean_image_ssim_mean": float(np.mean([r["mean_ssim"] for r in finite])) if finite else None,
        "label_accuracy": float(np.mean(label_acc)) if label_acc else None,
        "attack_seconds": float(sum(r.seconds for r in recs)),
    }

    summary.update(curves([ScoredImage(**{k: r[k] for k in ScoredImage.__dataclass_fields__}) for r in rows]))
    by_view = {}
    for view in summary["views"]:
        mine = [r for r in rows if r["view"] == view]
        ok = [r for r in mine if not math.isnan(r["ssim"])]
        by_view[view] = {
            "images": len(mine),
            "leakage_rate": float(np.mean([r["leaked"] for r in mine])) if mine else 0.0,
            **by_chance(mine),
            "reidentified_rate": float(np.mean([r["reidentified"] for r in mine])) if mine else 0.0,
            "ssim_mean": float(np.mean([r["ssim"] for r in ok])) if ok else None,
            "psnr_mean": float(np.mean([r["psnr"] for r in ok])) if ok else None,
            "mean_image_ssim_mean": float(np.mean([r["mean_ssim"] for r in ok])) if ok else None,
            "attack_seconds": float(sum(r.seconds for r in recs if r.view == view)),
        }
    summary["by_view"] = by_view
    # The headline is the strongest attack's view: a privacy officer needs the worst case, not an average
    # over attacks that includes the ones that failed. Every view stays in by_view. The server and a fellow
    # hospital are separate threat models: the headline is the server's, the fellow hospital's worst is beside it.

    def strongest(views: list[str]) -> str:
        return max(views, key=lambda v: (by_view[v]["leakage_rate"], by_view[v]["ssim_mean"] or -1.0))

    fellow = [v for v in by_view if v.startswith(FELLOW_PREFIX)]
    summary["fellow_view"] = strongest(fellow) if fellow else None
    summary["fellow_leakage_rate"] = by_view[summary["fellow_view"]]["leakage_rate"] if fellow else None
    summary["fellow_ssim_mean"] = by_view[summary["fellow_view"]]["ssim_mean"] if fellow else None
    server_views = [v for v in by_view if not v.startswith(FELLOW_PREFIX)]
    if server_views:
        worst = strongest(server_views)
        summary["worst_view"] = worst
        for key in ("leakage_rate", "chance_leakage_rate", "chance_p_value", "reidentified_rate", "ssim_mean",
                    "psnr_mean", "mean_image_ssim_mean"):
            summary[key] = by_view[worst][key]
        summary.update(curves([ScoredImage(**{k: r[k] for k in ScoredImage.__dataclass_fields__})
                               for r in rows if r["view"] == worst]))
    return {"summary": summary, "images": rows, "pairs": pairs, "pairs_by_view": pairs_by_view}


def run_attacks(cfg: AttackConfig, out: str | Path, only: list[str] | None = None,
                log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Train (or reuse), attack and score every selected variant; write the per-variant and summary files."""

    out = Path(out)
    settings = cfg.attack
    if settings.server == "malicious":
        return run_active(cfg, out, only, log)
    if settings.server != "curious":
        raise CompareError(f"attack.server={settings.server!r}: choose curious (the server follows the protocol and "
                           "attacks what it recorded) or malicious (it deviates: imprint, fsha, labels)")
    active = [v.name for v in cfg.variants if v.attack is not None]
    if active:
        raise CompareError(f"variant(s) {', '.join(map(repr, active))} set 'attack', which a malicious server runs; "
                           "set attack.server: malicious, or remove the key")
    todo = [(v, with_transcript(rc, settings), chosen) for v, rc, chosen in plan(cfg, only)]
    for v, _, chosen in todo:
        if chosen and v.regime not in ATTACKS:
            raise CompareError(f"variant {v.name!r}: no attack for regime {v.regime!r} yet (have: {', '.join(ATTACKS)})")
    results = []
    for k, (variant, run_cfg, chosen) in enumerate(todo, 1):
        if not chosen:
            continue
        folder = out / variant.name
        run_dir = folder / "run"
        head = f"[{k}/{len(todo)}] {variant.name} ({variant.regime})"
        if is_finished(run_dir, run_cfg):
            log(f"{head}: training finished, reusing {run_dir}")
        else:
            log(f"{head}: training with the server's view recorded into {run_dir}")
            run(run_cfg, run_dir)
        data = SiteData.load(run_cfg, settings.distractors)
        how = (f"split_attack {settings.split_attack}" if variant.regime.startswith("split") else settings.method)
        log(f"{head}: attacking the recorded server view ({how}, {settings.iterations} iterations)")

        with torch_threads(1):  # thousands of tiny double-backward passes: extra threads only contend
            recs = ATTACKS[variant.regime](run_dir, settings, data)
            labels = LABEL_ATTACKS[variant.regime](run_dir, settings, data) if variant.regime in LABEL_ATTACKS else None
        scored = score(recs, data, settings)
        result = {"variant": variant.name, "regime": variant.regime, "overrides": variant.overrides,
                  "attack": dataclasses.asdict(settings), **scored["summary"], "label_leakage": labels,
                  "per_image": scored["images"]}
        write_json(folder / "leakage.json", result)
        plot_montage(scored["pairs"], folder / "montage.png", f"{variant.name}: originals (top) vs reconstructions")
        if len(scored["pairs_by_view"]) > 1:  # one montage per view too, so every attack's actual outputs are shown
            for view, view_pairs in scored["pairs_by_view"].items():
                slug = re.sub(r"[^a-z0-9]+", "-", view.lower()).strip("-")
                plot_montage(view_pairs, folder / f"montage_{slug}.png", f"{variant.name}, {view}")
        s = scored["summary"]
        for view, v in s.get("by_view", {}).items():
            log(f"{head}: {view}: leakage rate {v['leakage_rate']:.0%} of {v['images']} images, mean SSIM {v['ssim_mean']}")
        results.append(result)
    if results:
        rows = [{**{k: r.get(k) for k in ("variant", "regime", "worst_view", "views", "images", "leakage_rate",
                                          "chance_leakage_rate", "chance_p_value", "reidentified_rate", "ssim_mean", "psnr_mean", "mean_image_ssim_mean",
                                          "label_accuracy", "attack_seconds", "fellow_leakage_rate",
                                          "fellow_ssim_mean")},
                 **_label_columns(r.get("label_leakage")), "by_view": r.get("by_view", {})} for r in results]
        write_json(out / "leakage_summary.json", rows)
        write_csv(out / "leakage_summary.csv", [{**{k: v for k, v in r.items() if k != "by_view"}, "views": "; ".join(r["views"])}
                                                for r in rows])
        write_text(out / "leakage_summary.md", summary_markdown(rows, settings))
        plot_summary(results, out / "leakage_summary.png")
    return results


def _label_columns(labels: dict[str, Any] | None) -> dict[str, Any]:
    """Flat summary columns of the label attacks (None where the regime or run had no such view)."""
    labels = labels or {}
    return {"label_norm_auc": labels.get("norm_auc"), "label_direction_auc": labels.get("direction_auc"),
            "label_n": labels.get("n"), "label_head_update_auc": labels.get("head_update_auc")}


def _fellow(row: dict[str, Any]) -> str:
    """The fellow-hospital column: '—' where no hospital-to-hospital message was attacked."""
    if row.get("fellow_leakage_rate") is None:
        return "—"
    return f"{row['fellow_leakage_rate']:.0%} ({_fmt(row.get('fellow_ssim_mean'), '.3f')})"


def _chance(row: dict[str, Any]) -> str:
    """The rate an attack that learned nothing would show, and P(the observed leaks or more by luck)."""
    if row.get("chance_leakage_rate") is None:
        return "—"
    return f"{row['chance_leakage_rate']:.1%} ({row['chance_p_value']:.2f})"


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary_markdown(rows: list[dict[str, Any]], settings: AttackSettings) -> str:
    lines = [
        "# Leakage from the server's view",
        "",
        "Headline: the server's strongest attack (worst view) of each variant; every view is in the per-view table. "
        "The last column is a separate threat model: a curious fellow hospital inverting the encoder relayed to it "
        "(split learning with a trainable encoder).",
        "",
        "| variant | regime | strongest view: attack | images | leakage rate | by chance: rate (p) | re-identified | SSIM | PSNR (dB) | mean-image SSIM | label accuracy | fellow hospital: leakage (SSIM) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        views = r.get("by_view") or {}
        images = views[r["worst_view"]]["images"] if r.get("worst_view") in views else r["images"]
        lines.append(
            f"| {r['variant']} | {r['regime']} | {r.get('worst_view') or '—'} | {images} | {r['leakage_rate']:.0%} | "
            f"{_chance(r)} | {r['reidentified_rate']:.0%} | {_fmt(r['ssim_mean'], '.3f')} | {_fmt(r['psnr_mean'], '.1f')} | "
            f"{_fmt(r['mean_image_ssim_mean'], '.3f')} | {_fmt(r['label_accuracy'], '.0%')} | {_fellow(r)} |"
        )
    split_rows = [r for r in rows if r.get("by_view") and len(r["by_view"]) > 1 or r.get("label_norm_auc") is not None
                  or r.get("label_head_update_auc") is not None]
    if split_rows:
        lines += [
            "",
            "## Per view",
            "",
            "| variant | view: attack | images | leakage rate | by chance: rate (p) | re-identified | SSIM | PSNR (dB) | mean-image SSIM |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in split_rows:
            for view, v in r["by_view"].items():
                lines.append(
                    f"| {r['variant']} | {view} | {v['images']} | {v['leakage_rate']:.0%} | {_chance(v)} | "
                    f"{v['reidentified_rate']:.0%} | "
                    f"{_fmt(v['ssim_mean'], '.3f')} | {_fmt(v['psnr_mean'], '.1f')} | {_fmt(v['mean_image_ssim_mean'], '.3f')} |"
                )
        lines += [
            "",
            "## Label leakage (Li et al. 2021), ROC AUC against the true labels",
            "",
            "| variant | regime | norm attack | direction attack | samples | head-update bias attack |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in split_rows:
            lines.append(f"| {r['variant']} | {r['regime']} | {_fmt(r.get('label_norm_auc'), '.3f')} | "
                         f"{_fmt(r.get('label_direction_auc'), '.3f')} | {r.get('label_n') or 0} | "
                         f"{_fmt(r.get('label_head_update_auc'), '.3f')} |")
        lines += [
            "",
            "Split attacks: white-box inversion through the known (frozen, public) encoder, Adam "
            f"{settings.iterations} iterations, lr {settings.lr}, TV {settings.tv_weight}; decoder trained on the "
            f"validation split (the attacker's own images), {settings.decoder_epochs} epochs. Label attacks: '—' where "
            "the server received no such message (split-he with a frozen encoder sends no logit gradients).",
        ]
    lines += [
        "",
        f"Attack: {settings.method}, {settings.iterations} iterations x {settings.restarts} restart(s). An image is leaked when "
        f"its reconstruction's nearest neighbour by SSIM, among the hospital's images and {settings.distractors} outside "
        f"images, is the image itself, and its SSIM beats the dataset-mean image's by at least {settings.margin} "
        "(see attacks/README.md). 'By chance': the leakage rate expected if the reconstructions said nothing about which "
        "image they came from, and in brackets the probability of at least the observed leaks by luck alone. SSIM: torchmetrics, Gaussian window 11, sigma 1.5, data range 1 on [0, 1] images.",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["ATTACKS", "AttackConfig", "AttackSettings", "Reconstruction", "SiteData", "Variant", "run_attacks"]


def cmd_attack(ns: Any) -> None:
    cfg = AttackConfig(**{f.name: ns[f.name] for f in dataclasses.fields(AttackConfig)})
    run_attacks(cfg, ns.out, only=parse_only(ns))
