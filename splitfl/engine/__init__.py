"""The training engine every regime's runner imports: errors, factories, the epoch loop, checkpoints.

Layering: ``data``, ``models`` and ``he`` sit below this package; the regimes
(``central``, ``split``, ``fed``, ``pretrain``) sit above it and never import one
another's runners; ``train`` dispatches to them. ``pyproject.toml`` declares the
layers and ``tests/test_architecture.py`` checks them with import-linter.
"""
from splitfl.engine.errors import RunError
from splitfl.engine.factories import (
    epoch_loader,
    eval_loader,
    launched_by_fabric_cli,
    make_fabric,
    make_optimizer,
    make_scheduler,
)
from splitfl.engine.loop import evaluate, fit, summarise, supervised_loss, train_one_epoch, write_run_metrics
from splitfl.engine.resume import (
    BEST_MODEL,
    CHECKPOINT,
    best_model_payload,
    config_dict,
    config_differences,
    load_resume_state,
    resume_key,
)

__all__ = [
    "BEST_MODEL", "CHECKPOINT", "RunError", "best_model_payload", "config_dict", "config_differences",
    "epoch_loader", "eval_loader", "evaluate", "fit", "launched_by_fabric_cli", "load_resume_state",
    "make_fabric", "make_optimizer", "make_scheduler", "resume_key", "summarise", "supervised_loss", "train_one_epoch",
    "write_run_metrics",
]
