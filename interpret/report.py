"""``splitfl report``: explain a trained model on a set of images, check the explanations, write one HTML file.

Steps: rebuild the run's model (:mod:`interpret.model_loading`), load the images as the run saw
them (:mod:`interpret.images`), predict, attribute the predicted class with every method
(:mod:`interpret.attributions`), check the maps (:mod:`interpret.faithfulness`: deletion and
insertion against random maps, the randomised-model test, Captum's infidelity and sensitivity),
compare them with other runs' maps on the same images (:mod:`interpret.agreement`), and render
(:mod:`interpret.render`). Every number also goes to ``<out>.json`` beside the HTML; both are written
atomically.

Ordinal tasks (diabetic-retinopathy grades) get more (:mod:`interpret.ordinal`): the grade in words
with its probability distribution and expected grade, one map per grade, the ordinal contrast map
(the attribution of the expected grade: evidence for a higher vs a lower grade) with its own trust
checks, and the cohort's grading agreement (confusion matrix, quadratic-weighted kappa, mean absolute
grade error).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import captum
import numpy as np
import torch
from torchmetrics.functional.classification import (
    auroc,
    multiclass_accuracy,
    multilabel_auroc,
)

import splitfl
from interpret import faithfulness as F
from interpret.agreement import compare_maps
from interpret.attributions import attribute_all
from interpret.images import load_report_images
from interpret.options import METHODS, ReportError, ReportOptions
from interpret.ordinal import (
    CONTRAST_DEFINITION,
    IG_TOLERANCE,
    ExpectedGrade,
    GradeMaps,
    expected_grade,
    grade_maps,
    grade_phrase,
    grade_words,
    grading_metrics,
    map_summaries,
)
from interpret.render import (
    colorbar_uri,
    diverging_colorbar_uri,
    heat_rgb,
    image_rgb,
    overlay_rgb,
    png_data_uri,
    render_html,
    signed_overlay_rgb,
)
from splitfl.artifacts import write_json, write_text
from splitfl.runs.model import load_run

SATURATED_AUC = 0.98  # random-map deletion AUC above this: the target probability barely moves, no verdict
RANDOMISATION_LIMIT = 0.5  # mean |rank correlation| with the randomised model's maps above this: the map ignores the weights
METHOD_LABELS = {
    "integrated_gradients": "Integrated Gradients",
    "gradcam": "Grad-CAM",
    "occlusion": "Occlusion",
    "smoothgrad": "SmoothGrad",
}
SIGNED_METHODS = ("integrated_gradients", "occlusion")  # maps with a direction (evidence for and against)
# What each trust-check row explains (shown in the ordinal report's trust table and kept in report.json).
TARGET_PREDICTED = "predicted grade"
TARGET_CONTRAST = "expected grade E[g]"




def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def probabilities(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """Per-class probabilities as the run's loss defines them: sigmoid per finding (multilabel), else softmax."""
    return torch.sigmoid(logits) if task_type == "multilabel" else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's raw outputs, batched (the grading metrics are computed from logits, as in training)."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def predict(model: torch.nn.Module, x: torch.Tensor, task_type: str, batch_size: int) -> torch.Tensor:
    return probabilities(predict_logits(model, x, batch_size), task_type)


def cohort_metrics(probs: torch.Tensor, labels: Optional[np.ndarray], task_type: str) -> dict[str, float]:
    """Accuracy and macro AUROC on the report's images (torchmetrics), where labels and both classes exist."""

    if labels is None:
        return {}
    y = torch.as_tensor(labels).long()
    k = probs.shape[1]
    if task_type == "multilabel":
        out = {}
        if ((y.sum(0) > 0) & (y.sum(0) < len(y))).all():
            out["macro AUROC"] = float(multilabel_auroc(probs, y, num_labels=k, average="macro"))
        return out
    out = {"accuracy": float(multiclass_accuracy(probs, y, num_classes=k, average="micro"))}
    if len(torch.unique(y)) == k:
        out["macro AUROC"] = float(auroc(probs, y, task="multiclass", num_classes=k, average="macro"))
    return out


