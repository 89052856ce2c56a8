"""``splitfl report`` end to end on real (tiny) training runs: the HTML's structure, its numbers, bad input.

Two centralized runs on synthetic 28 px X-rays that differ only in seed (a small ResNet, one epoch) are
explained on images given as a .npz and as a folder; the HTML is parsed and checked section by section.
"""
from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from interpret.images import ImageInputError, load_report_images
from splitfl.runs.model import RunLoadError, load_run
from interpret.report import METHOD_LABELS, ReportError, ReportOptions, build_report
from splitfl.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, TrainConfig
from splitfl.train import run

N_IMAGES = 4


def _config(seed: int) -> RunConfig:
    return RunConfig(
        regime="centralized", seed=seed,
        data=DataConfig(source="synthetic", modality="xray", n_train=128, n_val=64, n_test=64, size=28,
                        partition=PartitionConfig(scheme="iid", num_sites=1)),
        model=ModelConfig(name="test_resnet", small_input_stem=True),
        train=TrainConfig(epochs=1, batch_size=32, lr=3e-3, progress=False, accelerator="cpu"),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    for seed in (0, 1):
        run(_config(seed), root / f"seed{seed}")
    return root


@pytest.fixture(scope="module")
def images_npz(runs):
    """MedMNIST layout: uint8 test_images (N, H, W) and test_labels (N, 1), at a size the run did not use."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32), dtype=np.uint8)
    images[:, 8:24, 8:24] //= 3  # some structure, so maps are not flat
    path = runs / "images.npz"
    np.savez(path, test_images=images, test_labels=np.array([[0], [1], [1], [0], [1], [0]]))
    return path


class _Structure(HTMLParser):
    """Section ids, every <img> source, image cards and the text, as a browser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.img_src: list[str] = []
        self.cards = 0
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "img":
            self.img_src.append(a.get("src", ""))
        if tag == "div" and a.get("class") == "card":
            self.cards += 1
        if tag in ("link", "script") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append(tag)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(runs, images_npz):
    out = runs / "report" / "report.html"
    opts = ReportOptions(n_images=N_IMAGES, batch_size=4, compare=[str(runs / "seed0")],
                         seed_twin=str(runs / "seed1"), sensitivity_images=2, progress=False)
    numbers = build_report(runs / "seed0", images_npz, out, opts, log=lambda _: None)
    parser = _Structure()
    parser.feed(out.read_text())
    return out, numbers, parser


def test_html_is_self_contained_with_every_section(report):
    out, numbers, html = report
    assert html.sections == ["cohort", "trust", "agreement", "images", "model-card", "caveats"]
    # a binary task has no grades: no grading section, per-grade maps or ordinal numbers
    assert 'class="per-grade"' not in out.read_text() and "ordinal" not in numbers
    assert all("target" not in row for row in numbers["trust"])
    assert html.external == []  # no linked file, script or remote image: one file to hand over
    assert all(src.startswith("data:image/png;base64,") for src in html.img_src)
    assert oct(out.stat().st_mode & 0o777) == "0o644"


def test_each_image_has_original_every_method_probabilities_and_true_label(report):
    _, numbers, html = report
    text = " ".join(html.text)
    assert html.cards == N_IMAGES
    # per card: the original and one overlay per method; cohort: one average map per (predicted class, method)
    per_class = len(set(numbers["predicted"])) * len(METHOD_LABELS)
    assert len(html.img_src) == N_IMAGES * (1 + len(METHOD_LABELS)) + per_class + 1  # + the colour scale
    for label in METHOD_LABELS.values():
        assert text.count(label) >= N_IMAGES
    assert text.count("true: normal") + text.count("true: pneumonia") == N_IMAGES
    assert "predicted: " in text and "normal" in text and "pneumonia" in text
    probs = np.array(numbers["probabilities"])
    assert probs.shape == (N_IMAGES, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_trust_checks_have_every_number_and_a_verdict(report):
    _, numbers, _ = report
    assert [r["method"] for r in numbers["trust"]] == list(METHOD_LABELS)
    for method, c in numbers["checks"].items():
        for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc",
                    "randomised_spearman", "infidelity"):
            assert len(c[key]) == N_IMAGES, (method, key)
        assert len(c["sensitivity"]) == 2
        assert all(0.0 <= v <= 1.0 for v in c["deletion_auc"] + c["insertion_auc"])
    for row in numbers["trust"]:
        assert row["verdict"] == "passes" or row["verdict"].startswith("caution: ")


def test_agreement_of_a_model_with_itself_is_exact_and_the_seed_twin_is_the_yardstick(report):
    _, numbers, html = report
    rows = numbers["agreement"]
    own = [r for r in rows if not r["pair"].startswith("yardstick")]
    twin = [r for r in rows if r["pair"].startswith("yardstick")]
    assert len(own) == len(twin) == len(METHOD_LABELS)
    for r in own:  # --compare is the same run: identical maps
        assert r["spearman"] == pytest.approx(1.0, abs=1e-6) and r["overlap"] == pytest.approx(1.0)
    # another seed is another model (None: a flat map, e.g. Grad-CAM of an undertrained net, has no ranking)
    assert all(not (r["spearman"] >= 0.999) for r in twin if r["spearman"] is not None)
    assert "another seed" in " ".join(html.text)


def test_model_card_and_caveats(report):
    _, numbers, html = report
    card = numbers["model_card"]
    assert card["regime"] == "centralized"
    assert card["test macro AUROC"] != "—"
    assert card["differential privacy"].startswith("none")
    assert "not a diagnosis" in " ".join(html.text)


def test_folder_of_pngs_with_manifest_gives_the_same_images(runs, images_npz, tmp_path):
    data = np.load(images_npz)
    for i, img in enumerate(data["test_images"][:3]):
        Image.fromarray(img).save(tmp_path / f"scan_{i}.png")
    (tmp_path / "manifest.csv").write_text("path,label\nscan_0.png,normal\nscan_1.png,1\nscan_2.png,pneumonia\n")
    folder = load_report_images(tmp_path, 28, 1, ("normal", "pneumonia"))
    npz = load_report_images(images_npz, 28, 1, ("normal", "pneumonia"), limit=3)
    assert folder.names == ["scan_0.png", "scan_1.png", "scan_2.png"]
    assert folder.labels.tolist() == [0, 1, 1] == npz.labels.tolist()
    assert torch.allclose(folder.x, npz.x, atol=1e-6)
    assert folder.x.shape == (3, 1, 28, 28) and folder.x.min() >= -1 and folder.x.max() <= 1


def test_bad_input_is_refused_clearly(runs, images_npz, tmp_path):
    with pytest.raises(RunLoadError, match="best_model.pt"):
        load_run(tmp_path)
    (tmp_path / "best_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunLoadError, match="cannot be read"):
        load_run(tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ImageInputError, match="expected MedMNIST"):
        load_report_images(bad, 28, 1, ("a", "b"))
    np.savez(bad, images=np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ImageInputError, match="uint8"):
        load_report_images(bad, 28, 1, ("a", "b"))
    (tmp_path / "manifest.csv").write_text("path,label\nx.png,tumour\n")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ImageInputError, match="line 2"):
        load_report_images(tmp_path, 28, 1, ("normal", "pneumonia"))
    with pytest.raises(ReportError, match="html"):
        build_report(runs / "seed0", images_npz, tmp_path / "report.pdf", ReportOptions(progress=False))
    with pytest.raises(ReportError, match="unknown"):
        build_report(runs / "seed0", images_npz, tmp_path / "r.html", ReportOptions(methods=("lime",)))


def test_cli_writes_the_report(runs, images_npz, tmp_path):
    from splitfl.cli import main

    out = tmp_path / "cli.html"
    main(["report", "--run", str(runs / "seed1"), "--images", str(images_npz), "--out", str(out), "--n-images", "2",
          "--methods", "gradcam", "occlusion", "--no_checks", "--no_progress"])
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["checks"] == {} and len(numbers["names"]) == 2
    assert "Grad-CAM" in out.read_text() and "Integrated Gradients" not in out.read_text()
    with pytest.raises(SystemExit) as exc:  # a user error is one line and exit code 2, not a traceback
        main(["report", "--run", str(tmp_path / "nowhere"), "--images", str(images_npz), "--out", str(out)])
    assert exc.value.code == 2


@pytest.mark.realdata
def test_real_pneumoniamnist_file_loads_as_the_run_saw_it(medmnist_dir):
    path = medmnist_dir / "pneumoniamnist.npz"
    if not path.exists():
        pytest.skip("pneumoniamnist.npz not present")
    imgs = load_report_images(path, 28, 1, ("normal", "pneumonia"), split="test", limit=8, start=10)
    assert imgs.names[0] == "test #10" and imgs.x.shape == (8, 1, 28, 28)
    raw = np.load(path)["test_images"][10:18]
    assert torch.allclose(imgs.x[:, 0], torch.from_numpy(raw).float() / 127.5 - 1, atol=1e-6)
    assert set(imgs.labels.tolist()) <= {0, 1}


def _checks(deletion, random_deletion, rho):
    return {"deletion_auc": [deletion], "insertion_auc": [0.9], "random_deletion_auc": [random_deletion],
            "random_insertion_auc": [0.8], "randomised_spearman": [rho], "infidelity": [0.1], "sensitivity": None}


def test_trust_verdicts_say_what_failed():
    from interpret.report import trust_rows

    rows = {r["method"]: r["verdict"] for r in trust_rows({
        "good": _checks(0.3, 0.8, 0.1),
        "unfaithful": _checks(0.85, 0.8, 0.1),
        "edges": _checks(0.3, 0.8, -0.7),  # |rho| counts: an inverted copy of the map is still the image
        "flat": _checks(0.3, 0.8, float("nan")),
        "saturated": _checks(0.995, 0.999, 0.1),
    })}
    assert rows["good"] == "passes"
    assert rows["unfaithful"] == "caution: no better than random at deletion"
    assert rows["edges"] == "caution: survives weight randomisation"
    assert rows["flat"] == "caution: randomisation test undefined (flat maps)"
    assert rows["saturated"].startswith("caution: deletion test inconclusive")


def test_a_split_vit_run_is_explained_through_its_token_grid(tmp_path):
    """A ViT trained split-plain: the report rebuilds encoder + head and runs Grad-CAM on the patch-token grid."""
    cfg = RunConfig(
        regime="split-plain", seed=0,
        data=DataConfig(source="synthetic", modality="xray", n_train=64, n_val=32, n_test=32, size=32,
                        partition=PartitionConfig(scheme="iid", num_sites=2)),
        model=ModelConfig(name="vit_tiny_patch16_224", small_input_stem=True, timm_kwargs={"depth": 2}),
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, progress=False, accelerator="cpu"),
    )
    run(cfg, tmp_path / "vit")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=images)
    numbers = build_report(tmp_path / "vit", tmp_path / "imgs.npz", tmp_path / "vit.html",
                           ReportOptions(methods=("gradcam", "integrated_gradients"), n_images=3, sensitivity_images=1,
                                         progress=False), log=lambda _: None)
    assert numbers["regime"] == "split-plain" and numbers["labels"] is None
    assert [r["method"] for r in numbers["trust"]] == ["gradcam", "integrated_gradients"]
    assert "true label unknown" in (tmp_path / "vit.html").read_text()
