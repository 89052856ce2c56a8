"""Errors a user can fix, and how the command line shows them.

Every module that raises an error whose message tells the user what to change
(a bad config value, a missing file, a run folder that cannot resume) derives
it from :class:`UserError`, so the CLI catches one type and prints one line
instead of a traceback. This module imports nothing heavy: the CLI can catch
errors without loading torch first.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """An error the user can fix; the message says what is wrong, where, and what to do."""


@contextmanager
def exit_on_user_error(command: str) -> Iterator[None]:
    """A :class:`UserError` or a missing file becomes one ``<command>: error: ...`` line and exit status 2.

    Ctrl-C says how to resume (every regime checkpoints each epoch) and exits 130.
    """
    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
