"""The pretraining loop with Lightning Fabric: per-step warmup + cosine, atomic checkpoints, exact resume.

Like ``splitfl train``, every epoch ends with an atomic checkpoint, and rerunning
the same command on the same ``--out`` continues after the last finished epoch
and reproduces the uninterrupted run: the batch order depends only on
(seed, epoch) and the masks / augmentations come from a generator seeded by
(seed, epoch, rank), so nothing depends on where a run stopped. A changed
configuration is refused with the keys that differ.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.connector import _is_using_cli
from timm.optim import param_groups_weight_decay
from torch import nn

from splitfl.artifacts import save_checkpoint, write_csv, write_json, write_text
from splitfl.config import TrainConfig
from splitfl.engine import epoch_loader, load_resume_state, make_fabric, train_one_epoch
from splitfl.models import create_model
from splitfl.pretrain.config import PretrainConfig, PretrainError, PretrainTrainConfig, load_pretrain_config, validate
from splitfl.pretrain.mae import build_mae
from splitfl.pretrain.outputs import ENCODER, plot_loss_curve, save_encoder
from splitfl.pretrain.simclr import build_simclr
from splitfl.pretrain.sources import load_images

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------- setup


def build_encoder(cfg: PretrainConfig) -> nn.Module:
    """The timm model being pretrained, without classifier, built as splitfl builds it downstream."""
    return create_model(
        cfg.model.name,
        num_classes=0,
        in_chans=cfg.channels,
        img_size=cfg.img_size,
        small_input_stem=cfg.model.small_input_stem,
        **cfg.model.timm_kwargs,
    )


def build_method(cfg: PretrainConfig, encoder: nn.Module) -> nn.Module:
    """The encoder wrapped in its objective; refuses a method that does not fit the architecture."""
    if cfg.method == "mae":
        return build_mae(encoder, cfg.model.name, cfg.mae, cfg.channels)
    if cfg.method == "simclr":
        return build_simclr(encoder, cfg.model.name, cfg.simclr)
    raise PretrainError(f"method {cfg.method!r} is unknown; choose mae (ViTs) or simclr")


def make_optimizer(method: nn.Module, tcfg: PretrainTrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on 1-d tensors, position embeddings and special tokens (as MAE and timm do)."""
    encoder = getattr(method, "encoder", None)
    skip = {f"encoder.{n}" for n in getattr(encoder, "no_weight_decay", lambda: set())()}
    skip |= {"mask_token", "decoder_pos_embed"}
    groups = param_groups_weight_decay(method, tcfg.weight_decay, no_weight_decay_list=sorted(skip))
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Batches per epoch of :func:`splitfl.engine.epoch_loader` (it drops the last partial batch)."""
    return n_images // batch_size if n_images > batch_size else 1


def lr_at(step: int, tcfg: PretrainTrainConfig, n_steps: int) -> float:
    """Learning rate of optimizer step ``step``: linear warmup from 0, then cosine down to ``min_lr``."""
    warmup = round(tcfg.warmup_epochs * n_steps / tcfg.epochs)
    if step < warmup:
        return tcfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    return tcfg.min_lr + (tcfg.lr - tcfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_scheduler(optimizer: torch.optim.Optimizer, tcfg: PretrainTrainConfig, n_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, tcfg, n_steps) / tcfg.lr)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Source of every mask and augmentation of one epoch on one device."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch * 1_009 + rank)


def config_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resume_key(cfg: PretrainConfig) -> dict[str, Any]:
    """Everything that must match to resume: all but the progress bar (epochs too: the schedule depends on it)."""
    d = config_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k != "progress"}
    return d


def _load_checkpoint(path: Path, cfg: PretrainConfig, sources: list[dict[str, Any]]) -> dict[str, Any]:
    """A saved run's state, refused if its configuration or its images differ from this one."""
    state = load_resume_state(path, resume_key(cfg), resume_key(PretrainConfig()), PretrainError, "a pretraining run")
    counts = [s["n_images"] for s in sources]
    if state.get("source_counts") not in (None, counts):
        raise PretrainError(
            f"{path.parent}: the sources now hold {counts} images but the checkpoint was trained on "
            f"{state['source_counts']}; the image files changed. Use another --out, or delete the folder to start over"
        )
    return state


