"""Ordinal grading reports on a real (tiny) synthetic-fundus run: per-grade maps, the expected-grade contrast,
the grading agreement, and the HTML/JSON that carry them.

The run is a one-epoch centralized model on 28 px synthetic fundus images (an ordinal 5-grade task); the
report explains one image of each grade, so every grade is present and macro AUROC is defined. The maps are
checked against their definitions computed in plain torch, and the cohort metrics against
:class:`splitfl.metrics.TaskMetrics` and scikit-learn.
"""
from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients

from interpret.images import load_report_images
from splitfl.runs.model import load_run
from interpret.ordinal import (
    ICDR_WORDS,
    IG_TOLERANCE,
    adaptive_ig_steps,
    contrast_maps,
    expected_grade,
    grade_maps,
    grade_phrase,
    grade_words,
    grading_metrics,
    map_summaries,
    per_grade_maps,
)
from interpret.report import (
    TARGET_CONTRAST,
    TARGET_PREDICTED,
    ReportError,
    ReportOptions,
    build_report,
)
from splitfl.config import (
    DataConfig,
    ModelConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
)
from splitfl.data.base import TaskInfo
from splitfl.data.synthetic import make_synthetic
from splitfl.metrics import TaskMetrics
from splitfl.train import run

SIZE = 28
N_GRADES = 5
GRADE_METHODS = ("integrated_gradients", "gradcam")  # the default ordinal_methods


def _config() -> RunConfig:
    return RunConfig(
        regime="centralized", seed=0,
        data=DataConfig(source="synthetic", modality="fundus", n_train=100, n_val=40, n_test=40, size=SIZE,
                        partition=PartitionConfig(scheme="iid", num_sites=1)),
        model=ModelConfig(name="test_resnet", small_input_stem=True),
        train=TrainConfig(epochs=1, batch_size=32, lr=3e-3, progress=False, accelerator="cpu"),
    )


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    """A trained fundus run and an .npz of one held-out image per grade (grades in a mixed order)."""
    root = tmp_path_factory.mktemp("ordinal")
    run(_config(), root / "run")
    test = make_synthetic("fundus", 5, 5, 30, size=SIZE, seed=3).test
    labels = test.single_labels()
    pick = [int(np.flatnonzero(labels == g)[0]) for g in (2, 0, 4, 1, 3)]
    np.savez(root / "fundus.npz", images=test.images[pick], labels=labels[pick])
    return root


@pytest.fixture(scope="module")
def trained(fundus):
    r = load_run(fundus / "run")
    imgs = load_report_images(fundus / "fundus.npz", SIZE, 3, r.task.label_names)
    return r, imgs


class _Page(HTMLParser):
    """Section ids, the images inside each per-grade table, the per-grade blocks and the page text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.per_grade_blocks = 0
        self.grid_images: list[list[str]] = []  # one list of alt texts per grade-grid table
        self._in_grid = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "div" and a.get("class") == "per-grade":
            self.per_grade_blocks += 1
        if tag == "table" and a.get("class") == "grade-grid":
            self._in_grid = True
            self.grid_images.append([])
        if tag == "img" and self._in_grid:
            assert a.get("src", "").startswith("data:image/png;base64,")
            self.grid_images[-1].append(a.get("alt", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_grid = False

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(fundus):
    out = fundus / "report" / "report.html"
    # main maps: Grad-CAM only (the other methods' checks are covered by test_interpret_report.py); per-grade
    # and contrast maps: the default Integrated Gradients and Grad-CAM
    opts = ReportOptions(methods=("gradcam",), n_images=N_GRADES, batch_size=32, sensitivity_images=0,
                         progress=False)
    numbers = build_report(fundus / "run", fundus / "fundus.npz", out, opts, log=lambda _: None)
    page = _Page()
    page.feed(out.read_text())
    return out, numbers, page


def _plain_expected_grade(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """E[g] = sum_k k * softmax(logits)_k, written out in plain torch."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    return (p * torch.arange(p.shape[1], dtype=p.dtype)).sum(1)


def test_grade_words_follow_the_labels_or_the_icdr_scale():
    assert grade_words(("0", "1", "2", "3", "4")) == list(ICDR_WORDS)  # RetinaMNIST's label names are digits
    assert grade_words(("none", "some", "lots")) == ["none", "some", "lots"]
    assert grade_words(("0", "1", "2")) == ["0", "1", "2"]  # no scale known for 3 digit grades
    assert grade_phrase(3, ICDR_WORDS) == "grade 3 (severe)"
    assert grade_phrase(1, ["0", "1", "2"]) == "grade 1"


