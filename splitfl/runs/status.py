"""Whether a run folder already holds a finished run of a given config, so multi-run jobs reuse it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from splitfl.config import RunConfig, with_defaults

_DISPLAY_ONLY = {"train": ("progress",)}  # keys that may differ between a finished run and its variant


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _comparable(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = _normalised(cfg_dict)
    for section, keys in _DISPLAY_ONLY.items():
        for key in keys:
            (d.get(section) or {}).pop(key, None)
    return d


def is_finished(run_dir: Path, cfg: RunConfig) -> bool:
    """``run_dir`` holds a finished run (metrics.json) of exactly this config (config.yaml).

    A run writes config.yaml when it starts and metrics.json when it ends; a
    config.yaml newer than metrics.json belongs to a later start (perhaps one
    refused for a changed config), so those metrics are not this config's.
    """
    metrics, saved_cfg = run_dir / "metrics.json", run_dir / "config.yaml"
    if not metrics.is_file() or not saved_cfg.is_file() or saved_cfg.stat().st_mtime_ns > metrics.stat().st_mtime_ns:
        return False
    try:
        saved = yaml.safe_load(saved_cfg.read_text())
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict):
        return False
    # Keys added to splitfl after that run were at their defaults in it (a new key's default keeps old behaviour).
    saved = with_defaults(saved, _normalised(dataclasses.asdict(RunConfig())))
    return _comparable(saved) == _comparable(dataclasses.asdict(cfg))