def run(cfg: PretrainConfig, out: str | Path) -> dict[str, Any]:
    """Pretrain an encoder and write encoder.pt, checkpoint.pt, history.csv, loss_curve.png, pretrain.json, config.yaml."""
    validate(cfg)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    fabric = make_fabric(TrainConfig(accelerator=tcfg.accelerator, devices=tcfg.devices, precision=tcfg.precision))
    if not _is_using_cli():  # under `fabric run` the launcher has already started the processes
        fabric.launch()
    t0 = time.perf_counter()
    fabric.seed_everything(cfg.seed, verbose=False)

    data, sources = load_images(cfg)
    if len(data) < 2:
        raise PretrainError(f"the sources hold {len(data)} image(s); pretraining needs at least 2")
    encoder = build_encoder(cfg)
    method = build_method(cfg, encoder)
    optimizer = make_optimizer(method, tcfg)
    n_steps = tcfg.epochs * steps_per_epoch(len(data), tcfg.batch_size)
    scheduler = make_scheduler(optimizer, tcfg, n_steps)
    fabric.print(
        f"pretrain {cfg.method} {cfg.model.name}: {len(data)} images ("
        + ", ".join(f"{s['source']}: {s['n_images']}" for s in sources)
        + f") at {cfg.img_size} px x {cfg.channels} ch; {tcfg.epochs} epochs of "
        f"{steps_per_epoch(len(data), tcfg.batch_size)} steps; device {fabric.device}"
    )

    model, optimizer = fabric.setup(method, optimizer)
    history: list[dict[str, Any]] = []
    start_epoch, train_seconds = 0, 0.0
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists():  # loaded after setup, as splitfl.engine.fit does: the state lands on the model's device
        state = _load_checkpoint(ckpt_path, cfg, sources)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch, train_seconds = state["history"], state["epoch"] + 1, state.get("train_seconds", 0.0)
        torch.set_rng_state(state["torch_rng"])
        fabric.print(f"[pretrain] resuming from {ckpt_path} after epoch {state['epoch'] + 1}")

    for epoch in range(start_epoch, tcfg.epochs):
        t_epoch = time.perf_counter()
        loader = fabric.setup_dataloaders(epoch_loader(data, tcfg.batch_size, cfg.seed, epoch))
        generator = epoch_generator(cfg.seed, epoch, fabric.global_rank)
        desc = f"[pretrain {cfg.method}] epoch {epoch + 1}/{tcfg.epochs}"
        loss = train_one_epoch(fabric, model, loader, optimizer, lambda images: (model(images, generator), len(images)),
                               desc, tcfg.progress, step_scheduler=scheduler, error=PretrainError)
        seconds = time.perf_counter() - t_epoch
        train_seconds += seconds
        history.append({"epoch": epoch + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds})
        fabric.print(f"{desc}  loss {loss:.4f}  ({seconds:.1f}s)")
        if fabric.is_global_zero:
            save_checkpoint(ckpt_path, {
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "history": history,
                "train_seconds": train_seconds,
                "torch_rng": torch.get_rng_state(),
                "resume_key": resume_key(cfg),
                "source_counts": [s["n_images"] for s in sources],
            })
            write_csv(out_dir / "history.csv", history)
        fabric.barrier()

    summary = {
        "method": cfg.method,
        "model": cfg.model.name,
        "img_size": cfg.img_size,
        "channels": cfg.channels,
        "sources": sources,
        "n_images": len(data),
        "epochs": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(len(history), 1),
        "wall_seconds": time.perf_counter() - t0,
        "downstream": {
            "model": {
                "name": cfg.model.name,
                "small_input_stem": cfg.model.small_input_stem,
                "timm_kwargs": cfg.model.timm_kwargs,
                "pretrained": str(out_dir / ENCODER),
            },
            "data": {"size": cfg.img_size},
        },
        "config": config_dict(cfg),
    }
    if fabric.is_global_zero:
        summary["encoder"] = save_encoder(out_dir / ENCODER, encoder)
        write_csv(out_dir / "history.csv", history)
        plot_loss_curve(history, out_dir / "loss_curve.png", f"{cfg.method} {cfg.model.name}: {len(data)} images")
        write_text(out_dir / "config.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))
        write_json(out_dir / "pretrain.json", summary)
        fabric.print(
            f"[pretrain] final loss {summary['final_loss']:.4f}; encoder in {out_dir / ENCODER} "
            f"(use model.pretrained: {out_dir / ENCODER} with model.name {cfg.model.name})"
        )
    fabric.barrier()
    return summary


def pretrain_from_file(config_path: str | Path, out: str | Path) -> Path:
    """Run (or resume, or reuse when finished) the pretraining a config file describes; returns its encoder.pt."""
    run(load_pretrain_config(str(config_path)), out)
    return Path(out) / "encoder.pt"
