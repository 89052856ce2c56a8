"""Embeddings of a frozen encoder, computed once per image.

With a frozen foundation model (FOCAL's default adaptation) only the head
trains, and there is no data augmentation, so an image's embedding is the same
every epoch: every regime computes it once and trains the head on the cache.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

__all__ = ["encode_images", "embedded_dataset"]


@torch.no_grad()
def encode_images(encoder: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """``encoder(images)`` in eval mode, in batches, on ``device``; returned on the CPU."""
    was_training = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])
    finally:
        encoder.train(was_training)


def embedded_dataset(encoder: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int,
                     device: torch.device | str) -> TensorDataset:
    """(embedding, label) pairs for every item of an image dataset holding ``_x`` and ``_y`` tensors."""
    return TensorDataset(encode_images(encoder, dataset._x, batch_size, device), dataset._y)