def test_per_grade_maps_are_one_map_per_grade_and_ig_moves_probability_between_grades(trained, report):
    r, imgs = trained
    maps = per_grade_maps(r.model, imgs.x, N_GRADES, GRADE_METHODS, batch_size=8)
    assert set(maps) == set(GRADE_METHODS)
    for m in maps.values():
        assert m.shape == (N_GRADES, N_GRADES, SIZE, SIZE) and torch.isfinite(m).all()
    assert (maps["gradcam"] >= 0).all()
    # Integrated Gradients of P(grade k): each map sums to P_k(x) - P_k(grey baseline), so over the grades to 0
    with torch.no_grad():
        px = torch.softmax(r.model(imgs.x), 1)
        pb = torch.softmax(r.model(torch.zeros_like(imgs.x)), 1)
    sums = maps["integrated_gradients"].sum(dim=(2, 3))
    assert torch.allclose(sums, px - pb, atol=2e-3)
    # and pixel by pixel: IG is linear in the output and sum_k P_k = 1 has no gradient
    assert torch.allclose(maps["integrated_gradients"].sum(1), torch.zeros(N_GRADES, SIZE, SIZE), atol=1e-5)
    # report.json summarises the same maps, one summary per grade
    _, numbers, _ = report
    for i, img in enumerate(numbers["ordinal"]["per_image"]):
        assert list(img["per_grade_maps"]) == list(GRADE_METHODS)
        summaries = img["per_grade_maps"]["integrated_gradients"]
        assert len(summaries) == N_GRADES
        assert [s["sum"] for s in summaries] == pytest.approx(sums[i].tolist(), abs=1e-5)


def test_contrast_is_the_integrated_gradients_of_the_expected_grade(trained, report):
    r, imgs = trained
    x = imgs.x[:1]
    contrast = contrast_maps(r.model, x, ["integrated_gradients"])["integrated_gradients"]
    assert contrast.shape == (1, SIZE, SIZE)
    # completeness for E[g], both sides in plain torch
    gap = _plain_expected_grade(r.model, x) - _plain_expected_grade(r.model, torch.zeros_like(x))
    assert float(contrast.sum()) == pytest.approx(float(gap), abs=2e-3)
    # the same map from Captum applied to E[g] written as a plain function (no wrapper module)
    grades = torch.arange(N_GRADES, dtype=torch.float32)
    plain = IntegratedGradients(lambda z: (torch.softmax(r.model(z), 1) * grades).sum(1)).attribute(
        x, baselines=torch.zeros_like(x), n_steps=32, method="gausslegendre")
    assert torch.allclose(contrast, plain.sum(1), atol=1e-5)
    # linearity: the contrast is sum_k k * (IG map of P(grade k))
    per_grade = per_grade_maps(r.model, x, N_GRADES, ["integrated_gradients"])["integrated_gradients"]
    assert torch.allclose(contrast, (per_grade * grades[None, :, None, None]).sum(1), atol=1e-5)
    # report.json: the expected grade and the contrast map's sum for the same image, complete within tolerance
    _, numbers, _ = report
    first = numbers["ordinal"]["per_image"][0]
    assert first["expected_grade"] == pytest.approx(float(_plain_expected_grade(r.model, x)), abs=1e-6)
    assert first["contrast_map"]["integrated_gradients"]["sum"] == pytest.approx(float(gap), abs=IG_TOLERANCE)
    assert all(abs(v) <= IG_TOLERANCE for v in numbers["ordinal"]["contrast"]["ig_completeness_gap"])
    assert all(s["ig_steps"] >= 32 for s in numbers["ordinal"]["per_image"])


