"""Checkpoints and resume: what must match to resume a run, and what a finished model carries.

A run writes ``checkpoint.pt`` every epoch (atomically) and ``best_model.pt`` when validation
improves; rerunning the same command resumes, and a changed configuration is refused with the
keys that differ rather than silently mixing two runs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from splitfl.config import RunConfig, with_defaults

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.pt"


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resume_key(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config that must match to resume: all but display and evaluation settings.

    ``train.epochs`` is included because the learning-rate schedule depends on it.
    """
    d = config_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("progress", "eval_batch_size")}
    return d


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def load_resume_state(path: Path, key: dict[str, Any], default_key: dict[str, Any], error: type[Exception],
                      what: str = "a run") -> dict[str, Any]:
    """A checkpoint's state, refused with the keys that differ when it was saved under another configuration.

    ``key`` is this run's resume key; the saved one is completed with ``default_key`` first, since keys added to
    splitfl after a run was saved were at their defaults in it.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt file: say so instead of a pickle traceback
        raise error(f"{path}: cannot read checkpoint ({exc}); delete it to start over") from exc
    saved = with_defaults(state.get("resume_key") or {}, default_key)
    if saved != key:
        changed = "; ".join(config_differences(saved, key))
        raise error(f"{Path(path).parent} holds {what} with a different configuration ({changed}); use another --out, "
                    "or delete the folder to start over")
    return state


def best_model_payload(model_state: dict[str, Any], cfg: RunConfig, task: Any, best: dict[str, Any]) -> dict[str, Any]:
    """What later tools (attacks, reports) need to rebuild the model without the training code."""
    return {
        "model": model_state,
        "config": config_dict(cfg),
        "task": dataclasses.asdict(task),
        "epoch": best["epoch"],
        "val_auroc_macro": best["score"],
    }
