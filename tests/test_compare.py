"""``splitfl compare``: real tiny runs of several regimes, the table and figure, reuse, and config errors."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from splitfl.cli import main
from splitfl.variants import CompareConfig, Variant, plan, variant_run_config
from splitfl.compare import read_result

BASE = """\
seed: 3
data: {source: synthetic, modality: xray, n_train: 96, n_val: 64, n_test: 64, size: 28,
       partition: {scheme: iid, num_sites: 2}}
model: {name: test_resnet}
train: {epochs: 1, batch_size: 32, progress: false, accelerator: cpu}
"""
VARIANTS = """\
variants:
  - {name: centralized, regime: centralized}
  - {name: local, regime: local}
  - {name: fedavg, regime: fedavg, overrides: {fed.local_epochs: 1, fed.aggregator: mean}}
"""
NAMES = ["centralized", "local", "fedavg"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _config(folder: Path, variants: str = VARIANTS, name: str = "compare.yaml") -> Path:
    path = folder / name
    path.write_text(BASE + variants)
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One real comparison of three tiny variants: (config file, output folder, what was printed)."""
    folder = tmp_path_factory.mktemp("compare")
    cfg, out = _config(folder), folder / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["compare", "--config", str(cfg), "--out", str(out)])
    return cfg, out, printed.getvalue()


