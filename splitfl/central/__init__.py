"""Centralized and local-only training: the upper and lower yardsticks for every collaborative regime."""
from splitfl.central.runner import PlainRunner, run_centralized, run_local, train_plain

__all__ = ["PlainRunner", "run_centralized", "run_local", "train_plain"]
