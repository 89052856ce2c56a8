"""The label attacks' AUC depends on the scores' order only, however large (ciphertexts read without the key)."""
from __future__ import annotations

import numpy as np

from attacks.split_inversion import _auc


def test_auc_is_rank_based_and_does_not_saturate():
    y = np.array([0, 1, 0, 1, 1, 0])
    small = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3])
    assert _auc(small, y) == 1.0
    assert _auc(small * 1e22, y) == 1.0  # a sigmoid would tie every score at 1.0: AUC 0.5
    assert _auc(-small * 1e22, y) == 0.0
    assert abs(_auc(np.array([0.1, 0.9, 0.9, 0.8, 0.7, 0.3]), y) - 13 / 18) < 1e-6  # ties share their rank
    assert _auc(np.ones(6), y) == 0.5 and _auc(small, np.ones(6, dtype=int)) is None
