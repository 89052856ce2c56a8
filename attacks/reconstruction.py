"""One attack's output on one observed message, with the ground truth the scoring (never the attack) reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reconstruction:
    """What one attack produced from one observed message, and which images (ground truth) were behind it."""

    label: str  # e.g. "round 0 site 2"
    view: str  # what the server held: "plaintext update", "ciphertexts read without the key", ...
    site: int
    indices: list[int]  # into the site's data (evaluation key)
    images: torch.Tensor  # reconstructions, model input range
    labels: torch.Tensor | None = None  # inferred labels, where the attack infers them
    seconds: float = 0.0
    # Images of several sites behind one message (the FedAvg aggregate): (site, index) pairs; site/indices unused.
    sources: list[tuple[int, int]] | None = None

    def originals(self) -> list[tuple[int, int]]:
        """(site, index) of every image behind the observed message."""
        return list(self.sources) if self.sources is not None else [(self.site, i) for i in self.indices]