def test_integrated_gradients_steps_are_doubled_until_complete(trained):
    r, imgs = trained
    x = imgs.x[:2]
    # a tolerance no 64-step integral meets: every image is redone once, at the step limit
    maps, steps, gap = adaptive_ig_steps(r.model, x, tolerance=1e-9, start_steps=32, max_steps=64)
    assert steps.tolist() == [64, 64]
    at64 = contrast_maps(r.model, x, ["integrated_gradients"], ig_steps=torch.tensor([64, 64]))
    assert torch.allclose(maps, at64["integrated_gradients"], atol=1e-6)
    true_gap = _plain_expected_grade(r.model, x) - _plain_expected_grade(r.model, torch.zeros_like(x))
    assert torch.allclose(gap.double(), maps.sum(dim=(1, 2)).double() - true_gap.double(), atol=1e-5)
    # a loose tolerance keeps the first 32 steps
    _, steps, _ = adaptive_ig_steps(r.model, x, tolerance=10.0)
    assert steps.tolist() == [32, 32]
    # grade_maps: per-image steps shared by the contrast and the grade maps, so the contrast stays sum_k k * map_k
    gm = grade_maps(r.model, x[:1], N_GRADES, ["integrated_gradients"], ig_tolerance=1e-9, ig_max_steps=64)
    grades = torch.arange(N_GRADES, dtype=torch.float32)[None, :, None, None]
    assert gm.ig_steps.tolist() == [64] and gm.per_grade_gap.shape == (1, N_GRADES)
    assert torch.allclose(gm.contrast["integrated_gradients"],
                          (gm.per_grade["integrated_gradients"] * grades).sum(1), atol=1e-5)
    with pytest.raises(ValueError, match="one positive step count per image"):
        per_grade_maps(r.model, x, N_GRADES, ["integrated_gradients"], ig_steps=torch.tensor([32]))


