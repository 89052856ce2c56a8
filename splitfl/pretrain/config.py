"""Typed configuration of ``splitfl pretrain``, parsed from YAML by jsonargparse like :class:`~splitfl.config.RunConfig`.

Every key has a type and a default, and jsonargparse rejects unknown keys, so
a typo is an error. :func:`validate` adds the checks types cannot express
(ranges, which keys a source kind needs, no test split) with messages that name
the key. This module imports no torch, so ``splitfl --help`` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from splitfl.config_help import add_field_help
from splitfl.errors import UserError

SOURCE_KINDS: tuple[str, ...] = ("medmnist", "folder", "synthetic")
# Splits a source may be drawn from: never 'test', the task's held-out evaluation set.
ALLOWED_SPLITS: tuple[str, ...] = ("train", "val")
_SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


class PretrainError(UserError, ValueError):
    """A pretraining run cannot start or resume as configured; the message says what to change."""


@dataclass
class PretrainModelConfig:
    """The timm architecture being pretrained; downstream runs must use the same three keys under ``model``."""

    name: str = "resnet18"  # timm model name (timm.list_models())
    small_input_stem: bool = False  # 3x3 stride-1 stem without max-pool for tiny images (as model.small_input_stem)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {patch_size: 4} for a ViT on 28 px images


@dataclass
class SourceConfig:
    """One set of images. Labels are never read, whatever the kind.

    * ``medmnist``: ``flag`` (e.g. retinamnist), the file in ``root`` or $SPLITFL_MEDMNIST_DIR; ``size`` picks the
      published file variant (28, 64, 128, 224; default 28).
    * ``folder``: ``path`` is a folder of PNG/JPEG files (searched recursively; every image is used) or a CSV
      manifest with a ``path`` column (relative to the CSV) and an optional ``split`` column.
    * ``synthetic``: ``n`` images per split of splitfl's generator for ``modality``, rendered at ``size``
      (default: the pretraining ``img_size``, at least 16 px).

    ``splits`` (default ``[train]``) selects MedMNIST splits, synthetic streams, or manifest rows by their
    ``split`` column; ``test`` is refused.
    """

    # a MedMNIST file, a folder or CSV manifest, or the generator
    kind: Literal["medmnist", "folder", "synthetic"] = "synthetic"
    splits: Optional[list[str]] = None  # train and/or val (None: [train], a folder: all); test is refused
    flag: Optional[str] = None  # medmnist: dataset flag, e.g. retinamnist
    root: Optional[str] = None  # medmnist: folder of the .npz files (default: $SPLITFL_MEDMNIST_DIR)
    # px; medmnist: file variant (28/64/128/224; None: 28), synthetic: render size (None: img_size, min 16)
    size: Optional[int] = None
    # medmnist: on an MD5 mismatch warn, refuse (strict) or skip (off)
    md5_check: Literal["warn", "strict", "off"] = "warn"
    path: Optional[str] = None  # folder: a folder of PNG/JPEG files or a CSV manifest with a path column
    modality: Literal["xray", "fundus", "histology"] = "xray"  # synthetic: which modality to generate
    n: int = 2000  # synthetic: images generated per split
    max_images: Optional[int] = None  # keep a random (seeded) subset of at most this many images
    seed: int = 0  # synthetic generator seed and the max_images subset seed


@dataclass
class PretrainTrainConfig:
    """Optimisation (AdamW, linear warmup then cosine decay per step) and hardware."""

    epochs: int = 30  # passes over the pooled sources
    batch_size: int = 256  # images per step (SimCLR: 2 views each)
    lr: float = 1.5e-3  # peak AdamW learning rate, reached after the warmup
    min_lr: float = 1e-5  # the cosine ends here
    warmup_epochs: float = 2.0  # linear warmup from 0, may be fractional
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings and tokens (1-d tensors)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    accelerator: str = "auto"  # Lightning Fabric accelerator: auto, cpu, cuda, mps, ...
    devices: int = 1  # Lightning Fabric devices
    precision: str = "32-true"  # Lightning Fabric precision, e.g. 32-true, bf16-mixed
    progress: bool = True  # show progress bars


@dataclass
class MAEConfig:
    """Masked autoencoder (He et al. 2022): the encoder sees the visible patches, a light decoder predicts all pixels."""

    mask_ratio: float = 0.75  # share of each image's patches hidden from the encoder
    decoder_dim: int = 128  # decoder token width
    decoder_depth: int = 2  # decoder transformer blocks
    decoder_heads: int = 4  # decoder attention heads (must divide decoder_dim)
    decoder_mlp_ratio: float = 4.0  # decoder MLP hidden width, as a multiple of decoder_dim
    decoder_pos_embed: Literal["sincos", "learned"] = "sincos"  # fixed 2-D sin-cos, or learned (sin-cos init)
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by the patch's own mean and std


@dataclass
class SimCLRConfig:
    """SimCLR (Chen et al. 2020): two augmented views per image, projection MLP, NT-Xent loss.

    Augmentation strengths follow SimCLR's ImageNet recipe except the crop scale and blur sigma, which are
    set for 28-64 px medical images (SimCLR's blur sigma of 0.1-2 px was for 224 px images).
    """

    temperature: float = 0.2  # NT-Xent softmax temperature
    proj_hidden: int = 512  # projection MLP hidden width
    proj_dim: int = 128  # projection output width (where the loss is computed)
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # [min, max] area fraction of the random crop
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])  # [min, max] crop aspect ratio
    flip_p: float = 0.5  # probability of a horizontal flip
    jitter_p: float = 0.8  # probability of colour jitter (RGB) or brightness-contrast jitter (grey)
    brightness: float = 0.4  # jitter strength: factor drawn from [1 - x, 1 + x]
    contrast: float = 0.4  # jitter strength: factor drawn from [1 - x, 1 + x]
    saturation: float = 0.4  # RGB only: jitter strength, factor drawn from [1 - x, 1 + x]
    hue: float = 0.1  # RGB only: hue rotated by up to +-x of a full turn
    grayscale_p: float = 0.2  # RGB only: probability of turning the view grey
    blur_p: float = 0.5  # probability of a Gaussian blur
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.0])  # [min, max] Gaussian blur sigma in pixels


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(kind="synthetic", modality="xray", n=2000)]


@dataclass
class PretrainConfig:
    """One pretraining job."""

    method: Literal["mae", "simclr"] = "simclr"  # mae (for ViTs) or simclr (for CNNs)
    seed: int = 0  # seed of weight initialisation, batch order, augmentations and masks
    img_size: int = 28  # every source is resized to this
    channels: int = 3  # every source is brought to this: 1 (grey) or 3 (grey repeated / RGB)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    sources: list[SourceConfig] = field(default_factory=_default_sources)  # image sets pooled for pretraining
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)


def source_splits(src: SourceConfig) -> Optional[list[str]]:
    """The splits a source draws from (``[train]`` unless given); None for a manifest or folder without splits."""
    return list(src.splits) if src.splits is not None else (["train"] if src.kind != "folder" else None)


def describe_source(src: SourceConfig, index: int) -> str:
    """``sources[i] (kind name)``, for error messages and logs."""
    what = {"medmnist": src.flag, "folder": src.path, "synthetic": src.modality}[src.kind]
    return f"sources[{index}] ({src.kind} {what})"


def _check_source(src: SourceConfig, index: int) -> None:
    where = describe_source(src, index)
    if src.splits is not None:
        if not src.splits:
            raise PretrainError(f"{where}: splits is empty; list at least one of {list(ALLOWED_SPLITS)} or drop the key")
        if "test" in src.splits:
            raise PretrainError(
                f"{where}: splits includes 'test'. The test split is the task's held-out evaluation set and must not "
                f"be used for pretraining (a foundation model is pretrained on images other than those it is "
                f"evaluated on); use {list(ALLOWED_SPLITS)}"
            )
        bad = [s for s in src.splits if s not in _SPLIT_NAMES]
        if bad:
            raise PretrainError(f"{where}: unknown split(s) {bad}; choose from {list(ALLOWED_SPLITS)}")
    if src.kind == "medmnist" and not src.flag:
        raise PretrainError(f"{where}: kind medmnist needs flag (e.g. flag: retinamnist)")
    if src.kind == "folder" and not src.path:
        raise PretrainError(f"{where}: kind folder needs path (a folder of PNG/JPEG files or a CSV manifest)")
    if src.kind == "synthetic" and (int(src.n) != src.n or src.n < 1):
        raise PretrainError(f"{where}: n must be a positive number of images, got {src.n!r}")
    if src.max_images is not None and src.max_images < 1:
        raise PretrainError(f"{where}: max_images must be a positive number of images or null, got {src.max_images}")


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise PretrainError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


def _check_pair(name: str, pair: list[float], low: float, high: float) -> None:
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise PretrainError(f"{name} must be [min, max] with {low} <= min <= max <= {high}, got {pair!r}")


def validate(cfg: PretrainConfig) -> None:
    """Refuse settings the types allow but the methods cannot use, naming the key."""
    if cfg.channels not in (1, 3):
        raise PretrainError(f"channels must be 1 (grey) or 3 (RGB), got {cfg.channels!r}")
    if int(cfg.img_size) != cfg.img_size or cfg.img_size < 8:
        raise PretrainError(f"img_size must be a whole number of pixels >= 8, got {cfg.img_size!r}")
    if not cfg.sources:
        raise PretrainError("sources is empty; list at least one source (medmnist, folder or synthetic)")
    for i, src in enumerate(cfg.sources):
        _check_source(src, i)
    t = cfg.train
    if t.epochs < 1:
        raise PretrainError(f"train.epochs must be >= 1, got {t.epochs}")
    if t.batch_size < 2:
        raise PretrainError(f"train.batch_size must be >= 2 (SimCLR contrasts the images of a batch), got {t.batch_size}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise PretrainError(f"train.lr must be > 0 and train.min_lr in [0, lr]; got lr {t.lr}, min_lr {t.min_lr}")
    _check_range("train.warmup_epochs", t.warmup_epochs, 0, t.epochs)
    if t.weight_decay < 0:
        raise PretrainError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise PretrainError(f"train.betas must be two AdamW betas in [0, 1), got {t.betas!r}")
    m = cfg.mae
    _check_range("mae.mask_ratio", m.mask_ratio, 0, 1, low_open=True, high_open=True)
    if m.decoder_dim < 4 or m.decoder_dim % m.decoder_heads or m.decoder_depth < 1:
        raise PretrainError(
            f"mae.decoder_dim ({m.decoder_dim}) must be a multiple of mae.decoder_heads ({m.decoder_heads}) and "
            f"mae.decoder_depth ({m.decoder_depth}) >= 1"
        )
    if m.decoder_pos_embed == "sincos" and m.decoder_dim % 4:
        raise PretrainError(f"mae.decoder_dim ({m.decoder_dim}) must be a multiple of 4 for sin-cos position embeddings")
    s = cfg.simclr
    _check_range("simclr.temperature", s.temperature, 0, 10, low_open=True)
    if s.proj_hidden < 1 or s.proj_dim < 1:
        raise PretrainError(f"simclr.proj_hidden and simclr.proj_dim must be >= 1, got {s.proj_hidden}, {s.proj_dim}")
    _check_pair("simclr.crop_scale", s.crop_scale, 0.01, 1.0)
    _check_pair("simclr.crop_ratio", s.crop_ratio, 0.1, 10.0)
    _check_pair("simclr.blur_sigma", s.blur_sigma, 0.0, 10.0)
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "brightness", "contrast", "saturation"):
        _check_range(f"simclr.{key}", getattr(s, key), 0, 1)
    _check_range("simclr.hue", s.hue, 0, 0.5)


def build_pretrain_parser() -> Any:
    """The command line of ``splitfl pretrain``: --config, every PretrainConfig key, --out."""
    parser = ArgumentParser(
        description="Pretrain a foundation encoder without labels (MAE for ViTs, SimCLR for CNNs) and write "
        "encoder.pt for model.pretrained, plus checkpoint.pt, history.csv, loss_curve.png, pretrain.json.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below (see configs/pretrain/)")
    parser.add_class_arguments(PretrainConfig)
    add_field_help(parser, PretrainConfig)
    parser.add_argument("--out", type=str, required=True, help="output folder; rerun with the same folder to resume")
    return parser


def config_from_namespace(ns: Any) -> "PretrainConfig":
    return PretrainConfig(**{name: ns[name] for name in PretrainConfig.__dataclass_fields__})


def load_pretrain_config(path: str) -> "PretrainConfig":
    """A pretraining config file, parsed and type-checked exactly as ``splitfl pretrain --config`` does."""
    parser = build_pretrain_parser()
    try:
        ns = parser.parse_args(["--config", str(path), "--out", "."])
    except Exception as exc:  # jsonargparse's ArgumentError: an unknown key or a value of the wrong type
        raise PretrainError(f"{path}: {' '.join(str(exc).split())}") from None
    return config_from_namespace(parser.instantiate(ns))
