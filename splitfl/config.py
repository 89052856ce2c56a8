"""Typed run configuration, parsed from YAML and the command line by jsonargparse.

Dataclasses give every key a type, a default and a docstring; jsonargparse
rejects unknown keys, so a typo in a YAML file is an error rather than a
silently ignored setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from splitfl.config_help import add_field_help

# Environment variable naming a folder of MedMNIST ``.npz`` files.
MEDMNIST_DIR_ENV = "SPLITFL_MEDMNIST_DIR"


@dataclass
class PartitionConfig:
    """How the training split is divided among simulated hospitals (sites)."""

    # iid, label skew (dirichlet), size skew (quantity), both (dirichlet_quantity), or the data's own site ids (natural)
    scheme: Literal["iid", "dirichlet", "quantity", "dirichlet_quantity", "natural"] = "iid"
    num_sites: int = 4  # number of simulated hospitals
    alpha: float = 0.5  # Dirichlet concentration (label skew for 'dirichlet'/'dirichlet_quantity', sizes for 'quantity')
    quantity_alpha: float = 1.0  # 'dirichlet_quantity': Dirichlet concentration of the site sizes
    min_site_size: int = 10  # fewest training images any site may get
    seed: int = 0  # seed of the partition draw


@dataclass
class DataConfig:
    """Where the images come from."""

    # generated images, a MedMNIST .npz, or a CSV manifest
    source: Literal["synthetic", "medmnist", "folder"] = "synthetic"
    # synthetic: which modality to generate
    modality: Literal["xray", "fundus", "histology"] = "xray"
    n_train: int = 2000  # synthetic: training images
    n_val: int = 400  # synthetic: validation images
    n_test: int = 600  # synthetic: test images
    # medmnist: dataset flag (e.g. pneumoniamnist)
    flag: str = "pneumoniamnist"
    root: Optional[str] = None  # medmnist: folder of the .npz files (default: $SPLITFL_MEDMNIST_DIR)
    # the file's MD5 against medmnist's metadata: warn on a mismatch (default), refuse it (strict), or skip (off)
    md5_check: Literal["warn", "strict", "off"] = "warn"
    # image side in pixels: synthetic renders at it, medmnist picks that file (28/64/128/224), folder resizes
    size: int = 28
    # folder: CSV manifest with columns path,label[,site][,split]
    manifest: Optional[str] = None
    # folder: the kind of task (None: binary for 2 labels, else multiclass)
    task_type: Optional[Literal["binary", "multiclass", "ordinal", "multilabel"]] = None
    # folder: class names in label-index order (None: the manifest's labels, sorted)
    label_names: Optional[list[str]] = None
    n_channels: int = 3  # folder: image channels, 1 (grey) or 3 (RGB)
    val_fraction: float = 0.15  # folder without a split column: share of images for validation
    test_fraction: float = 0.15  # folder without a split column: share of images for test
    # all sources: cap the number of training images (None: use all), for quick runs
    max_train: Optional[int] = None
    seed: int = 0  # seed of the synthetic images, the max_train subset and the folder split
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass
class ModelConfig:
    """Which timm model, where it is cut, and how its weights start."""

    name: str = "resnet18"  # timm model name (timm.list_models())
    pretrained: Optional[str] = None  # local checkpoint file (timm names or plain state dict)
    # key layout of that file: detected from its keys (auto), or named; see docs/foundation-models.md
    pretrained_format: Literal["auto", "timm", "retfound", "uni", "dinov2", "phikon"] = "auto"
    cut: str = "pooled"  # 'pooled', 'mlp', or 'stage:N'
    mlp_hidden: int = 128  # hidden width of the MLP head (cut: mlp)
    # MLP head activation; square/poly2 are CKKS-friendly polynomials
    mlp_activation: Literal["relu", "gelu", "square", "poly2"] = "relu"
    # How hospitals adapt the encoder: frozen (freeze_encoder: true; only the head trains, and with
    # split.cache_embeddings the embeddings are computed once), the last N blocks tuned (tune_last_blocks: N,
    # timm's parameter groups, the final norm with them), or neither: full fine-tuning.
    freeze_encoder: bool = False
    tune_last_blocks: Optional[int] = None  # N: train only the encoder's last N blocks (and the head); None: off
    # 3x3 stride-1 stem without max-pool (the MedMNIST v2 28 px ResNet): keeps more resolution on tiny
    # images at ~6x the compute. An ImageNet checkpoint's 7x7 stem cannot be used with it (reported, re-initialised).
    small_input_stem: bool = False
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate), in [0, 1)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model, e.g. {patch_size: 4}


@dataclass
class TrainConfig:
    """Optimisation and hardware."""

    epochs: int = 5  # passes over the training data (fedavg/fedprox: rounds)
    batch_size: int = 64  # images per training step (per hospital in split and federated regimes)
    lr: float = 1e-3  # learning rate (the start of the cosine or multistep schedule)
    # torch optimizer (split-he-full needs sgd, momentum 0, weight_decay 0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0  # L2 weight decay (decoupled for adamw)
    momentum: float = 0.9  # sgd only
    # per epoch: cosine decay to 0, or x0.1 at 50% and 75% of the epochs
    scheduler: Literal["none", "cosine", "multistep"] = "cosine"
    accelerator: str = "auto"  # Lightning Fabric accelerator: auto, cpu, cuda, mps, ...
    devices: int = 1  # Lightning Fabric devices
    precision: str = "32-true"  # Lightning Fabric precision, e.g. 32-true, bf16-mixed
    eval_batch_size: int = 256  # images per batch when evaluating or computing embeddings
    progress: bool = True  # show progress bars


@dataclass
class SplitConfig:
    """Split-learning protocol settings (regimes ``split-plain``, ``split-he`` and ``split-he-full``).

    Hospitals take turns batch by batch (round-robin) against one server head and
    relay the encoder weights among themselves, as in sequential split learning:
    the server never sees encoder weights, labels or the loss.
    """

    he_preset: str = "default"  # CKKS parameter preset (splitfl.he.params.PRESETS)
    # Differential privacy on the head updates the server receives in split-he:
    # per-sample clipping to dp_max_grad_norm and Gaussian noise of std noise_multiplier * max_grad_norm.
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0  # 0: no clipping (and no DP)
    dp_delta: float = 1e-5  # the delta at which the spent epsilon is reported
    cache_embeddings: bool = True  # frozen encoder: compute each hospital's features once
    # MLP head, split-he: evaluate (validation/test) with one round trip, the polynomial activation computed on
    # ciphertexts by the server (needs model.mlp_activation square/poly2 and he_preset deep), or layer by layer
    # with the activation at the hospital (training always uses the latter).
    mlp_inference: Literal["interactive", "noninteractive"] = "interactive"
    transcript: bool = False  # record the server's view (every message in and out) under <out>/transcript
    transcript_max_steps: int = 20  # training steps recorded (evaluation traffic is not recorded)
    # Hospitals' check against a server steering their encoder (splitfl.split.guard): from step 2 x loss_guard_steps
    # on, stop when the mean training loss of the last loss_guard_steps steps is above loss_guard_ratio x that of
    # the first ones (None: no check)
    loss_guard_steps: Optional[int] = None
    loss_guard_ratio: float = 0.95  # the loss guard refuses above this ratio (see loss_guard_steps)
    # split-he-full: updates of the encrypted head between two refreshes (key holders decrypt and re-encrypt it)
    full_refresh_every: int = 1000
    # CKKS worker processes per party (SEAL holds Python's GIL, so more cores means processes): the hospitals'
    # encryptions and decryptions and, in split-he, the server's head products; 1 = all in the party's own process,
    # 0 = one per core (see splitfl bench he-head --workers for what they save)
    he_workers: int = 1


@dataclass
class FedConfig:
    """Federated averaging (regimes ``fedavg`` and ``fedprox``); ``train.epochs`` is the number of rounds.

    Every round the server sends the global model to a sample of sites; each
    trains it for ``local_epochs`` on its own images and returns its update
    (new weights minus global weights), which the server averages weighted by
    sample counts.
    """

    local_epochs: int = 1  # passes over its own images each sampled site makes per round
    # At most this many optimizer steps per site per round (None: whole local epochs). 1 with plain SGD is FedSGD:
    # the update is -lr x one batch's gradient, the setting of the gradient-inversion literature (attacks/).
    local_steps: Optional[int] = None
    # Normalisation layers of the federated model. BatchNorm's running statistics break under label skew
    # (Hsieh et al. 2020, "The Non-IID Data Quagmire"); GroupNorm has none, and DP-SGD requires it anyway.
    norm: Literal["batchnorm", "groupnorm"] = "groupnorm"
    client_fraction: float = 1.0  # share of sites sampled per round (at least one)
    min_sites: int = 1  # a round with fewer accepted updates leaves the global model unchanged
    mu: float = 0.01  # FedProx proximal strength (regime fedprox only)
    server_lr: float = 1.0  # global step on the averaged update (1.0: plain FedAvg)
    # Plaintext robust aggregation (Yin et al. 2018); secure aggregation needs 'mean'.
    aggregator: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_ratio: float = 0.1  # trimmed_mean: share cut from each end per coordinate
    # Keep individual updates from the server: CKKS-encrypted aggregation or pairwise masks (Bonawitz et al.).
    secure: Literal["none", "he", "masks"] = "none"
    he_preset: str = "aggregation"  # secure he: CKKS parameter preset (splitfl.he.params.PRESETS)
    # Encrypt only parameters matching these glob patterns (e.g. ['fc.*', 'head.*']); empty: the whole update.
    # The rest travels and is averaged in plaintext, as NVFlare's partial encryption.
    he_layers: list[str] = field(default_factory=list)
    secagg_threshold: Optional[int] = None  # masks: survivors needed to unmask (default: a majority of the round's sites)
    # Top-k sparsification with error feedback (plaintext aggregation only); 0: send dense updates.
    topk_fraction: float = 0.0
    # Reject an update whose L2 norm exceeds this multiple of the round's median norm (needs 3+ updates); 0: off.
    reject_norm_factor: float = 10.0
    # Opacus DP-SGD at each site: per-sample clipping, Gaussian noise, Poisson sampling. Give either a noise
    # multiplier or a target epsilon (the noise is then set for every round's participation).
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: Optional[float] = None  # epsilon each site may spend over the whole run
    dp_max_grad_norm: float = 1.0  # per-sample gradient clipping norm (L2)
    dp_delta: float = 1e-5  # the delta of the (epsilon, delta) guarantee
    # Record the server's view (global model sent, every upload received, byte for byte) under <out>/transcript,
    # for the attack harness; the hospitals add ground_truth.jsonl (which images each step used: the
    # evaluation key, never sent to the server).
    transcript: bool = False
    transcript_max_rounds: int = 3  # rounds recorded
    # Hospital-side check of each global model received against the previous round's (against crafted weights): refuse
    # to train if names/shapes differ or a tensor moved by more than this x max(its norm, 0.01 sqrt(size)). None: off.
    model_guard: Optional[float] = None


@dataclass
class RunConfig:
    """One training job."""

    # centralized (pooled data), local (each site alone), split learning (split-*), or federated (fedavg, fedprox)
    regime: Literal["centralized", "local", "split-plain", "split-he", "split-he-full", "fedavg", "fedprox"] = "centralized"
    seed: int = 0  # seed of weight initialisation and batch order
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    fed: FedConfig = field(default_factory=FedConfig)


def with_defaults(saved: Any, defaults: Any) -> Any:
    """A saved config dict with the keys it lacks taken from ``defaults`` (recursively).

    A run saved by an older splitfl lacks keys added since; it ran with their defaults (a new key's default keeps
    the old behaviour), so comparisons for reuse and resume fill them in rather than call the configs different.
    """
    if not isinstance(defaults, dict) or not isinstance(saved, dict):
        return saved
    return {**defaults, **{k: with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


# ----------------------------------------------------------------------------- parsing


def run_config_parser(description: str) -> ArgumentParser:
    """``--config FILE`` plus every RunConfig key as a flag (``--train.lr 0.01``): the command line of a run."""
    parser = ArgumentParser(description=description, exit_on_error=True)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the keys below")
    parser.add_class_arguments(RunConfig)
    add_field_help(parser, RunConfig)
    return parser


def build_train_parser() -> ArgumentParser:
    """``splitfl train``'s command line; also the one ``fabric run splitfl/train.py`` parses."""
    parser = run_config_parser(
        "Train a model (regimes: centralized, local, split-plain, split-he, split-he-full, fedavg, fedprox) and write "
        "metrics.json, history.csv, checkpoints, plots.")
    parser.add_argument("--out", type=str, required=True, help="output folder; rerun with the same folder to resume")
    return parser


def run_config_from_namespace(ns: Any) -> RunConfig:
    """A parsed namespace (already holding dataclass instances) as one RunConfig."""
    return RunConfig(**{f.name: ns[f.name] for f in fields(RunConfig)})


def instantiate(parser: ArgumentParser, ns: Any) -> Any:
    """Nested dataclasses built from a parsed namespace (``instantiate`` in newer jsonargparse, else the old name)."""
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return build(ns)


_DICT_PARSER: ArgumentParser | None = None


def run_config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """A RunConfig from a plain dict (a config file's or a recorded run's), type-checked like ``splitfl train``'s."""
    global _DICT_PARSER
    if _DICT_PARSER is None:
        _DICT_PARSER = ArgumentParser(exit_on_error=False)
        _DICT_PARSER.add_class_arguments(RunConfig)
    ns = _DICT_PARSER.parse_object(tree)
    return run_config_from_namespace(instantiate(_DICT_PARSER, ns))
