"""The hospitals' check of their own training progress against a server that steers their encoder.

A split-learning server that returns crafted gradients instead of its head's (feature-space hijacking,
Pasquini et al. 2021) leaves the hospitals' loss where it started: the head it reports logits from is
not learning their task. The hospitals see every loss they compute, so they can refuse to go on when
training makes no progress. The check is only as good as the server's clumsiness: a server that also
trains an honest head on the logit gradients it receives makes the loss fall as usual (measured in
attacks/README.md, "Hospital-side checks").
"""
from __future__ import annotations

from splitfl.engine import RunError


class LossGuardError(RunError):
    """A hospital refused to go on training: its loss did not fall (a server steering the encoder?)."""


class LossGuard:
    """From step ``2 * steps`` on, refuse when the mean loss of the last ``steps`` training steps is above
    ``ratio`` times the mean of the first ``steps``."""

    def __init__(self, steps: int, ratio: float) -> None:
        if steps < 1 or not 0.0 < ratio <= 1.0:
            raise RunError(f"split.loss_guard_steps={steps} must be >= 1 and split.loss_guard_ratio={ratio} in (0, 1]")
        self.steps, self.ratio = int(steps), float(ratio)
        self.losses: list[float] = []

    def observe(self, loss: float) -> None:
        """Record one training step's loss; raise :class:`LossGuardError` when training is not progressing."""
        self.losses.append(float(loss))
        n = self.steps
        if len(self.losses) < 2 * n:
            return
        first = sum(self.losses[:n]) / n
        last = sum(self.losses[-n:]) / n
        if last > self.ratio * first:
            raise LossGuardError(
                f"split.loss_guard: after {len(self.losses)} training steps the hospitals' mean loss over the last {n} "
                f"steps is {last:.4f}, not below {self.ratio:g} x the first {n} steps' {first:.4f}: the server's head "
                "is not learning the task (a server steering the encoder, e.g. feature-space hijacking). Training "
                "stopped; check the server, or raise split.loss_guard_ratio / unset split.loss_guard_steps if the "
                "task learns this slowly.")