def _user_error(args: list[str], capsys) -> str:
    """Run the CLI expecting a one-line user error (exit 2); returns stderr."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- end to end


def test_compare_tabulates_every_variant_from_its_run(compared):
    _, out, printed = compared
    for k, name in enumerate(NAMES, 1):
        assert f"[{k}/3] {name}" in printed
        assert (out / name / "metrics.json").is_file()
    for suffix in ("md", "csv", "json", "png"):
        assert (out / f"comparison.{suffix}").stat().st_size > 0, suffix

    table = json.loads((out / "comparison.json").read_text())
    rows = table["rows"]
    assert [r["variant"] for r in rows] == NAMES  # config order
    assert table["reference"] == "centralized"
    metrics = {n: json.loads((out / n / "metrics.json").read_text()) for n in NAMES}
    ref = metrics["centralized"]["test"]["auroc_macro"]
    for row in rows:
        m = metrics[row["variant"]]
        assert row["test_auroc_macro"] == pytest.approx(m["test"]["auroc_macro"])
        assert row["gap_to_centralized"] == pytest.approx(m["test"]["auroc_macro"] - ref)
        assert row["wall_seconds"] == pytest.approx(m["wall_seconds"])
    by_name = {r["variant"]: r for r in rows}

    # training time: the history's per-epoch seconds (every site's for local)
    def seconds(paths):
        return sum(float(r["seconds"]) for p in paths for r in csv.DictReader(p.open()))

    assert by_name["centralized"]["train_seconds"] == pytest.approx(seconds([out / "centralized" / "history.csv"]))
    site_histories = sorted((out / "local" / "sites").glob("site_*/history.csv"))
    assert len(site_histories) == 2
    assert by_name["local"]["train_seconds"] == pytest.approx(seconds(site_histories))
    assert by_name["local"]["train_seconds"] > 0

    # the network: none for centralized / local; FedAvg's own count per round
    assert by_name["centralized"]["bytes_per_round"] == 0 and by_name["local"]["bytes_per_round"] == 0
    assert by_name["fedavg"]["bytes_per_round"] == pytest.approx(metrics["fedavg"]["wire"]["bytes_per_round"])
    assert by_name["fedavg"]["bytes_per_round"] > 0
    assert all(r["epsilon"] is None and r["delta"] is None for r in rows)  # no DP here (see the last test)

    csv_rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["variant"] for r in csv_rows] == NAMES
    assert float(csv_rows[2]["test_auroc_macro"]) == pytest.approx(metrics["fedavg"]["test"]["auroc_macro"])
    assert csv_rows[2]["overrides"] == "fed.local_epochs=1; fed.aggregator=mean"

    md = (out / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    for column in ("regime", "test macro AUROC", "gap to centralized", "training time", "bytes / round", "ε"):
        assert column in header
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    sites = metrics["local"]["sites"]
    site_lines = [f"↳ {name} (n={sites[name]['n_train']})" for name in sorted(sites)]
    assert list(lines) == ["variant", "centralized", "local (mean of sites)", *site_lines, "fedavg"]
    assert f"{ref:.4f}" in lines["centralized"]
    fed_auc = metrics["fedavg"]["test"]["auroc_macro"]
    assert f"{fed_auc:.4f}" in lines["fedavg"] and f"{fed_auc - ref:+.4f}" in lines["fedavg"]
    assert lines["fedavg"].rstrip(" |").endswith("—")  # no epsilon
    # every single institution with its own test AUROC, and the collaborative rows' gain over their mean
    for name, line in zip(sorted(sites), site_lines):
        assert f"{sites[name]['test']['auroc_macro']:.4f}" in lines[line]
    single = metrics["local"]["test"]["auroc_macro"]
    assert f"{100 * (fed_auc - single):+.2f}" in lines["fedavg"]


def test_second_run_reuses_finished_variants(compared, capsys):
    cfg, out, _ = compared
    stamps = {n: (out / n / "metrics.json").stat().st_mtime_ns for n in NAMES}
    before = json.loads((out / "comparison.json").read_text())["rows"]
    main(["compare", "--config", str(cfg), "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("finished, reusing") == 3 and "training into" not in printed
    assert {n: (out / n / "metrics.json").stat().st_mtime_ns for n in NAMES} == stamps
    assert json.loads((out / "comparison.json").read_text())["rows"] == before

    # --only runs (here: reuses) the named variants; the table still lists every finished one
    main(["compare", "--config", str(cfg), "--out", str(out), "--only", "fedavg"])
    printed = capsys.readouterr().out
    assert "[1/1] fedavg (fedavg): finished, reusing" in printed
    assert [r["variant"] for r in json.loads((out / "comparison.json").read_text())["rows"]] == NAMES


def test_a_changed_config_is_never_mistaken_for_the_finished_run(compared, tmp_path, capsys):
    cfg, out, _ = compared
    shutil.copytree(out / "centralized", tmp_path / "centralized")
    args = ["compare", "--config", str(cfg), "--out", str(tmp_path), "--only", "centralized", "--train.lr", "0.01"]
    for _ in range(2):  # train.run refuses to resume another config; the refused attempt must not look finished
        err = _user_error(args, capsys)
        assert "variant 'centralized'" in err and "train.lr: 0.001 -> 0.01" in err


# ----------------------------------------------------------------------------- config errors (no training)


def test_bad_override_key_names_the_variant_and_suggests(tmp_path, capsys):
    cfg = _config(tmp_path, "variants:\n  - {name: dp, regime: fedavg, overrides: {fed.dp_epsilon: 8.0}}\n")
    err = _user_error(["compare", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys)
    assert "variant 'dp'" in err and "'fed.dp_epsilon'" in err and "fed.dp_target_epsilon" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # checked before anything runs


def test_override_in_the_wrong_section_suggests_the_right_one(tmp_path, capsys):
    cfg = _config(tmp_path, "variants:\n  - {name: ok, regime: local}\n  - {name: f, regime: fedavg, overrides: {train.local_epochs: 3}}\n")
    err = _user_error(["compare", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys)
    assert "variant 'f'" in err and "fed.local_epochs" in err


def test_bad_override_value_is_rejected_by_the_run_config_types(tmp_path, capsys):
    cfg = _config(tmp_path, "variants:\n  - {name: he, regime: fedavg, overrides: {fed.secure: encrypted}}\n")
    err = _user_error(["compare", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys)
    assert "variant 'he'" in err and "fed.secure" in err and "encrypted" in err


def test_duplicate_and_unusable_names_are_errors(tmp_path, capsys):
    dup = _config(tmp_path, "variants:\n  - {name: a, regime: fedavg}\n  - {name: a, regime: local}\n", "dup.yaml")
    err = _user_error(["compare", "--config", str(dup), "--out", str(tmp_path / "o")], capsys)
    assert "'a' is listed twice" in err
    slash = _config(tmp_path, "variants:\n  - {name: ../up, regime: fedavg}\n", "slash.yaml")
    err = _user_error(["compare", "--config", str(slash), "--out", str(tmp_path / "o")], capsys)
    assert "'../up'" in err and "folder name" in err


def test_only_with_an_unknown_name_lists_the_valid_ones(tmp_path, capsys):
    cfg = _config(tmp_path)
    err = _user_error(["compare", "--config", str(cfg), "--out", str(tmp_path / "o"), "--only", "fedavg,fedprox"], capsys)
    assert "'fedprox'" in err and "centralized, local, fedavg" in err


def test_unknown_config_key_and_regime_are_rejected(tmp_path):
    bad = _config(tmp_path, "variants:\n  - {name: a, regime: fedavgg}\n")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    (tmp_path / "typo.yaml").write_text(BASE + "fed: {local_epoch: 2}\n")
    with pytest.raises(SystemExit):
        main(["compare", "--config", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "o")])


def test_default_variants_and_shipped_configs():
    seven = ["centralized", "local", "fedavg", "fedavg+dp", "fedavg+he", "split-plain", "split-he"]
    steps = plan(CompareConfig())
    assert [v.name for v, _, _ in steps] == seven
    configs = {v.name: rc for v, rc, _ in steps}
    assert configs["fedavg+dp"].fed.dp_target_epsilon == 8.0 and configs["fedavg+he"].fed.secure == "he"
    assert configs["split-he"].regime == "split-he" and configs["fedavg"].fed.secure == "none"

    from splitfl.variants import build_compare_parser

    repo = Path(__file__).resolve().parents[1]
    parser = build_compare_parser()
    for task, flag in (("xray", "pneumoniamnist"), ("retina", "retinamnist"), ("pathology", "pathmnist")):
        ns = parser.instantiate(parser.parse_args(["--config", str(repo / "configs" / task / "compare.yaml"), "--out", "o"]))
        cfg = CompareConfig(**{k: ns[k] for k in CompareConfig.__dataclass_fields__})
        shipped = [v.name for v in cfg.variants]
        assert [n for n in shipped if n in seven] == seven and shipped[3] == "fedavg-short"
        short, dp = (variant_run_config(cfg, v) for v in cfg.variants[3:5])
        assert (short.train.epochs, short.fed.local_epochs) == (dp.train.epochs, dp.fed.local_epochs) == (4, 1)
        rc = variant_run_config(cfg, cfg.variants[0])
        assert (rc.data.flag, rc.data.partition.scheme, rc.data.partition.num_sites, rc.model.name) == (flag, "dirichlet", 4, "resnet18")
        assert (rc.train.epochs, rc.train.batch_size, rc.train.scheduler, rc.fed.local_epochs) == (10, 128, "cosine", 2)


def test_section_override_merges_and_results_fall_back_to_total_bytes(tmp_path):
    """Reading a metrics.json with DP and without ``wire.bytes_per_round`` (older split runs); no training."""
    rc = variant_run_config(CompareConfig(), Variant("x", "fedavg", {"data.partition": {"scheme": "quantity"}, "train.lr": 0.01}))
    assert rc.data.partition.scheme == "quantity" and rc.data.partition.num_sites == 4 and rc.train.lr == 0.01
    # a metrics.json whose wire section predates bytes_per_round: total traffic over the history's rounds
    run_dir = tmp_path / "split-he"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({
        "regime": "split-he", "test": {"auroc_macro": 0.8}, "wall_seconds": 9.0,
        "wire": {"train_bytes_up": 600, "train_bytes_down": 300},
        "privacy": {"epsilon": 2.5, "delta": 1e-5},
    }))
    (run_dir / "history.csv").write_text("epoch,seconds\n1,1.5\n2,2.5\n3,1.0\n")
    row = read_result(Variant("split-he", "split-he"), run_dir)
    assert row["bytes_per_round"] == pytest.approx(300.0) and row["train_seconds"] == pytest.approx(5.0)
    assert (row["epsilon"], row["delta"]) == (2.5, 1e-5)


def test_a_run_saved_before_a_config_key_existed_is_reused_and_a_changed_one_is_not(tmp_path):
    """Keys added to splitfl later were at their defaults in older runs; any real difference still retrains."""
    import dataclasses
    import json

    import yaml

    from splitfl.runs import is_finished
    from splitfl.config import RunConfig

    cfg = RunConfig(regime="fedavg")
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    del saved["fed"]["local_steps"], saved["fed"]["transcript"]  # an older splitfl had no such keys
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "metrics.json").write_text("{}")
    assert is_finished(tmp_path, cfg)
    assert not is_finished(tmp_path, dataclasses.replace(cfg, fed=dataclasses.replace(cfg.fed, local_steps=1)))
    assert not is_finished(tmp_path, dataclasses.replace(cfg, seed=1))


# ----------------------------------------------------------------------------- encoders x variants

ENCODERS = """\
variants:
  - {name: local, regime: local}
  - {name: centralized, regime: centralized}
