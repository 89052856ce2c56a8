"""Atomic writes: a failure mid-write leaves the previous file intact."""
import json
import math

import numpy as np
import pytest
import torch

from splitfl.artifacts import save_checkpoint, write_csv, write_json


def test_write_json_converts_and_replaces(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json(path, {"a": np.float32(0.5), "t": torch.tensor([1.0, 2.0]), "nan": math.nan})
    assert json.loads(path.read_text()) == {"a": 0.5, "t": [1.0, 2.0], "nan": None}
    write_json(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp files left


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"x": torch.ones(2)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"x": Unpicklable()})
    assert torch.equal(torch.load(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_write_csv_union_of_columns(tmp_path):
    path = write_csv(tmp_path / "h.csv", [{"a": 1}, {"a": 2, "b": 3}])
    assert path.read_text().splitlines() == ["a,b", "1,", "2,3"]
