"""Task-aware metrics against hand-computed references (sklearn as an independent implementation)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from splitfl.data.base import TaskInfo
from splitfl.metrics import TaskMetrics, make_loss, probabilities


def _logits(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_binary_metrics_match_sklearn():
    task = TaskInfo("t", "binary", ("normal", "pneumonia"), 1)
    logits = _logits(200, 2)
    y = (logits[:, 1] - logits[:, 0] + torch.randn(200, generator=torch.Generator().manual_seed(1)) > 0).long()
    m = TaskMetrics(task)
    m.update(logits[:120], y[:120])
    m.update(logits[120:], y[120:])
    out = m.compute()
    p1 = torch.softmax(logits, -1)[:, 1].numpy()
    assert out["auroc_macro"] == pytest.approx(roc_auc_score(y.numpy(), p1), abs=1e-6)
    assert out["auroc_binary"] == pytest.approx(out["auroc_macro"], abs=1e-6)
    pred = (p1 > 0.5).astype(int)
    yn = y.numpy()
    sens = (pred[yn == 1] == 1).mean()
    spec = (pred[yn == 0] == 0).mean()
    assert out["sensitivity"] == pytest.approx(sens, abs=1e-6)
    assert out["specificity"] == pytest.approx(spec, abs=1e-6)
    assert out["balanced_accuracy"] == pytest.approx((sens + spec) / 2, abs=1e-6)
    assert out["accuracy"] == pytest.approx((pred == yn).mean(), abs=1e-6)
    assert set(out["auroc_per_class"]) == {"normal", "pneumonia"}
    assert out["n"] == 200


def test_multiclass_macro_auroc_is_mean_of_one_vs_rest():
    task = TaskInfo("t", "multiclass", ("a", "b", "c", "d"), 3)
    logits = _logits(300, 4, seed=2)
    y = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(3))
    logits[torch.arange(300), y] += 1.0  # informative
    m = TaskMetrics(task)
    m.update(logits, y)
    out = m.compute()
    probs = torch.softmax(logits, -1).numpy()
    per_class = [roc_auc_score((y.numpy() == c).astype(int), probs[:, c]) for c in range(4)]
    assert out["auroc_macro"] == pytest.approx(np.mean(per_class), abs=1e-6)
    assert list(out["auroc_per_class"].values()) == pytest.approx(per_class, abs=1e-6)
    recalls = [(probs.argmax(1)[y.numpy() == c] == c).mean() for c in range(4)]
    assert out["balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-6)


def test_ordinal_reports_kappa_and_grade_error():
    task = TaskInfo("t", "ordinal", ("0", "1", "2", "3", "4"), 3)
    logits = _logits(250, 5, seed=4)
    y = torch.randint(0, 5, (250,), generator=torch.Generator().manual_seed(5))
    logits[torch.arange(250), y] += 2.0
    m = TaskMetrics(task)
    m.update(logits, y)
    out = m.compute()
    pred = logits.argmax(1).numpy()
    assert out["kappa_quadratic"] == pytest.approx(cohen_kappa_score(y.numpy(), pred, weights="quadratic"), abs=1e-5)
    assert out["grade_mae"] == pytest.approx(np.abs(pred - y.numpy()).mean(), abs=1e-9)


def test_multilabel_uses_sigmoid_and_bce():
    task = TaskInfo("t", "multilabel", tuple(f"f{i}" for i in range(14)), 1)
    logits = _logits(400, 14, seed=6)
    y = (torch.rand(400, 14, generator=torch.Generator().manual_seed(7)) < torch.sigmoid(logits)).float()
    assert isinstance(make_loss(task), torch.nn.BCEWithLogitsLoss)
    assert torch.allclose(probabilities(logits, task), torch.sigmoid(logits))
    m = TaskMetrics(task)
    m.update(logits, y)
    out = m.compute()
    probs = torch.sigmoid(logits).numpy()
    ref = np.mean([roc_auc_score(y[:, j].numpy(), probs[:, j]) for j in range(14)])
    assert out["auroc_macro"] == pytest.approx(ref, abs=1e-6)
    assert 0.0 <= out["balanced_accuracy"] <= 1.0
    assert len(out["auroc_per_class"]) == 14


def test_reset_forgets_previous_batches():
    task = TaskInfo("t", "binary", ("n", "p"), 1)
    m = TaskMetrics(task)
    m.update(_logits(50, 2), torch.randint(0, 2, (50,), generator=torch.Generator().manual_seed(0)))
    m.reset()
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0]] * 10)
    y = torch.tensor([1, 0] * 10)
    m.update(logits, y)
    out = m.compute()
    assert out["auroc_macro"] == 1.0 and out["n"] == 20