encoders:
  - {name: frozen, overrides: {model.freeze_encoder: true, train.lr: 0.01}}
  - {name: tuned}
published:
  - {source: "FOCAL (Bian et al., medRxiv 2026)", task: "DR severity grading", gain_percent: 14.46}
"""


def test_encoders_cross_every_variant_into_their_own_folders(tmp_path):
    from splitfl.variants import plan_cells

    cfg_path = _config(tmp_path, ENCODERS)
    with contextlib.redirect_stdout(io.StringIO()):
        main(["compare", "--config", str(cfg_path), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    for enc in ("frozen", "tuned"):
        for var in ("local", "centralized"):
            saved = json.loads((out / enc / var / "metrics.json").read_text())
            assert saved["model"]["freeze_encoder"] is (enc == "frozen")
    table = json.loads((out / "comparison.json").read_text())
    rows = {(r["encoder"], r["variant"]): r for r in table["rows"]}
    assert set(rows) == {(e, v) for e in ("frozen", "tuned") for v in ("local", "centralized")}
    for enc in ("frozen", "tuned"):
        local, central = rows[(enc, "local")], rows[(enc, "centralized")]
        assert len(local["sites"]) == 2 and local["gain_over_single"] is None
        site_mean = sum(s["test_auroc_macro"] for s in local["sites"]) / 2
        assert local["test_auroc_macro"] == pytest.approx(site_mean)
        # each encoder's collaborative rows are compared with its own single institutions and centralized run
        assert central["gain_over_single"] == pytest.approx(central["test_auroc_macro"] - site_mean)
        assert central["gap_to_centralized"] == 0
    md = (out / "comparison.md").read_text()
    assert "| encoder | variant |" in md and "FOCAL (Bian et al., medRxiv 2026): DR severity grading" in md
    assert "+14.46 %" in md and table["published"][0]["gain_percent"] == 14.46

    cells = plan_cells(_parsed(cfg_path), out, ["tuned"])
    assert [(c.label, c.chosen) for c in cells] == [
        ("frozen/local", False), ("frozen/centralized", False), ("tuned/local", True), ("tuned/centralized", True)]
    cells = plan_cells(_parsed(cfg_path), out, ["centralized"])
    assert [c.label for c in cells if c.chosen] == ["frozen/centralized", "tuned/centralized"]
    assert [c.label for c in plan_cells(_parsed(cfg_path), out, ["frozen/local"]) if c.chosen] == ["frozen/local"]
    with pytest.raises(Exception, match="unknown name 'nope'"):
        plan_cells(_parsed(cfg_path), out, ["nope"])


def _parsed(path: Path) -> CompareConfig:
    """A compare config file parsed as ``splitfl compare`` parses it."""
    import dataclasses

    from splitfl.variants import build_compare_parser

    parser = build_compare_parser()
    ns = parser.instantiate(parser.parse_args(["--config", str(path), "--out", "x"]))
    return CompareConfig(**{f.name: ns[f.name] for f in dataclasses.fields(CompareConfig)})


def test_pretrained_encoder_points_at_its_pretraining_and_names_clash(tmp_path):
    from splitfl.variants import CompareError, Encoder, plan_cells

    base = CompareConfig(variants=[Variant("centralized", "centralized")],
                         encoders=[Encoder("fm", {"model.freeze_encoder": True}, pretrain="p.yaml"),
                                   Encoder("shared", pretrain="p.yaml", pretrain_out="runs/pretrain/x")])
    cells = plan_cells(base, tmp_path)
    assert cells[0].config.model.pretrained == str(tmp_path / "pretrain" / "fm" / "encoder.pt")
    assert cells[0].config.model.freeze_encoder is True
    assert cells[1].config.model.pretrained == str(Path("runs/pretrain/x") / "encoder.pt")
    with pytest.raises(CompareError, match="clash"):
        plan_cells(CompareConfig(variants=[Variant("centralized", "centralized")], encoders=[Encoder("centralized")]), tmp_path)
    with pytest.raises(CompareError, match="either 'pretrain' or a model.pretrained"):
        plan_cells(CompareConfig(encoders=[Encoder("fm", {"model.pretrained": "a.pt"}, pretrain="p.yaml")]), tmp_path)
    with pytest.raises(CompareError, match="pretrain config 'p.yaml' not found"):
        from splitfl.compare import compare

        compare(base, tmp_path, log=lambda _: None)


def test_compare_pretrains_the_foundation_encoder_once_and_probes_it_frozen(tmp_path):
    """One command: SimCLR pretraining into a shared folder, then a frozen linear probe that loads its encoder.pt."""
    import yaml

    pretrain = {
        "method": "simclr", "img_size": 28, "channels": 1,
        "model": {"name": "test_resnet"},
        "sources": [{"kind": "synthetic", "modality": "xray", "n": 16, "seed": 7}],
        "simclr": {"proj_hidden": 16, "proj_dim": 8},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "progress": False, "accelerator": "cpu"},
    }
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    shared = tmp_path / "shared-fm"
    encoders = f"""\