def test_cohort_metrics_equal_splitfls_metrics(trained, report):
    r, imgs = trained
    _, numbers, _ = report
    cohort = numbers["ordinal"]["cohort"]
    with torch.no_grad():
        logits = r.model(imgs.x)
    y = torch.as_tensor(imgs.labels)
    tm = TaskMetrics(r.task)
    tm.update(logits, y)
    ref = tm.compute()
    kappa = cohort["quadratic_weighted_kappa"]
    assert (kappa is None and np.isnan(ref["kappa_quadratic"])) or kappa == pytest.approx(ref["kappa_quadratic"])
    assert cohort["mean_absolute_grade_error"] == pytest.approx(ref["grade_mae"])
    assert cohort["macro_auroc"] == pytest.approx(ref["auroc_macro"], abs=1e-6)  # every grade is present
    assert cohort["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)
    counts = np.zeros((N_GRADES, N_GRADES), int)
    np.add.at(counts, (imgs.labels, logits.argmax(1).numpy()), 1)
    assert cohort["confusion_matrix"] == counts.tolist() and cohort["n"] == N_GRADES
    assert numbers["ordinal"]["per_image"][0]["true_grade"] == 2
    assert [p["predicted_grade"] for p in numbers["ordinal"]["per_image"]] == logits.argmax(1).tolist()


def test_grading_metrics_agree_with_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    task = TaskInfo("grades", "ordinal", ("no DR", "mild", "moderate", "severe", "proliferative"), 3)
    pred = torch.tensor([0, 1, 2, 3, 4, 4, 0, 2, 1, 3])
    true = np.array([0, 1, 2, 2, 4, 1, 0, 3, 1, 4])
    logits = torch.nn.functional.one_hot(pred, 5).float() * 4.0
    res = grading_metrics(logits, true, task)
    assert res["quadratic_weighted_kappa"] == pytest.approx(
        sklearn_metrics.cohen_kappa_score(true, pred.numpy(), weights="quadratic"), abs=1e-6)
    assert res["mean_absolute_grade_error"] == pytest.approx(sklearn_metrics.mean_absolute_error(true, pred.numpy()))
    assert res["confusion_matrix"] == sklearn_metrics.confusion_matrix(true, pred.numpy(), labels=range(5)).tolist()
    probs = torch.softmax(logits.double(), 1)
    assert res["mean_expected_grade_by_true_grade"][0] == pytest.approx(float(expected_grade(probs)[true == 0].mean()))
    same = grading_metrics(torch.zeros(3, 5), np.zeros(3, int), task)  # one grade everywhere: kappa is 0/0
    assert same["quadratic_weighted_kappa"] is None and same["mean_absolute_grade_error"] == 0.0
    with pytest.raises(ValueError, match="grades 0..4"):
        grading_metrics(logits, true + 1, task)
    with pytest.raises(ValueError, match="not ordinal"):
        grading_metrics(logits, true, TaskInfo("t", "multiclass", ("a", "b", "c", "d", "e"), 3))


def test_map_summaries_locate_the_peak():
    m = torch.zeros(2, 4, 5)
    m[0, 1, 3], m[0, 2, 0], m[1, 3, 4] = 2.0, -0.5, 1.0
    s = map_summaries(m)
    assert s[0] == {"sum": 1.5, "positive": 2.0, "negative": -0.5, "max": 2.0, "min": -0.5, "peak": [1, 3]}
    assert s[1]["peak"] == [3, 4]


def test_html_shows_each_grade_with_its_words_probabilities_and_maps(report):
    _, numbers, page = report
    text = " ".join(page.text)
    assert page.sections == ["cohort", "grading", "trust", "images", "model-card", "caveats"]
    assert page.per_grade_blocks == N_GRADES  # one per image
    for grid in page.grid_images:  # a row per method: one map per grade, then the contrast
        assert len(grid) == len(GRADE_METHODS) * (N_GRADES + 1)
        assert sum("evidence for grade" in alt for alt in grid) == len(GRADE_METHODS) * N_GRADES
        assert sum("higher vs a lower grade" in alt for alt in grid) == len(GRADE_METHODS)
    for img in numbers["ordinal"]["per_image"]:
        k, p = img["predicted_grade"], img["predicted_probability"]
        assert f"predicted {grade_phrase(k, ICDR_WORDS)}, P = {p:.2f}" in text
        assert f"expected grade E[g] = {img['expected_grade']:.2f}" in text
        assert sum(img["grade_probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert "true grade 2 (moderate)" in text and "true grade 4 (proliferative)" in text
    assert "quadratic-weighted kappa" in text and "mean absolute grade error" in text and "macro AUROC" in text
    assert "Grade confusion matrix" in text
    assert "expected grade E[g] = Σ k·P(grade k)" in text  # the contrast is defined on the page
    assert numbers["model_card"]["test quadratic-weighted kappa"] != "—"


def test_trust_checks_run_on_the_predicted_grade_and_the_contrast_and_say_so(report):
    _, numbers, page = report
    rows = numbers["trust"]
    assert [(r["method"], r["target"]) for r in rows] == (
        [("gradcam", TARGET_PREDICTED)] + [(m, TARGET_CONTRAST) for m in GRADE_METHODS])
    contrast = numbers["ordinal"]["contrast_checks"]
    assert list(contrast) == list(GRADE_METHODS)
    for c in contrast.values():
        assert len(c["deletion_auc"]) == len(c["randomised_spearman"]) == N_GRADES
        assert all(0.0 <= v <= 1.0 for v in c["deletion_auc"] + c["insertion_auc"])
    assert list(numbers["checks"]) == ["gradcam"]  # the predicted-grade checks, as for any task
    text = " ".join(page.text)
    assert "explains" in text and text.count(TARGET_CONTRAST) >= len(GRADE_METHODS)


def test_ordinal_methods_option_and_bad_values(fundus, tmp_path):
    from splitfl.cli import main

    out = tmp_path / "cli.html"
    main(["report", "--run", str(fundus / "run"), "--images", str(fundus / "fundus.npz"), "--out", str(out),
          "--n-images", "2", "--methods", "gradcam", "--ordinal-methods", "gradcam", "--no_checks", "--no_progress"])
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["ordinal"]["methods"] == ["gradcam"] and numbers["ordinal"]["contrast_checks"] == {}
    assert len(numbers["ordinal"]["per_image"][1]["per_grade_maps"]["gradcam"]) == N_GRADES
    numbers = build_report(fundus / "run", fundus / "fundus.npz", tmp_path / "none.html",
                           ReportOptions(methods=("gradcam",), ordinal_methods=(), n_images=2, checks=False,
                                         progress=False), log=lambda _: None)
    assert numbers["ordinal"]["methods"] == [] and numbers["ordinal"]["cohort"]["n"] == 2
    assert 'class="per-grade"' not in (tmp_path / "none.html").read_text()  # grades and cohort only
    with pytest.raises(ReportError, match="--ordinal-methods"):
        build_report(fundus / "run", fundus / "fundus.npz", tmp_path / "bad.html",
                     ReportOptions(ordinal_methods=("lime",), progress=False))


def test_ordinal_maps_refuse_bad_input(trained):
    r, imgs = trained
    with pytest.raises(ValueError, match="unknown method"):
        per_grade_maps(r.model, imgs.x, N_GRADES, ["lime"])
    with pytest.raises(ValueError, match="at least 2 grades"):
        per_grade_maps(r.model, imgs.x, 1, ["gradcam"])
    with pytest.raises(ValueError, match="unknown method"):  # DeepLift is not offered (wrong for GELU/SiLU)
        contrast_maps(r.model, imgs.x, ["deeplift"])
