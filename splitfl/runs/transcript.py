"""Read what the server of a real run observed (``<run>/transcript``), step by step.

splitfl's recorders (``split.transcript`` / ``fed.transcript``) write every
message the server received or sent, byte for byte, with ``index.jsonl``
naming them and ``meta.json`` saying what an attacker knows (the
configuration, the architecture). The hospitals add ``ground_truth.jsonl``:
which of their images each step used (FedAvg: ``{round, site, batches}``;
split: ``{step, site, indices}``). That file is the *evaluation key*: the
attacks never read it, only the scoring does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitfl.config import run_config_from_dict


class TranscriptError(ValueError):
    """A transcript folder that is missing, incomplete or not of the expected kind."""


@dataclass
class Transcript:
    """The server's view of a run: ``steps[step][kind]`` is the exact payload (bytes)."""

    folder: Path
    meta: dict[str, Any]
    steps: dict[int, dict[str, bytes]]  # the first message of each kind in each step
    ground_truth: list[dict[str, Any]] = field(default_factory=list)
    parts: dict[tuple[int, str], list[bytes]] = field(default_factory=dict)  # every message of a kind, in order

    def messages(self, step: int, kind: str) -> list[bytes]:
        """Every message of ``kind`` in ``step`` (several when a batch travelled in parts)."""
        return self.parts.get((step, kind), [])

    @property
    def config(self) -> dict[str, Any]:
        if "config" not in self.meta:
            raise TranscriptError(f"{self.folder}/meta.json has no 'config': record it with a current splitfl")
        return self.meta["config"]

    def run_config(self) -> Any:
        """The recorded run's RunConfig (the server coordinated that run, so the attacker knows it)."""

        return run_config_from_dict(self.config)

    def payload(self, step: int, kind: str) -> bytes | None:
        return self.steps.get(step, {}).get(kind)

    def json(self, step: int, kind: str) -> dict[str, Any]:
        data = self.payload(step, kind)
        if data is None:
            raise TranscriptError(f"{self.folder}: step {step} has no {kind!r} message")
        return json.loads(data)

    def truth(self, round_index: int, site: int) -> list[list[int]]:
        """The image indices (into the site's data) of each local step of that round (the evaluation key)."""
        for entry in self.ground_truth:
            if entry["round"] == round_index and entry["site"] == site:
                return entry["batches"]
        raise TranscriptError(f"{self.folder}/ground_truth.jsonl has no entry for round {round_index}, site {site}")

    def split_truth(self, step: int) -> tuple[int, list[int]]:
        """Split regimes: (site, image indices into the site's data) of one recorded training step (the evaluation key)."""
        for entry in self.ground_truth:
            if entry.get("step") == step and "indices" in entry:
                return int(entry["site"]), [int(i) for i in entry["indices"]]
        raise TranscriptError(f"{self.folder}/ground_truth.jsonl has no entry for step {step}: record the run with a "
                              "current splitfl (the hospitals write it for every recorded split step)")

    def server_file(self, name: str) -> bytes | None:
        path = self.folder / name
        return path.read_bytes() if path.is_file() else None


def read_transcript(folder: str | Path) -> Transcript:
    """Load a transcript folder; TranscriptError saying what is missing and how to record one."""
    folder = Path(folder)
    index_path, meta_path = folder / "index.jsonl", folder / "meta.json"
    if not index_path.is_file() or not meta_path.is_file():
        raise TranscriptError(
            f"{folder} is not a transcript (needs index.jsonl and meta.json): train with "
            "split.transcript: true (split regimes) or fed.transcript: true (fedavg/fedprox)"
        )
    meta = json.loads(meta_path.read_text())
    steps: dict[int, dict[str, bytes]] = {}
    parts: dict[tuple[int, str], list[bytes]] = {}
    for n, line in enumerate(index_path.read_text().splitlines(), 1):
        entry = json.loads(line)
        path = folder / entry["file"]
        if not path.is_file():
            raise TranscriptError(f"{index_path}:{n} names {entry['file']}, which is missing")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise TranscriptError(f"{path} has {len(data)} bytes, the index says {entry['bytes']}: a torn write?")
        steps.setdefault(int(entry["step"]), {}).setdefault(entry["kind"], data)
        parts.setdefault((int(entry["step"]), entry["kind"]), []).append(data)
    truth_path = folder / "ground_truth.jsonl"
    truth = [json.loads(line) for line in truth_path.read_text().splitlines()] if truth_path.is_file() else []
    return Transcript(folder, meta, steps, truth, parts)
