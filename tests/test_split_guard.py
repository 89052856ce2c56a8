"""splitfl.split.guard: the hospitals' loss check refuses a run whose loss does not fall, says why, and lets
a learning run through."""
from __future__ import annotations

import math

import pytest

from splitfl.engine import RunError
from splitfl.split.guard import LossGuard, LossGuardError


def test_a_flat_loss_is_refused_at_the_first_check():
    guard = LossGuard(steps=5, ratio=0.95)
    for _ in range(9):
        guard.observe(math.log(2))
    with pytest.raises(LossGuardError, match=r"after 10 training steps.*split.loss_guard_ratio"):
        guard.observe(math.log(2))


def test_a_falling_loss_passes_and_a_later_rise_is_caught():
    guard = LossGuard(steps=4, ratio=0.9)
    for step in range(40):
        guard.observe(0.7 * 0.97 ** step)  # an ordinary learning curve
    with pytest.raises(LossGuardError):
        for _ in range(4):  # the server switches to steering the encoder: the loss goes back up
            guard.observe(0.7)


@pytest.mark.parametrize("steps, ratio", [(0, 0.9), (4, 0.0), (4, 1.5)])
def test_bad_settings_are_refused(steps, ratio):
    with pytest.raises(RunError, match="loss_guard"):
        LossGuard(steps, ratio)