def _predicted_class(probs: torch.Tensor) -> torch.Tensor:
    return probs.argmax(dim=1)


def trust_checks(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
                 opts: ReportOptions, task_type: str, log: Callable[[str], Any],
                 prob_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 what: str = "") -> dict[str, dict[str, Any]]:
    """Per method: deletion/insertion AUCs vs random maps, randomised-model rank correlation, infidelity, sensitivity.

    ``prob_fn`` maps the model's outputs to the score the deletion/insertion curves follow (default: the
    task's probability of ``target``); the ordinal contrast uses E[g] / (K - 1), a score in [0, 1].
    """

    out: dict[str, dict[str, Any]] = {}
    for method, m in maps.items():
        log(f"checking {METHOD_LABELS.get(method, method)}{what}")
        curves = F.deletion_insertion(model, x, target, m, task_type=task_type, prob_fn=prob_fn,
                                      batch_size=opts.batch_size, seed=opts.seed, progress=opts.progress)
        rand = F.randomisation_check(model, x, target, method, maps=m, batch_size=opts.batch_size, seed=opts.seed)
        infid = F.infidelity_scores(model, x, target, maps=m, batch_size=opts.batch_size, seed=opts.seed)
        k = min(opts.sensitivity_images, len(x))
        sens = F.sensitivity_scores(model, x[:k], target[:k], method, batch_size=opts.batch_size,
                                    seed=opts.seed) if k else None
        out[method] = {
            "deletion_auc": [float(v) for v in curves["deletion_auc"]],
            "insertion_auc": [float(v) for v in curves["insertion_auc"]],
            "random_deletion_auc": [float(v) for v in curves["random_deletion_auc"]],
            "random_insertion_auc": [float(v) for v in curves["random_insertion_auc"]],
            "randomised_spearman": [float(v) for v in rand["spearman"]],
            "infidelity": [float(v) for v in infid],
            "sensitivity": None if sens is None else [float(v) for v in sens],
        }
    return out


