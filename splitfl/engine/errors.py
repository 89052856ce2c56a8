"""The one error every training regime raises when a run cannot start, resume or go on as asked."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class RunError(RuntimeError):
    """A run cannot start or resume as asked; the message says what to do."""


@contextmanager
def exit_on_user_error(command: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Errors a user can fix become one ``<command>: error: ...`` line and exit status 2, not a traceback.

    Ctrl-C says how to resume (every regime checkpoints each epoch) and exits 130.
    """
    try:
        yield
    except errors as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
