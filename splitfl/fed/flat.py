"""A model's federated state as one flat float vector, and back.

Aggregation, encryption, masking and sparsification all work on 1-D arrays;
this module fixes the order (the state dict's) so every site and the server
agree on which coordinate is which, and lets a config pick layers by name
(for partial encryption) as index ranges of that vector.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class FlatSpec:
    """Which state-dict entries are federated and where each sits in the flat vector.

    Federated: trainable parameters and floating-point buffers (BatchNorm running
    statistics, which FedAvg averages too). Integer buffers such as
    ``num_batches_tracked`` and frozen parameters stay as the global model has them.
    """

    def __init__(self, model: nn.Module) -> None:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        float_buffers = {name for name, b in model.named_buffers() if b.is_floating_point()}
        entries, offset = [], 0
        for name, value in model.state_dict().items():
            if name in trainable or name in float_buffers:
                entry = Entry(name, tuple(value.shape), offset)
                entries.append(entry)
                offset += entry.size
        if not entries:
            raise ValueError("the model has no trainable parameters or float buffers to federate")
        self.entries: list[Entry] = entries
        self.size = offset

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def flatten(self, model: nn.Module) -> np.ndarray:
        """The federated entries of ``model`` as one float32 vector (a copy, on CPU)."""
        state = model.state_dict()
        out = np.empty(self.size, dtype=np.float32)
        for e in self.entries:
            out[e.offset : e.offset + e.size] = state[e.name].detach().float().cpu().reshape(-1).numpy()
        return out

    def load_into(self, model: nn.Module, flat: np.ndarray) -> None:
        """Overwrite ``model``'s federated entries with ``flat`` (shape-checked)."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat state has shape {flat.shape}, expected ({self.size},)")
        state = model.state_dict()
        with torch.no_grad():
            for e in self.entries:
                target = state[e.name]
                chunk = torch.from_numpy(np.ascontiguousarray(flat[e.offset : e.offset + e.size]))
                target.copy_(chunk.reshape(e.shape).to(dtype=target.dtype, device=target.device))

    def select(self, patterns: list[str]) -> np.ndarray:
        """Boolean mask over the vector for entries whose name matches any glob pattern; all when empty."""
        mask = np.zeros(self.size, dtype=bool)
        if not patterns:
            mask[:] = True
            return mask
        matched = False
        for e in self.entries:
            if any(fnmatch.fnmatchcase(e.name, p) for p in patterns):
                mask[e.offset : e.offset + e.size] = True
                matched = True
        if not matched:
            sample = ", ".join(self.names[:3] + ["..."] + self.names[-3:])
            raise ValueError(f"fed.he_layers {patterns} match no parameter; names look like: {sample}")
        return mask