variants:
  - {{name: centralized, regime: centralized}}
encoders:
  - {{name: fm, pretrain: {tmp_path / 'pretrain.yaml'}, pretrain_out: {shared}, overrides: {{model.freeze_encoder: true}}}}
"""
    cfg_path = _config(tmp_path, encoders)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["compare", "--config", str(cfg_path), "--out", str(tmp_path / "a")])
        main(["compare", "--config", str(cfg_path), "--out", str(tmp_path / "b")])  # another comparison, same FM
    assert (shared / "encoder.pt").is_file() and not (tmp_path / "a" / "pretrain").exists()
    info = json.loads((shared / "pretrain.json").read_text())
    assert info["n_images"] == 16
    saved = yaml.safe_load((tmp_path / "b" / "fm" / "centralized" / "config.yaml").read_text())
    assert saved["model"]["pretrained"] == str(shared / "encoder.pt") and saved["model"]["freeze_encoder"] is True
    weights = torch.load(tmp_path / "b" / "fm" / "centralized" / "best_model.pt", weights_only=False)["model"]
    fm = torch.load(shared / "encoder.pt", weights_only=True)
    conv = next(k for k in fm if k.endswith("conv1.weight"))
    assert torch.equal(weights["encoder.body." + conv], fm[conv])  # the frozen probe runs on the pretrained weights
