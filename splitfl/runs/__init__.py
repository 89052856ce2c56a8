"""Reading a run folder: the public API that ``attacks``, ``interpret`` and ``compare`` build on.

A run folder (``splitfl train --out DIR``) holds ``config.yaml``, ``metrics.json``, ``best_model.pt``
and, when recorded, ``transcript/`` (what the server observed). These modules read them back, so
tools above the regimes never reach into a regime's or another tool's internals.
"""
from splitfl.runs.model import FED_REGIMES, RunLoadError, TrainedRun, build_run_model, load_run
from splitfl.runs.status import is_finished
from splitfl.runs.transcript import Transcript, TranscriptError, read_transcript

__all__ = ["FED_REGIMES", "RunLoadError", "TrainedRun", "Transcript", "TranscriptError", "build_run_model",
           "is_finished", "load_run", "read_transcript"]
