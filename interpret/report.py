"""``splitfl report``: explain a trained model on a set of images, check the explanations, write one HTML file.

Steps: rebuild the run's model (:mod:`interpret.model_loading`), load the images as the run saw
them (:mod:`interpret.images`), predict, attribute the predicted class with every method
(:mod:`interpret.attributions`), check the maps (:mod:`interpret.faithfulness`: deletion and
insertion against random maps, the randomised-model test, Captum's infidelity and sensitivity),
compare them with other runs' maps on the same images (:mod:`interpret.agreement`), and render
(:mod:`interpret.render`). Every number also goes to ``<out>.json`` beside the HTML; both are written
atomically.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from interpret.attributions import METHODS

SATURATED_AUC = 0.98  # random-map deletion AUC above this: the target probability barely moves, no verdict
RANDOMISATION_LIMIT = 0.5  # mean |rank correlation| with the randomised model's maps above this: the map ignores the weights
METHOD_LABELS = {
    "integrated_gradients": "Integrated Gradients",
    "gradcam": "Grad-CAM",
    "occlusion": "Occlusion",
    "smoothgrad": "SmoothGrad",
}


@dataclass
class ReportOptions:
    """What to explain and how thoroughly (defaults sized for a CPU in a few minutes)."""

    methods: tuple[str, ...] = METHODS
    n_images: int = 16
    start: int = 0
    split: str = "test"  # which split of a MedMNIST .npz
    batch_size: int = 16
    checks: bool = True
    sensitivity_images: int = 4  # Captum's sensitivity re-runs the method: on the first few images only
    compare: list[str] = field(default_factory=list)  # other runs' folders: agreement with each
    seed_twin: Optional[str] = None  # with compare: a run differing from compare[0] only in seed (the yardstick)
    top_fraction: float = 0.1
    pdf: bool = False
    progress: bool = True
    seed: int = 0


class ReportError(ValueError):
    """Options that cannot make a report (what is wrong and what to do)."""


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def probabilities(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """Per-class probabilities as the run's loss defines them: sigmoid per finding (multilabel), else softmax."""
    return torch.sigmoid(logits) if task_type == "multilabel" else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, task_type: str, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([probabilities(model(x[i:i + batch_size]), task_type) for i in range(0, len(x), batch_size)])


def cohort_metrics(probs: torch.Tensor, labels: Optional[np.ndarray], task_type: str) -> dict[str, float]:
    """Accuracy and macro AUROC on the report's images (torchmetrics), where labels and both classes exist."""
    from torchmetrics.functional.classification import auroc, multiclass_accuracy, multilabel_auroc

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
                 opts: ReportOptions, task_type: str, log: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """Per method: deletion/insertion AUCs vs random maps, randomised-model rank correlation, infidelity, sensitivity."""
    from interpret import faithfulness as F

    out: dict[str, dict[str, Any]] = {}
    for method, m in maps.items():
        log(f"checking {METHOD_LABELS.get(method, method)}")
        curves = F.deletion_insertion(model, x, target, m, task_type=task_type, batch_size=opts.batch_size,
                                      seed=opts.seed, progress=opts.progress)
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


