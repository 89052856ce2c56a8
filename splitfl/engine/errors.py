"""The one error every training regime raises when a run cannot start, resume or go on as asked."""
from __future__ import annotations

from splitfl.errors import UserError


class RunError(UserError, RuntimeError):
    """A run cannot start or resume as asked; the message says what to do."""
