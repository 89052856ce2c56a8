"""What every regime builds the same way: the Fabric, optimizers, schedulers and data loaders.

One place for these so that centralized, split and federated runs of one config train with
identical optimizers and see identical batches (a resumed run too: the order depends only on
``(seed, epoch)``).
"""
from __future__ import annotations

from typing import Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.connector import _is_using_cli
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from splitfl.config import TrainConfig
from splitfl.engine.errors import RunError


def launched_by_fabric_cli() -> bool:
    """True under ``fabric run``: the launcher has started the processes and its flags win."""
    return _is_using_cli()


def make_fabric(cfg: TrainConfig) -> Fabric:
    """A Fabric for this run; under ``fabric run`` the launcher's flags win."""
    if launched_by_fabric_cli():
        return Fabric()
    return Fabric(accelerator=cfg.accelerator, devices=cfg.devices, precision=cfg.precision)


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise RunError("no trainable parameters: the encoder is frozen and the head has none")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    if cfg.scheduler == "multistep":  # the MedMNIST v2 schedule: x0.1 at 50% and 75% of training
        milestones = [int(0.5 * cfg.epochs), int(0.75 * cfg.epochs)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return None


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> DataLoader:
    """Shuffled loader whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=len(dataset) > batch_size)


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
