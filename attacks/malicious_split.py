"""A malicious split-learning server against the hospitals' real, unmodified code: the seam, the run, the scoring.

The passive attacks (:mod:`attacks.split_inversion`) read a transcript after an honest run. An *active*
server deviates from the protocol while the run happens, so the attack has to sit where the honest server
sits. :class:`splitfl.split.runner.SplitRunner` already takes a ``server_factory`` (the gRPC stub uses it to
put the head in another process); a malicious server is injected through that same argument, so the
hospitals' side (encoder, data, labels, loss, the CKKS secret key, the transports and their message checks)
runs exactly the code of ``splitfl train``. :class:`MaliciousRun` builds that runner, trains it epoch by
epoch and opens the evaluation window; the malicious servers themselves are in :mod:`attacks.fsha` and
:mod:`attacks.label_inference`.

**Evaluation key.** The run records its transcript (``split.transcript``) only during a window of
``observations`` training steps at the start of the last epoch: the hospitals write which of their images
each recorded step used (``ground_truth.jsonl``), the scoring reads it, the attack never does. The window
is opened by the driver (the recorder's ``max_steps``), so an attack that needs many steps to take hold
(FSHA) is scored where it has taken hold, without writing every step's payloads to disk.

**Scoring** is the passive harness's (:mod:`attacks.scoring`, :mod:`attacks.leakage`): Hungarian pairing
on SSIM, a re-identification pool of the hospital's other images plus ``distractors`` (>= 100) test images,
the margin over the mean image, the chance level and its p-value, so active and passive numbers compare.
Labels are scored against the majority-class rate with an exact binomial test.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest

from attacks.leakage import DEFAULT_MARGIN, MIN_DISTRACTORS, chance_summary
from attacks.plots import plot_montage
from attacks.reconstruction import Reconstruction
from attacks.scoring import ScoredImage, curves, distractor_pool, score_observation
from splitfl.config import RunConfig
from splitfl.data import DataSplits, load_splits
from splitfl.data.base import ArrayDataset
from splitfl.engine import RunError, make_fabric
from splitfl.runs.transcript import Transcript, read_transcript
from splitfl.split.runner import SplitRunner
from splitfl.split.server import SplitServer

SPLIT_REGIMES = ("split-plain", "split-he", "split-he-full")
ServerFactory = Callable[..., Any]


def malicious_config(cfg: RunConfig, regime: str | None = None) -> RunConfig:
    """The run config with ``regime`` set and the transcript on but closed (the window opens later)."""
    regime = regime or cfg.regime
    if regime not in SPLIT_REGIMES:
        raise RunError(f"regime {regime!r}: a malicious split server attacks {', '.join(SPLIT_REGIMES)}")
    out = dataclasses.replace(cfg, regime=regime)
    out.split = dataclasses.replace(cfg.split, transcript=True, transcript_max_steps=0)
    return out


@dataclass
class AttackerImages:
    """Images the attacker holds (never the hospitals'), and the scorer's outside pool."""

    auxiliary: torch.Tensor  # the server's own images: the validation split, plus ``aux_from_test`` test images
    outside: torch.Tensor  # re-identification distractors: the first ``distractors`` test images

    @classmethod
    def from_splits(cls, splits: DataSplits, distractors: int = 200, aux_from_test: int = 0) -> AttackerImages:
        """Validation split (+ the test images after the distractors) for the attacker; disjoint from training."""
        if distractors < MIN_DISTRACTORS:
            raise RunError(f"distractors={distractors}: the re-identification pool needs at least {MIN_DISTRACTORS}")
        test = splits.test._x
        if len(test) < distractors + aux_from_test:
            raise RunError(f"the test split has {len(test)} images: fewer than {distractors} distractors plus "
                           f"{aux_from_test} auxiliary images")
        aux = torch.cat([splits.val._x, test[distractors:distractors + aux_from_test]])
        if len(aux) == 0:
            raise RunError("the attacker needs auxiliary images: the task has no validation split")
        return cls(aux.clone(), test[:distractors].clone())


class MaliciousRun:
    """The hospitals' :class:`SplitRunner`, unchanged, wired to the server ``server_factory`` returns.

    ``server_factory`` is called exactly as the runner calls :class:`SplitServer` (or, in split-he-full,
    with mode ``"he-full"`` and the encrypted initial head); ``None`` gives the honest server, the control.
    """

    def __init__(self, cfg: RunConfig, out_dir: str | Path, server_factory: ServerFactory | None = None,
                 splits: DataSplits | None = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("transcript", "relay"):  # a malicious run is not resumable: a rerun records afresh
            shutil.rmtree(self.out_dir / stale, ignore_errors=True)
        self.splits = splits if splits is not None else load_splits(cfg.data)
        self.fabric = make_fabric(cfg.train)
        self.fabric.launch()
        self.fabric.seed_everything(cfg.seed, verbose=False)  # as splitfl.split.runner.run_split does
        self.runner = SplitRunner(self.fabric, cfg, self.splits, self.out_dir, server_factory=server_factory)
        self.steps = 0
        self.losses: list[float] = []

    @property
    def server(self) -> Any:
        return self.runner.server

    @property
    def sites(self) -> list[ArrayDataset]:
        """The hospitals' data as the runner partitioned it (scoring only)."""
        return self.runner.sites

    def open_window(self, steps: int) -> None:
        """Record the next ``steps`` training steps (server's view and the hospitals' evaluation key)."""
        recorder = self.server.recorder
        if recorder is None:
            raise RunError("the run records no transcript: build it with malicious_config")
        recorder.max_steps = recorder.step + int(steps)

    def train(self, epochs: int, window: int, log: Callable[[str], Any] = print, whole_run: bool = False) -> list[float]:
        """``epochs`` epochs of the real protocol; the window opens at the start of the last one (``whole_run``:
        at the first step, for runs the hospitals may stop at any step)."""
        try:
            for epoch in range(epochs):
                if (epoch == 0 and whole_run) or (epoch == epochs - 1 and not whole_run):
                    self.open_window(1 << 40 if whole_run else window)
                loss = self.runner.train_epoch(epoch, f"epoch {epoch + 1}/{epochs}")
                self.losses.append(loss)
                log(f"[{self.cfg.regime}] epoch {epoch + 1}/{epochs}: hospitals' training loss {loss:.4f}")
        finally:
            self.steps = self.server.recorder.step
        return self.losses

    def transcript(self) -> Transcript:
        return read_transcript(self.out_dir / "transcript")

    def truth(self) -> dict[int, tuple[int, list[int]]]:
        """Evaluation key of every recorded step: step -> (site, image indices)."""
        t = self.transcript()
        return {int(e["step"]): (int(e["site"]), [int(i) for i in e["indices"]]) for e in t.ground_truth}


def honest_factory() -> ServerFactory:
    """The honest server, for the control run (what the runner builds by itself)."""
    return SplitServer


# ----------------------------------------------------------------------------- scoring images


def score_images(recs: Sequence[Reconstruction], sites: Sequence[ArrayDataset], outside: torch.Tensor,
                 margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    """The harness's scoring of reconstructions (per view): rates, chance level, p-value, SSIM, PSNR, curves."""
    mean_image = torch.cat([s._x for s in sites]).float().mean(dim=0)
    rows: list[dict[str, Any]] = []
    pairs_by_view: dict[str, list[tuple[torch.Tensor, torch.Tensor, str]]] = {}
    for rec in recs:
        behind = rec.originals()
        if not behind:
            continue
        originals = torch.stack([sites[s]._x[i] for s, i in behind])
        pool = torch.cat([distractor_pool(sites[site]._x, [i for s, i in behind if s == site], outside[:0])
                          for site in sorted({s for s, _ in behind})] + [outside])
        scored, paired = score_observation(rec.images, originals, [i for _, i in behind], pool, mean_image,
                                           rec.label, margin)
        rows += [dict(s.as_dict(), view=rec.view, seconds=rec.seconds / max(len(scored), 1)) for s in scored]
        pairs_by_view.setdefault(rec.view, []).append((originals, paired, rec.label))
    by_view = {view: _view_summary([r for r in rows if r["view"] == view]) for view in pairs_by_view}
    out: dict[str, Any] = {"images": len(rows), "by_view": by_view}
    if by_view:
        worst = max(by_view, key=lambda v: (by_view[v]["leakage_rate"], by_view[v]["ssim_mean"] or -1.0))
        out.update({"worst_view": worst, **{k: v for k, v in by_view[worst].items() if k != "images"}})
    return {"summary": out, "rows": rows, "pairs_by_view": pairs_by_view}


def _view_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if not math.isnan(r["ssim"])]
    leaked = sum(bool(r["leaked"]) for r in rows)

    def mean(key: str) -> float | None:
        return float(np.mean([r[key] for r in ok])) if ok else None

    scored = [ScoredImage(**{k: r[k] for k in ScoredImage.__dataclass_fields__}) for r in rows]
    return {"images": len(rows), "leaked": leaked,
            "leakage_rate": leaked / len(rows) if rows else 0.0,
            **chance_summary([r["chance"] for r in rows], leaked),
            "reidentified_rate": float(np.mean([r["reidentified"] for r in rows])) if rows else 0.0,
            "ssim_mean": mean("ssim"), "psnr_mean": mean("psnr"), "mean_image_ssim_mean": mean("mean_ssim"),
            **curves(scored)}


def write_montages(scored: dict[str, Any], out_dir: Path, title: str, max_images: int = 16) -> dict[str, str]:
    """``montage.png`` of the strongest view and ``montage_<view>.png`` of each: originals over reconstructions."""
    pairs = {view: _spread(view_pairs, max_images) for view, view_pairs in scored["pairs_by_view"].items()}
    paths: dict[str, str] = {}
    worst = scored["summary"].get("worst_view")
    if worst is not None:
        paths["montage"] = str(plot_montage(pairs[worst], out_dir / "montage.png", f"{title}: {worst}", max_images))
    for view, view_pairs in pairs.items():
        slug = re.sub(r"[^a-z0-9]+", "-", view.lower()).strip("-")
        paths[view] = str(plot_montage(view_pairs, out_dir / f"montage_{slug}.png", f"{title}: {view}", max_images))
    return paths


def _spread(pairs: list[tuple[torch.Tensor, torch.Tensor, str]], max_images: int) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """The first images of every observation rather than all of the first one, so a montage spans the window;
    originals that got a reconstruction first (one estimate per step is paired with one image of its batch)."""
    each = max(1, math.ceil(max_images / max(len(pairs), 1)))
    out = []
    for o, r, label in pairs:
        order = torch.argsort((r.flatten(1).abs().sum(1) == 0).int(), stable=True)[:each]
        out.append((o[order], r[order], label))
    return out


# ----------------------------------------------------------------------------- scoring labels


def majority_rate(labels: np.ndarray, num_classes: int) -> float:
    """Chance level of a label attack: the share of the most frequent class (always guessing it)."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=num_classes)
    return float(counts.max() / max(counts.sum(), 1))


def label_score(predicted: np.ndarray, true: np.ndarray, chance: float) -> dict[str, Any]:
    """Accuracy against ``chance`` and the one-sided exact binomial p-value of at least that many hits by luck."""
    hits, n = int((predicted == true).sum()), len(true)
    p = float(binomtest(hits, n, chance, alternative="greater").pvalue) if n else 1.0
    return {"n": n, "correct": hits, "accuracy": hits / n if n else None, "chance": chance, "p_value": p}
