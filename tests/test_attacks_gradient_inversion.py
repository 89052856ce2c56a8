"""attacks.gradient_inversion on the sigmoid LeNet: DLG, iDLG labels, Inverting Gradients, FedAvg updates."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.gradient_inversion import (
    add_gaussian_noise,
    dlg,
    gradients_from_update,
    infer_labels,
    inverting_gradients,
    local_update,
    model_gradients,
    reconstruct,
)
from attacks.metrics import match_reconstructions, ssim
from attacks.models import lenet_dlg
from attacks.runtime import torch_threads

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def pneumonia(medmnist_dir):
    """16 PneumoniaMNIST test images in [-1, 1] and their labels."""
    path = medmnist_dir / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path) as npz:
        images, labels = npz["test_images"][:16], npz["test_labels"][:16, 0]
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


@pytest.fixture(scope="module")
def synthetic():
    """Embedded synthetic chest X-rays (always available)."""
    from splitfl.data.synthetic import make_synthetic

    test = make_synthetic("xray", n_train=1, n_val=1, n_test=8, size=28, seed=0).test
    return test._x.clone(), test._y.clone()


@pytest.fixture(scope="module")
def model():
    return lenet_dlg(in_channels=1, height=28, width=28, num_classes=2, seed=0)


def _dlg_ssim(model, x, y) -> float:
    result = dlg(model, model_gradients(model, x, y), 1, SHAPE, progress=False, seed=2)
    assert result.labels.tolist() == y.tolist()
    return ssim(result.images, x).item()


@pytest.mark.realdata
def test_dlg_batch1_real_image(model, pneumonia):
    x, y = pneumonia
    assert _dlg_ssim(model, x[:1], y[:1]) > 0.9


def test_dlg_batch1_synthetic_image(model, synthetic):
    x, y = synthetic
    assert _dlg_ssim(model, x[:1], y[:1]) > 0.9


def test_idlg_labels_exact_at_batch1(model, synthetic):
    x, y = synthetic
    for i in range(len(x)):
        assert infer_labels(model_gradients(model, x[i : i + 1], y[i : i + 1]), 1).tolist() == [int(y[i])]


def test_label_counts_at_batch4_with_many_classes(synthetic):
    x, _ = synthetic
    model = lenet_dlg(num_classes=10, seed=1)
    y = torch.tensor([1, 3, 3, 7])
    assert infer_labels(model_gradients(model, x[:4], y), 4).tolist() == [1, 3, 3, 7]


@pytest.mark.realdata
def test_inverting_gradients_batch1_real_image(model, pneumonia):
    x, y = pneumonia
    result = inverting_gradients(model, model_gradients(model, x[:1], y[:1]), 1, SHAPE, iterations=300,
                                 progress=False)
    assert result.labels.tolist() == y[:1].tolist()
    assert result.images.min() >= -1 and result.images.max() <= 1  # boxed to the valid range
    assert ssim(result.images, x[:1]).item() >= 0.8
    assert len(result.loss_history) == 300


def test_fedavg_update_to_gradient(model, synthetic):
    x, y = synthetic
    g = model_gradients(model, x[:2], y[:2])
    one = gradients_from_update(local_update(model, x[:2], y[:2], local_steps=1, lr=0.1), 1, 0.1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, g))
    five = gradients_from_update(local_update(model, x[:2], y[:2], local_steps=5, lr=0.01), 5, 0.01)
    flat = torch.cat([t.flatten() for t in five]), torch.cat([t.flatten() for t in g])
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.95  # the documented approximation
    assert torch.allclose(model_gradients(model, x[:2], y[:2])[0], g[0])  # model left at w_before


def test_reconstruct_api_checks(model, synthetic):
    x, y = synthetic
    g = model_gradients(model, x[:1], y[:1])
    with pytest.raises(ValueError, match="exactly one"):
        reconstruct(model, SHAPE, 1, gradients=g, param_delta=g)
    with pytest.raises(ValueError, match="learning rate"):
        reconstruct(model, SHAPE, 1, param_delta=g)
    with pytest.raises(ValueError, match="do not fit"):
        reconstruct(model, SHAPE, 1, gradients=g[:-1])
    delta = local_update(model, x[:1], y[:1], local_steps=2, lr=0.05)
    result = reconstruct(model, SHAPE, 1, method="ig", param_delta=delta, local_steps=2, lr=0.05,
                         iterations=20, progress=False)
    assert result.images.shape == (1, *SHAPE) and result.method == "ig"


def _ig_ssim(model, x, y, noise: float = 0.0, iterations: int = 300) -> float:
    g = add_gaussian_noise(model_gradients(model, x, y), noise, seed=0)
    result = inverting_gradients(model, g, len(x), SHAPE, iterations=iterations, progress=False)
    return match_reconstructions(result.images, x).ssim.mean().item()


@pytest.mark.slow
@pytest.mark.realdata
def test_ssim_falls_with_batch_size(model, pneumonia):
    x, y = pneumonia
    b1 = np.mean([_ig_ssim(model, x[i : i + 1], y[i : i + 1]) for i in range(2)])
    b8 = _ig_ssim(model, x[:8], y[:8])
    assert b8 < b1 - 0.2


@pytest.mark.slow
@pytest.mark.realdata
def test_ssim_falls_with_dp_noise(model, pneumonia):
    x, y = pneumonia
    clean, noisy = _ig_ssim(model, x[:1], y[:1]), _ig_ssim(model, x[:1], y[:1], noise=0.1)
    assert noisy < clean - 0.2