def trust_rows(checks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The trust table: means per method and a verdict a clinician can read."""
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
    return rows


def agreement_rows(run: Any, x: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
                   opts: ReportOptions, log: Callable[[str], Any]) -> list[dict[str, Any]]:
    """This model vs each --compare run, and --compare[0] vs its --seed-twin (the seed-to-seed yardstick)."""
    from interpret.agreement import compare_maps
    from interpret.attributions import attribute_all
    from interpret.model_loading import load_run

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
    rows = [
        ("task", f"{run.task.name} ({run.task.task_type}; classes: {', '.join(run.task.label_names)})"),
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
    "These maps show which pixels moved this model's output for the predicted class. They are not a diagnosis, "
    "and they do not show what a clinician should look at.",
    "A bright region can be a shortcut the model learned (a marker, text, the edge of the film) rather than a "
    "finding. Check the regions against your own reading before trusting a prediction.",
    "Different methods answer slightly different questions and can disagree; the trust table shows which ones "
    "did better than random on these images. Treat a method marked 'caution' as unreliable for this model.",
    "The images are shown at the resolution the model was trained on, which is far lower than a clinical image. "
    "Small findings may be invisible to the model.",
    "Performance numbers come from a held-out test set of the same source; a different hospital, scanner or "
    "population can behave differently.",
]


def _image_cards(run: Any, imgs: Any, probs: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
                 checks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    from interpret.render import overlay_rgb, image_rgb, png_data_uri

    names = run.task.label_names
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
            "maps": [{"label": METHOD_LABELS.get(meth, meth), "src": png_data_uri(overlay_rgb(imgs.x[i], m[i])),
                      "deletion": _fmt(checks[meth]["deletion_auc"][i], ".2f") if meth in checks else "—"}
                     for meth, m in maps.items()],
            "probabilities": [{"name": names[int(k)], "value": float(probs[i, k])} for k in order],
        })
    return cards


def _cohort(run: Any, imgs: Any, probs: torch.Tensor, target: torch.Tensor, maps: dict[str, torch.Tensor],
            metrics: dict[str, float]) -> dict[str, Any]:
    from interpret.render import heat_rgb, png_data_uri

    names = run.task.label_names
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
    first = next(iter(maps), None)
    for k, name in enumerate(names):
        mine = target == k
        if first is None or not bool(mine.any()):
            continue
        for method, m in maps.items():
            norm = m[mine] / m[mine].flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
            class_maps.append({"src": png_data_uri(heat_rgb(norm.mean(0))),
                               "caption": f"{name}: {METHOD_LABELS.get(method, method)} ({int(mine.sum())})"})
    return {"n": len(imgs), "source": imgs.source, "has_labels": imgs.labels is not None, "per_class": per_class,
            "metrics": metrics, "class_maps": class_maps}


def build_report(run_dir: str | Path, images: str | Path, out: str | Path, opts: ReportOptions | None = None,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Write ``out`` (HTML) and ``out`` with ``.json`` (every number); return the JSON's content."""
    import captum

    import splitfl
    from interpret.attributions import attribute_all
    from interpret.images import load_report_images
    from interpret.model_loading import load_run
    from interpret.render import colorbar_uri, render_html
    from splitfl.artifacts import write_json, write_text

    opts = opts or ReportOptions()
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {out}: give an .html file name (the PDF, with --pdf, goes beside it)")
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise ReportError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if opts.n_images < 1:
        raise ReportError(f"--n-images {opts.n_images}: give at least 1")
    run = load_run(run_dir)
    imgs = load_report_images(images, run.config.data.size, run.task.n_channels, run.task.label_names, opts.split,
                              opts.n_images, opts.start)
    log(f"{run.regime} model on {len(imgs)} images of {imgs.source}")
    probs = predict(run.model, imgs.x, run.task.task_type, opts.batch_size)
    target = _predicted_class(probs)
    maps = attribute_all(run.model, imgs.x, target, list(opts.methods), batch_size=opts.batch_size,
                         progress=opts.progress)
    checks = trust_checks(run.model, imgs.x, target, maps, opts, run.task.task_type, log) if opts.checks else {}
    agreement = agreement_rows(run, imgs.x, target, maps, opts, log) if opts.compare else []

    json_path = out.with_suffix(".json")
    card = model_card(run)
    numbers = {
        "run": str(run_dir), "images": imgs.source, "names": imgs.names, "regime": run.regime,
        "task": dataclasses.asdict(run.task), "options": dataclasses.asdict(opts),
        "predicted": [run.task.label_names[int(t)] for t in target], "probabilities": probs.tolist(),
        "labels": None if imgs.labels is None else np.asarray(imgs.labels).tolist(),
        "cohort_metrics": cohort_metrics(probs, imgs.labels, run.task.task_type),
        "checks": checks, "trust": trust_rows(checks), "agreement": agreement,
        "model_card": dict(card),
    }
    context = {
        "title": f"How the model reads {run.task.name} images",
        "subtitle": f"{run.regime} model from {Path(run_dir).name}; {len(imgs)} images; methods: "
                    + ", ".join(METHOD_LABELS.get(m, m) for m in opts.methods),
        "version": getattr(splitfl, "__version__", "?"), "captum_version": captum.__version__,
        "generated": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "json_name": json_path.name,
        "cohort": _cohort(run, imgs, probs, target, maps, numbers["cohort_metrics"]), "trust": numbers["trust"],
        "agreement": agreement, "agreement_top": round(100 * opts.top_fraction),
        "images": _image_cards(run, imgs, probs, target, maps, checks), "model_card": card,
        "caveats": CAVEATS, "colorbar": colorbar_uri(),
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


def build_report_parser() -> Any:
    from jsonargparse import ActionYesNo, ArgumentParser

    p = ArgumentParser(description="Explain a trained model on a set of images with Captum (Integrated Gradients, "
                                   "Grad-CAM, Occlusion, SmoothGrad), check the explanations and write one "
                                   "self-contained HTML report (numbers also in OUT.json).")
    p.add_argument("--run", type=str, required=True, help="output folder of `splitfl train` (holds best_model.pt)")
    p.add_argument("--images", type=str, required=True,
                   help="a .npz (MedMNIST file or images/labels arrays) or a folder of PNG/JPEG (optional manifest.csv)")
    p.add_argument("--out", type=str, required=True, help="the report's .html file")
    d = ReportOptions()
    p.add_argument("--methods", type=str, nargs="+", default=list(d.methods), help=f"any of {list(METHODS)}")
    p.add_argument("--n-images", type=int, default=d.n_images, help="how many images to explain")
    p.add_argument("--start", type=int, default=d.start, help="index of the first image")
    p.add_argument("--split", type=str, default=d.split, help="split of a MedMNIST .npz (train, val, test)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per attribution batch")
    p.add_argument("--checks", action=ActionYesNo, default=True, help="run the trust checks (deletion/insertion, "
                   "randomised model, infidelity, sensitivity)")
    p.add_argument("--sensitivity-images", type=int, default=d.sensitivity_images,
                   help="images on which Captum's sensitivity (which re-runs each method) is measured")
    p.add_argument("--compare", type=str, nargs="+", default=[], help="other runs' folders: agreement of their maps with "
                   "this model's (e.g. the centralized twin)")
    p.add_argument("--seed-twin", type=Optional[str], default=None,
                   help="a run identical to the first --compare run but for its seed: the agreement yardstick")
    p.add_argument("--top-fraction", type=float, default=d.top_fraction, help="top pixels compared for overlap")
    p.add_argument("--pdf", action=ActionYesNo, default=False, help="also print the report to PDF (headless Chromium)")
    p.add_argument("--progress", action=ActionYesNo, default=True, help="progress bars")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random baselines and perturbations")
    return p


def cmd_report(ns: Any) -> None:
    opts = ReportOptions(methods=tuple(ns.methods), n_images=ns.n_images, start=ns.start, split=ns.split,
                         batch_size=ns.batch_size, checks=ns.checks, sensitivity_images=ns.sensitivity_images,
                         compare=list(ns.compare), seed_twin=ns.seed_twin, top_fraction=ns.top_fraction, pdf=ns.pdf,
                         progress=ns.progress, seed=ns.seed)
    build_report(ns.run, ns.images, ns.out, opts)
