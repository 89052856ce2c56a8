"""Typed run configuration, parsed from YAML and the command line by jsonargparse.

Dataclasses give every key a type, a default and a docstring; jsonargparse
rejects unknown keys, so a typo in a YAML file is an error rather than a
silently ignored setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# Environment variable naming a folder of MedMNIST ``.npz`` files.
MEDMNIST_DIR_ENV = "SPLITFL_MEDMNIST_DIR"


@dataclass
class PartitionConfig:
    """How the training split is divided among simulated hospitals (sites)."""

    scheme: Literal["iid", "dirichlet", "quantity", "dirichlet_quantity", "natural"] = "iid"
    num_sites: int = 4
    alpha: float = 0.5  # Dirichlet concentration (label skew for 'dirichlet'/'dirichlet_quantity', sizes for 'quantity')
    quantity_alpha: float = 1.0  # 'dirichlet_quantity': Dirichlet concentration of the site sizes
    min_site_size: int = 10
    seed: int = 0


@dataclass
class DataConfig:
    """Where the images come from."""

    source: Literal["synthetic", "medmnist", "folder"] = "synthetic"
    # synthetic: which modality to generate and how many images per split
    modality: Literal["xray", "fundus", "histology"] = "xray"
    n_train: int = 2000
    n_val: int = 400
    n_test: int = 600
    # medmnist: dataset flag (e.g. pneumoniamnist) and folder of .npz files
    flag: str = "pneumoniamnist"
    root: Optional[str] = None  # default: $SPLITFL_MEDMNIST_DIR
    # the file's MD5 against medmnist's metadata: warn on a mismatch (default), refuse it (strict), or skip (off)
    md5_check: Literal["warn", "strict", "off"] = "warn"
    size: int = 28
    # folder: CSV manifest with columns path,label[,site][,split]
    manifest: Optional[str] = None
    task_type: Optional[Literal["binary", "multiclass", "ordinal", "multilabel"]] = None
    label_names: Optional[list[str]] = None
    n_channels: int = 3
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # all sources: cap the number of training images (None: use all), for quick runs
    max_train: Optional[int] = None
    seed: int = 0
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass
class ModelConfig:
    """Which timm model, where it is cut, and how its weights start."""

    name: str = "resnet18"
    pretrained: Optional[str] = None  # local checkpoint file (timm names or plain state dict)
    # key layout of that file: detected from its keys (auto), or named; see docs/foundation-models.md
    pretrained_format: Literal["auto", "timm", "retfound", "uni", "dinov2", "phikon"] = "auto"
    cut: str = "pooled"  # 'pooled', 'mlp', or 'stage:N'
    mlp_hidden: int = 128
    mlp_activation: Literal["relu", "gelu", "square", "poly2"] = "relu"
    # How hospitals adapt the encoder: frozen (freeze_encoder: true; only the head trains, and with
    # split.cache_embeddings the embeddings are computed once), the last N blocks tuned (tune_last_blocks: N,
    # timm's parameter groups, the final norm with them), or neither: full fine-tuning.
    freeze_encoder: bool = False
    tune_last_blocks: Optional[int] = None
    # 3x3 stride-1 stem without max-pool (the MedMNIST v2 28 px ResNet): keeps more resolution on tiny
    # images at ~6x the compute. An ImageNet checkpoint's 7x7 stem cannot be used with it (reported, re-initialised).
    small_input_stem: bool = False
    drop_rate: float = 0.0
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model, e.g. {patch_size: 4}


@dataclass
class TrainConfig:
    """Optimisation and hardware."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["none", "cosine", "multistep"] = "cosine"
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "32-true"
    eval_batch_size: int = 256
    progress: bool = True


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
    dp_delta: float = 1e-5
    cache_embeddings: bool = True  # frozen encoder: compute each hospital's features once
    # MLP head, split-he: evaluate (validation/test) with one round trip, the polynomial activation computed on
    # ciphertexts by the server (needs model.mlp_activation square/poly2 and he_preset deep), or layer by layer
    # with the activation at the hospital (training always uses the latter).
    mlp_inference: Literal["interactive", "noninteractive"] = "interactive"
    transcript: bool = False  # record the server's view (every message in and out) under <out>/transcript
    transcript_max_steps: int = 20  # training steps recorded (evaluation traffic is not recorded)
    # split-he-full: updates of the encrypted head between two refreshes (key holders decrypt and re-encrypt it)
    full_refresh_every: int = 1000


@dataclass
class FedConfig:
    """Federated averaging (regimes ``fedavg`` and ``fedprox``); ``train.epochs`` is the number of rounds.

    Every round the server sends the global model to a sample of sites; each
    trains it for ``local_epochs`` on its own images and returns its update
    (new weights minus global weights), which the server averages weighted by
    sample counts.
    """

    local_epochs: int = 1
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
    he_preset: str = "aggregation"
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
    dp_target_epsilon: Optional[float] = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    # Record the server's view (global model sent, every upload received, byte for byte) under <out>/transcript,
    # for the attack harness; the hospitals add ground_truth.jsonl (which images each step used: the
    # evaluation key, never sent to the server).
    transcript: bool = False
    transcript_max_rounds: int = 3


@dataclass
class RunConfig:
    """One training job."""

    regime: Literal["centralized", "local", "split-plain", "split-he", "split-he-full", "fedavg", "fedprox"] = "centralized"
    seed: int = 0
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