def _mean(values: Optional[list[float]]) -> Optional[float]:
    """Mean over the images where the value is defined (NaN: e.g. a flat map has no rank correlation)."""
    finite = [v for v in values or [] if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def trust_rows(checks: dict[str, dict[str, Any]], target: Optional[str] = None) -> list[dict[str, Any]]:
    """The trust table: means per method and a verdict a clinician can read (``target``: what the maps explain)."""
    rows = []
    for method, c in checks.items():
        d, dr = _mean(c["deletion_auc"]), _mean(c["random_deletion_auc"])
        i, ir = _mean(c["insertion_auc"]), _mean(c["random_insertion_auc"])
        rho = _mean([abs(v) for v in c["randomised_spearman"]])
        faithful = d is not None and dr is not None and d < dr
        saturated = dr is not None and dr > SATURATED_AUC
        problems = []
        if saturated:  # removing random pixels leaves the probability at ~1: deletion cannot tell maps apart
            problems.append("deletion test inconclusive (the prediction hardly changes as pixels are removed)")
        elif not faithful:
            problems.append("no better than random at deletion")
        if rho is None:
            problems.append("randomisation test undefined (flat maps)")
        elif rho >= RANDOMISATION_LIMIT:
            problems.append("survives weight randomisation")
        ok = not problems
        rows.append({
            "method": method, "label": METHOD_LABELS.get(method, method),
            "deletion": _fmt(d), "deletion_random": _fmt(dr), "insertion": _fmt(i), "insertion_random": _fmt(ir),
            "randomisation": _fmt(rho, ".2f"), "infidelity": _fmt(_mean(c["infidelity"]), ".3g"),
            "sensitivity": _fmt(_mean(c["sensitivity"]), ".3g"), "ok": ok,
            "verdict": "passes" if ok else "caution: " + "; ".join(problems),
            "deletion_mean": d, "random_deletion_mean": dr, "insertion_mean": i, "random_insertion_mean": ir,
            "randomised_abs_spearman_mean": rho,
        })
        if target is not None:
            rows[-1]["target"] = target
    return rows


def agreement_rows(run: Any, x: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
                   opts: ReportOptions, log: Callable[[str], Any]) -> list[dict[str, Any]]:
    """This model vs each --compare run, and --compare[0] vs its --seed-twin (the seed-to-seed yardstick)."""

    def maps_of(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
        other = load_run(folder)
        if other.task.name != run.task.name or other.config.data.size != run.config.data.size:
            raise ReportError(f"--compare {folder}: trained on {other.task.name} at {other.config.data.size} px, "
                              f"this run on {run.task.name} at {run.config.data.size} px; compare runs of one task")
        log(f"attributing with {folder} ({other.regime})")
        return other.regime, attribute_all(other.model, x, target, list(maps), batch_size=opts.batch_size,
                                           progress=opts.progress)

    rows = []
    compared = [maps_of(f) for f in opts.compare]
    for (regime, other), folder in zip(compared, opts.compare):
        for method in maps:
            a = compare_maps(maps[method], other[method], top_fraction=opts.top_fraction)
            rows.append({"pair": f"this model ({run.regime}) vs {regime} ({Path(folder).name})", "method":
                         METHOD_LABELS.get(method, method), "spearman": a["mean_spearman"], "overlap": a["mean_top_overlap"]})
    if opts.seed_twin:
        if not compared:
            raise ReportError("--seed-twin needs --compare: it is the yardstick for the first --compare run")
        regime, first = compared[0]
        twin_regime, twin = maps_of(opts.seed_twin)
        for method in maps:
            a = compare_maps(first[method], twin[method], top_fraction=opts.top_fraction)
            rows.append({"pair": f"yardstick: {regime} ({Path(opts.compare[0]).name}) vs {twin_regime} "
                                 f"({Path(opts.seed_twin).name}), another seed",
                         "method": METHOD_LABELS.get(method, method), "spearman": a["mean_spearman"],
                         "overlap": a["mean_top_overlap"]})
    for row in rows:  # NaN where a map is flat (no ranking): shown as a dash
        row["spearman_text"], row["overlap_text"] = _fmt(row["spearman"]), _fmt(row["overlap"])
    return rows


def model_card(run: Any) -> list[tuple[str, str]]:
    """Data, regime, metrics and privacy, as the run recorded them."""
    cfg, m = run.config, run.metrics
    data = m.get("data", {})
    test = m.get("test", {})
    ordinal = run.task.task_type == "ordinal"
    classes = (f"grades: {', '.join(grade_phrase(k, grade_words(run.task.label_names)) for k in range(run.task.num_outputs))}"
               if ordinal else f"classes: {', '.join(run.task.label_names)}")
    rows = [
        ("task", f"{run.task.name} ({run.task.task_type}; {classes})"),
        ("training data", f"{data.get('source', cfg.data.source)}: {data.get('train', '?')} training, "
                          f"{data.get('val', '?')} validation, {data.get('test', '?')} test images, {cfg.data.size} px"),
        ("hospitals", f"{cfg.data.partition.num_sites} ({cfg.data.partition.scheme} partition)"),
        ("regime", run.regime),
        ("model", f"{cfg.model.name}" + (f", cut {cfg.model.cut}" if cfg.regime.startswith("split") else "")
                  + (", encoder frozen" if cfg.model.freeze_encoder else "")),
        ("training", f"{cfg.train.epochs} epochs/rounds, batch {cfg.train.batch_size}, {cfg.train.optimizer} "
                     f"lr {cfg.train.lr}; released weights from epoch {run.best_epoch} (best validation AUROC)"),
        ("test macro AUROC", _fmt(test.get("auroc_macro"))),
        ("test accuracy", _fmt(test.get("accuracy"))),
    ]
    if ordinal:
        rows += [("test quadratic-weighted kappa", _fmt(test.get("kappa_quadratic"))),
                 ("test mean absolute grade error", _fmt(test.get("grade_mae"), ".2f") + " grades")]
    if cfg.regime == "split-he":
        rows.append(("encryption", f"activations encrypted with CKKS (preset {cfg.split.he_preset}); the server "
                                   "computed the head on ciphertexts and never held the secret key"))
    if cfg.regime in ("fedavg", "fedprox") and cfg.fed.secure != "none":
        rows.append(("aggregation", f"individual updates hidden from the server ({cfg.fed.secure})"))
    eps = run.epsilon
    rows.append(("differential privacy", f"ε = {eps:.2f}, δ = {run.delta:g} (Opacus RDP accountant)" if eps is not None
                 else "none (no formal privacy guarantee on the released weights)"))
    return rows


CAVEATS = [
    "These maps show which pixels moved this model's output for the predicted class (or grade). They are not a "
    "diagnosis, and they do not show what a clinician should look at.",
    "A bright region can be a shortcut the model learned (a marker, text, a corner or the edge of the image) rather "
    "than a finding. Check the regions against your own reading before trusting a prediction.",
    "Different methods answer slightly different questions and can disagree; the trust table shows which ones "
    "did better than random on these images. Treat a method marked 'caution' as unreliable for this model.",
    "The images are shown at the resolution the model was trained on, which is far lower than a clinical image. "
    "Small findings may be invisible to the model.",
    "Performance numbers come from a held-out test set of the same source; a different hospital, scanner or "
    "population can behave differently.",
]
ORDINAL_CAVEATS = [
    "The grade-by-grade maps show where the model found evidence for each grade, not lesions marked by a grader. "
    "A grade with a dark row had little evidence in this image.",
    "The expected grade E[g] averages over the model's uncertainty (2.5 can mean 'between 2 and 3' or 'either 0 or "
    "4'); read it with the probability bars, and grade from the predicted grade, not from E[g].",
]


def _image_cards(run: Any, imgs: Any, probs: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
                 checks: dict[str, dict[str, Any]], grades: Optional[GradeExplanation] = None) -> list[dict[str, Any]]:
    names = _display_names(run, grades)
    cards = []
    for i in range(len(imgs)):
        order = torch.argsort(probs[i], descending=True)[: min(5, len(names))]
        true = None
        correct = None
        if imgs.labels is not None:
            lab = imgs.labels[i]
            if np.ndim(lab) == 0:
                true, correct = names[int(lab)], int(lab) == int(target[i])
            else:
                true = ", ".join(n for n, v in zip(names, lab) if v) or "no finding"
                correct = bool(lab[int(target[i])])
        cards.append({
            "name": imgs.names[i], "predicted": names[int(target[i])], "true": true, "correct": correct,
            "original": png_data_uri(image_rgb(imgs.x[i])),
            "maps": [{"label": METHOD_LABELS.get(meth, meth),
                      "src": png_data_uri(overlay_rgb(imgs.x[i], m[i], grey=grades is not None)),
                      "deletion": _fmt(checks[meth]["deletion_auc"][i], ".2f") if meth in checks else "—"}
                     for meth, m in maps.items()],
            "probabilities": [{"name": names[int(k)], "value": float(probs[i, k])} for k in order],
            "grading": None if grades is None else _ordinal_card(
                i, imgs.x[i], probs, target, None if imgs.labels is None else int(imgs.labels[i]), grades),
        })
    return cards


def _display_names(run: Any, grades: Optional[GradeExplanation]) -> list[str]:
    """Class names as the page shows them: "grade 2 (moderate)" for an ordinal task, else the label names."""
    if grades is None:
        return list(run.task.label_names)
    return [grade_phrase(k, grades.words) for k in range(len(grades.words))]


def _cohort(run: Any, imgs: Any, probs: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
            metrics: dict[str, float], grades: Optional[GradeExplanation] = None) -> dict[str, Any]:
    names = _display_names(run, grades)
    multilabel = run.task.task_type == "multilabel"
    per_class = []
    for k, name in enumerate(names):
        mine = target == k
        true = None
        correct = None
        if imgs.labels is not None:
            lab = np.asarray(imgs.labels)
            is_k = lab[:, k].astype(bool) if multilabel else lab == k
            true = int(is_k.sum())
            correct = int((is_k & mine.numpy()).sum())
        per_class.append({"name": name, "true": true, "predicted": int(mine.sum()),
                          "mean_probability": float(probs[:, k].mean()), "correct": correct})
    class_maps = []
    class_grid = []  # ordinal: the same maps as rows (one per predicted grade) of method columns
    first = next(iter(maps), None)
    for k, name in enumerate(names):
        mine = target == k
        if first is None or not bool(mine.any()):
            continue
        row = []
        for method, m in maps.items():
            norm = m[mine] / m[mine].flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
            row.append({"src": png_data_uri(heat_rgb(norm.mean(0))),
                        "caption": f"{name}: {METHOD_LABELS.get(method, method)} ({int(mine.sum())})"})
        class_maps += row
        class_grid.append({"name": name, "n": int(mine.sum()), "maps": row})
    return {"n": len(imgs), "source": imgs.source, "has_labels": imgs.labels is not None, "per_class": per_class,
            "metrics": metrics, "class_maps": class_maps,
            "class_grid": class_grid if grades is not None else None,
            "methods": [METHOD_LABELS.get(m, m) for m in maps]}


@dataclass
class GradeExplanation:
    """What an ordinal report adds: per-grade and contrast maps, their checks, the grading agreement."""

    words: list[str]  # one word per grade ("no DR", "mild", ...)
    expected: torch.Tensor  # (B,) E[g]
    per_grade: dict[str, torch.Tensor]  # method -> (B, K, H, W): attribution of P(grade k)
    contrast: dict[str, torch.Tensor]  # method -> (B, H, W): attribution of E[g]
    contrast_checks: dict[str, dict[str, Any]]
    grading: Optional[dict[str, Any]]  # grading_metrics(), None without labels
    completeness_gap: Optional[list[float]]  # IG contrast: sum(map) - (E[g](x) - E[g](baseline)), per image
    ig_steps: Optional[list[int]] = None  # IG steps per image (adaptive, see interpret.ordinal.adaptive_ig_steps)
    per_grade_gap: Optional[list[list[float]]] = None  # IG grade maps: sum(map) - (P_k(x) - P_k(baseline))


def explain_grades(run: Any, imgs: Any, logits: torch.Tensor, opts: ReportOptions,
                   log: Callable[[str], Any]) -> GradeExplanation:
    """Per-grade maps, the ordinal contrast (E[g]) maps and their trust checks, and the cohort's grading metrics."""
    k = run.task.num_outputs
    probs = torch.softmax(logits.float(), dim=1)
    methods = list(opts.ordinal_methods)
    gm = GradeMaps({}, {}, None, None, None)
    if methods:
        log(f"per-grade maps ({k} grades) and the expected-grade contrast: "
            + ", ".join(METHOD_LABELS.get(m, m) for m in methods))
        gm = grade_maps(run.model, imgs.x, k, methods, batch_size=opts.batch_size, progress=opts.progress)
    contrast = gm.contrast
    checks: dict[str, dict[str, Any]] = {}
    if contrast and opts.checks and opts.ordinal_contrast_checks:
        wrapped = ExpectedGrade(run.model)
        checks = trust_checks(wrapped, imgs.x, torch.zeros(len(imgs), dtype=torch.long), contrast, opts,
                              run.task.task_type, log, prob_fn=lambda out: out / (k - 1), what=" (expected grade)")
    grading = grading_metrics(logits, imgs.labels, run.task) if imgs.labels is not None else None
    return GradeExplanation(
        grade_words(run.task.label_names), expected_grade(probs), gm.per_grade, contrast, checks, grading,
        None if gm.contrast_gap is None else gm.contrast_gap.tolist(),
        None if gm.ig_steps is None else gm.ig_steps.tolist(),
        None if gm.per_grade_gap is None else gm.per_grade_gap.tolist())


def _ordinal_numbers(run: Any, imgs: Any, probs: torch.Tensor, target: torch.Tensor, g: GradeExplanation,
                     cohort: dict[str, float]) -> dict[str, Any]:
    """report.json's ``ordinal`` part: per image the grade distribution, E[g] and map summaries; the cohort's grading."""
    grades = [grade_phrase(k, g.words) for k in range(len(g.words))]
    per_grade = {m: [map_summaries(maps[:, k]) for k in range(maps.shape[1])] for m, maps in g.per_grade.items()}
    contrast = {m: map_summaries(maps) for m, maps in g.contrast.items()}
    per_image = []
    for i in range(len(imgs)):
        true = None if imgs.labels is None else int(imgs.labels[i])
        per_image.append({
            "name": imgs.names[i], "predicted_grade": int(target[i]), "predicted_probability": float(probs[i, target[i]]),
            "true_grade": true, "grade_probabilities": [float(v) for v in probs[i]],
            "expected_grade": float(g.expected[i]),
            "ig_steps": None if g.ig_steps is None else g.ig_steps[i],
            "per_grade_maps": {m: [per_grade[m][k][i] for k in range(len(grades))] for m in per_grade},
            "contrast_map": {m: contrast[m][i] for m in contrast},
        })
    return {
        "grades": grades,
        "per_grade_maps_explain": "P(grade k | image), the softmax probability of each grade",
        "contrast": {"name": "expected grade", "definition": "E[g] = sum_k k * P(grade k | image)",
                     "reading": CONTRAST_DEFINITION, "methods": list(g.contrast),
                     "ig_completeness_gap": g.completeness_gap, "ig_tolerance": IG_TOLERANCE,
                     "deletion_insertion_score": f"E[g] / {len(grades) - 1}"},
        "methods": list(g.per_grade),
        "per_grade_ig_completeness_gap": g.per_grade_gap,
        "per_image": per_image,
        "contrast_checks": g.contrast_checks,
        "cohort": None if g.grading is None else {**g.grading, "macro_auroc": cohort.get("macro AUROC"),
                                                  "accuracy": cohort.get("accuracy")},
    }


def _ordinal_card(i: int, x: torch.Tensor, probs: torch.Tensor, target: torch.Tensor, true: Optional[int],
                  g: GradeExplanation) -> dict[str, Any]:
    """One image's grading view: the grade line, the probability strip with E[g], and per-grade + contrast maps."""

    n = len(g.words)
    pred = int(target[i])
    e = float(g.expected[i])
    strip = [{"grade": k, "word": g.words[k], "p": float(probs[i, k]), "predicted": k == pred, "true": k == true}
             for k in range(n)]
    rows = []
    for method, maps in g.per_grade.items():
        row = maps[i]  # (K, H, W)
        top = float(row.clamp_min(0).amax())  # one scale for the row: a grade with little evidence stays dark
        cells = [{"src": png_data_uri(overlay_rgb(x, row[k], scale=top if top > 0 else None, grey=True)),
                  "alt": f"{METHOD_LABELS.get(method, method)}: evidence for {grade_phrase(k, g.words)}",
                  "predicted": k == pred, "true": k == true} for k in range(n)]
        c = g.contrast[method][i]
        if method == "smoothgrad":  # |gradient|: how strongly, not which way
            src, note = png_data_uri(overlay_rgb(x, c, grey=True)), "strength only, no direction"
        else:
            src = png_data_uri(signed_overlay_rgb(x, c))
            note = ("red → higher grade, blue → lower grade" if method in SIGNED_METHODS
                    else "red → higher grade (positive part only)")
        dele = g.contrast_checks.get(method, {}).get("deletion_auc")
        rows.append({"label": METHOD_LABELS.get(method, method), "cells": cells,
                     "contrast": {"src": src, "note": note, "alt": f"{METHOD_LABELS.get(method, method)}: "
                                  "evidence for a higher vs a lower grade",
                                  "deletion": _fmt(dele[i], ".2f") if dele else None}})
    return {
        "headline": f"predicted {grade_phrase(pred, g.words)}, P = {float(probs[i, pred]):.2f}",
        "truth": None if true is None else f"true {grade_phrase(true, g.words)}",
        "off_by": None if true is None else abs(pred - true),
        "expected": f"{e:.2f}", "expected_left": round(100 * (e + 0.5) / n, 1),
        "strip": strip, "rows": rows,
        "headers": [{"grade": k, "word": g.words[k], "p": f"{float(probs[i, k]):.2f}", "predicted": k == pred,
                     "true": k == true} for k in range(n)],
    }


def _grading_section(g: GradeExplanation, cohort: dict[str, float]) -> dict[str, Any]:
    """The cohort's grading agreement (confusion matrix, kappa, grade error, AUROC) and how the grade maps are made."""
    n = len(g.words)
    grades = [grade_phrase(k, g.words) for k in range(n)]
    out: dict[str, Any] = {"grades": grades, "has_labels": g.grading is not None, "metrics": [], "matrix": [],
                           "methods": [METHOD_LABELS.get(m, m) for m in g.per_grade], "n_grades": n,
                           "top_grade": n - 1, "contrast_checked": bool(g.contrast_checks),
                           "signed": [METHOD_LABELS.get(m, m) for m in g.contrast if m in SIGNED_METHODS],
                           "completeness": None}
    if g.completeness_gap and g.ig_steps:
        worst = max(abs(v) for v in g.completeness_gap)
        out["completeness"] = {"gap": _fmt(worst, ".2g"), "steps_min": min(g.ig_steps), "steps_max": max(g.ig_steps),
                               "tolerance": IG_TOLERANCE, "ok": worst <= IG_TOLERANCE,
                               "n_over": sum(abs(v) > IG_TOLERANCE for v in g.completeness_gap)}
    if g.grading is None:
        return out
    gr = g.grading
    out["metrics"] = [
        ("quadratic-weighted kappa", _fmt(gr["quadratic_weighted_kappa"]),
         "agreement with the true grades beyond chance; 1 = perfect, 0 = chance; a miss counts by the square "
         "of its distance in grades"),
        ("mean absolute grade error", _fmt(gr["mean_absolute_grade_error"], ".2f") + " grades",
         "average |predicted − true| grade"),
        ("macro AUROC", _fmt(cohort.get("macro AUROC")),
         "one grade against the rest, averaged" + ("" if "macro AUROC" in cohort else
                                                     " (needs every grade among these images)")),
        ("accuracy", _fmt(cohort.get("accuracy")), "exact grade"),
    ]
    cm = gr["confusion_matrix"]
    top = max(max(r) for r in cm) or 1
    for t, row in enumerate(cm):
        eg = gr["mean_expected_grade_by_true_grade"][t]
        out["matrix"].append({"grade": grades[t], "total": sum(row), "mean_expected": _fmt(eg, ".2f"), "cells": [
            {"count": c, "diagonal": t == p, "far": abs(t - p) >= 2,
             "shade": round(0.08 + 0.6 * c / top, 2) if c else 0.0} for p, c in enumerate(row)]})
    return out


def build_report(run_dir: str | Path, images: str | Path, out: str | Path, opts: ReportOptions | None = None,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write ``out`` (HTML) and ``out`` with ``.json`` (every number); return the JSON's content."""

    opts = opts or ReportOptions()
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {out}: give an .html file name (the PDF, with --pdf, goes beside it)")
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise ReportError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if opts.n_images < 1:
        raise ReportError(f"--n-images {opts.n_images}: give at least 1")
    unknown = [m for m in opts.ordinal_methods if m not in METHODS]
    if unknown:
        raise ReportError(f"--ordinal-methods: unknown {unknown}; choose from {list(METHODS)} (or none)")
    run = load_run(run_dir)
    imgs = load_report_images(images, run.config.data.size, run.task.n_channels, run.task.label_names, opts.split,
                              opts.n_images, opts.start)
    log(f"{run.regime} model on {len(imgs)} images of {imgs.source}")
    logits = predict_logits(run.model, imgs.x, opts.batch_size)
    probs = probabilities(logits, run.task.task_type)
    target = _predicted_class(probs)
    maps = attribute_all(run.model, imgs.x, target, list(opts.methods), batch_size=opts.batch_size,
                         progress=opts.progress)
    checks = trust_checks(run.model, imgs.x, target, maps, opts, run.task.task_type, log) if opts.checks else {}
    agreement = agreement_rows(run, imgs.x, target, maps, opts, log) if opts.compare else []
    grades = explain_grades(run, imgs, logits, opts, log) if run.task.task_type == "ordinal" else None

    json_path = out.with_suffix(".json")
    card = model_card(run)
    metrics = cohort_metrics(probs, imgs.labels, run.task.task_type)
    trust = trust_rows(checks)
    if grades is not None:  # say which output each check explained
        trust = trust_rows(checks, TARGET_PREDICTED) + trust_rows(grades.contrast_checks, TARGET_CONTRAST)
    numbers = {
        "run": str(run_dir), "images": imgs.source, "names": imgs.names, "regime": run.regime,
        "task": dataclasses.asdict(run.task), "options": dataclasses.asdict(opts),
        "predicted": [run.task.label_names[int(t)] for t in target], "probabilities": probs.tolist(),
        "labels": None if imgs.labels is None else np.asarray(imgs.labels).tolist(),
        "cohort_metrics": metrics,
        "checks": checks, "trust": trust, "agreement": agreement,
        "model_card": dict(card),
    }
    if grades is not None:
        numbers["ordinal"] = _ordinal_numbers(run, imgs, probs, target, grades, metrics)
    explained = "grade" if grades is not None else "class"
    context = {
        "title": f"How the model reads {run.task.name} images",
        "subtitle": f"{run.regime} model from {Path(run_dir).name}; {len(imgs)} images; methods: "
                    + ", ".join(METHOD_LABELS.get(m, m) for m in opts.methods),
        "version": getattr(splitfl, "__version__", "?"), "captum_version": captum.__version__,
        "generated": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "json_name": json_path.name,
        "cohort": _cohort(run, imgs, probs, target, maps, metrics, grades), "trust": trust,
        "agreement": agreement, "agreement_top": round(100 * opts.top_fraction),
        "images": _image_cards(run, imgs, probs, target, maps, checks, grades), "model_card": card,
        "caveats": CAVEATS + (ORDINAL_CAVEATS if grades is not None else []), "colorbar": colorbar_uri(),
        "explained": explained,
        "grading": None if grades is None else _grading_section(grades, metrics),
        "diverging_colorbar": diverging_colorbar_uri() if grades is not None else None,
    }
    write_text(out, render_html(context))
    write_json(json_path, numbers)
    for path in (out, json_path):  # a report is meant to be shared (write_text creates files 0600)
        path.chmod(0o644)
    log(f"report: {out} (numbers in {json_path.name})")
    if opts.pdf:
        pdf = export_pdf(out)
        log(f"PDF: {pdf}")
    return numbers


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_command(html: Path, *flags: str) -> list[str]:
    browser = find_chromium()
    if browser is None:
        raise ReportError("no Chromium found for PDF/PNG export: install Debian's 'chromium' package "
                          "(apt-get install chromium) or open the HTML in a browser and print it")
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags,
            html.resolve().as_uri()]


def export_pdf(html: Path) -> Path:
    """Print the report to PDF with headless Chromium (images are embedded, so no network is needed)."""
    pdf = html.with_suffix(".pdf")
    tmp = pdf.with_name(f".{pdf.name}.tmp")
    proc = subprocess.run(chromium_command(html, "--no-pdf-header-footer", f"--print-to-pdf={tmp}"),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not tmp.is_file():
        raise ReportError(f"Chromium could not print {html} to PDF: {proc.stderr.strip()[-400:]}")
    tmp.replace(pdf)
    return pdf


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 2400) -> Path:
    """A PNG of the rendered report (headless Chromium), to look at what a reader sees."""
    proc = subprocess.run(chromium_command(html, f"--window-size={width},{height}", f"--screenshot={png.resolve()}"),
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.is_file():
        raise ReportError(f"Chromium could not render {html}: {proc.stderr.strip()[-400:]}")
    return png


def cmd_report(ns: Any) -> None:
    opts = ReportOptions(methods=tuple(ns.methods), n_images=ns.n_images, start=ns.start, split=ns.split,
                         batch_size=ns.batch_size, checks=ns.checks, sensitivity_images=ns.sensitivity_images,
                         compare=list(ns.compare), seed_twin=ns.seed_twin, top_fraction=ns.top_fraction, pdf=ns.pdf,
                         progress=ns.progress, seed=ns.seed, ordinal_methods=tuple(ns.ordinal_methods),
                         ordinal_contrast_checks=ns.ordinal_contrast_checks)
    build_report(ns.run, ns.images, ns.out, opts)
