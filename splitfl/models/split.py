"""Cut a timm model into a client-side encoder and a server-side head.

In split learning each hospital runs the encoder on its images and sends only
the activations; the server runs the head (later under CKKS). The two halves
are *views* of the original model: they hold the very same parameter tensors,
so weights loaded into the model before the split are the weights that train,
and ``head(encoder(x))`` reproduces ``model(x)`` bit for bit (the same modules
run in the same order; see the tests).

Cuts:

* ``'pooled'``: encoder = everything up to the pooled pre-logits features
  (``forward_features`` then ``forward_head(pre_logits=True)``); head = the
  model's own linear classifier. Works for any timm model with an
  ``nn.Linear`` classifier.
* ``'mlp'``: the same encoder; head = a fresh :class:`MLPHead` (more server
  compute for HE). The model's classifier is not used.
* ``'stage:N'``: encoder = stem + first N stages (image-like activations);
  head = remaining stages, final norm, pooling and classifier. Needs a
  per-family adapter: ResNet, ConvNeXt, EfficientNet, VisionTransformer.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

from .factory import ModelError
from .heads import ACTIVATIONS, LinearHead, MLPHead

__all__ = ["CUT_FORMS", "SplitModel", "split_model", "valid_cuts"]

CUT_FORMS: tuple[str, ...] = ("pooled", "mlp", "stage:N")
_STAGE_RE = re.compile(r"^stage:(-?\d+)$")


class SplitModel(nn.Module):
    """``encoder`` (client) followed by ``head`` (server): ``forward(x) = head(encoder(x))``.

    Attributes:
        cut: the cut this model was split at ('pooled', 'mlp' or 'stage:N').
        feature_dim: shape of one encoder output (no batch dim), e.g. ``(512,)``
            for a pooled ResNet-18; for stage cuts it depends on the input
            size and is ``None`` unless ``input_shape`` was given to
            :func:`split_model`.
    """

    def __init__(
        self, encoder: nn.Module, head: nn.Module, cut: str, feature_dim: Optional[tuple[int, ...]]
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.cut = cut
        self.feature_dim = feature_dim
        self.encoder_frozen = False
        self._trainable_before: dict[str, bool] = {}
        self._frozen_parts: list[nn.Module] = []  # partly frozen encoder: the frozen submodules, kept in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Client-side parameters (the ones a hospital trains and never sends)."""
        return self.encoder.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Server-side parameters (the ones evaluated under HE)."""
        return self.head.parameters()

    def freeze_encoder(self) -> None:
        """Stop training the encoder: no gradients, and eval mode from now on.

        Eval mode matters as much as ``requires_grad=False``: in train mode
        BatchNorm keeps updating its running statistics from every batch (and
        dropout stays active), so a "frozen" encoder would still drift.
        :meth:`train` therefore keeps a frozen encoder in eval mode.
        """
        if not self.encoder_frozen:  # remember flags, e.g. a deliberately fixed position embedding
            self._trainable_before = {n: p.requires_grad for n, p in self.encoder.named_parameters()}
        self.encoder_frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

    def freeze_encoder_except(self, trainable: set[int]) -> list[str]:
        """Freeze every encoder parameter whose ``id`` is not in ``trainable``; returns the frozen names.

        The largest submodules left wholly frozen (early blocks with their
        BatchNorm and dropout) stay in eval mode through :meth:`train`, for the
        reason :meth:`freeze_encoder` gives.
        """
        frozen = []
        for n, p in self.encoder.named_parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
                frozen.append(n)
        self._frozen_parts = []
        covered: set[int] = set()
        for _, module in self.encoder.named_modules():
            params = list(module.parameters())
            if params and all(not p.requires_grad for p in params) and id(module) not in covered:
                self._frozen_parts.append(module)
                covered.update(id(m) for m in module.modules())
        self.train(self.training)
        return frozen

    def unfreeze_encoder(self) -> None:
        """Train the encoder again (restoring each parameter's previous flag); it follows train/eval mode."""
        before = self._trainable_before if self.encoder_frozen else {}
        self.encoder_frozen = False
        for n, p in self.encoder.named_parameters():
            p.requires_grad_(before.get(n, True))
        self.encoder.train(self.training)

    def train(self, mode: bool = True) -> "SplitModel":
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        for part in self._frozen_parts:
            part.eval()
        return self

    def extra_repr(self) -> str:
        return f"cut={self.cut!r}, feature_dim={self.feature_dim}, encoder_frozen={self.encoder_frozen}"


def split_model(
    model: nn.Module,
    cut: str = "pooled",
    mlp_hidden: int = 128,
    mlp_activation: str = "relu",
    input_shape: Optional[tuple[int, int, int]] = None,
) -> SplitModel:
    """Split a timm model into encoder and head that share its parameters.

    Args:
        model: a timm model (weights already loaded, if any).
        cut: ``'pooled'``, ``'mlp'`` or ``'stage:N'`` (see module docstring).
        mlp_hidden: hidden width of the MLP head (``cut='mlp'``).
        mlp_activation: 'relu', 'gelu', 'square' or 'poly2' (``cut='mlp'``).
        input_shape: ``(C, H, W)`` of one image; only used to work out
            ``feature_dim`` for stage cuts (one no-grad forward of a zero image).

    The model object itself is not modified and keeps working.

    Raises:
        ModelError: unknown cut form, stage index out of range, a family
            without a stage adapter, or a model without a linear classifier
            for ``'pooled'``.
    """
    name = _model_name(model)
    if cut in ("pooled", "mlp"):
        clf_name = _classifier_name(model, name, cut)
        encoder: nn.Module = _PooledEncoder(_view(model, drop=[clf_name] if clf_name else []))
        feature_dim: Optional[tuple[int, ...]] = (int(model.num_features),)
        if cut == "pooled":
            head: nn.Module = LinearHead.from_linear(model.get_classifier())
        else:
            head = _mlp_head(model, name, mlp_hidden, mlp_activation)
        return SplitModel(encoder, head, cut, feature_dim)

    match = _STAGE_RE.match(cut) if isinstance(cut, str) else None
    if match is None:
        raise ModelError(
            f"Unknown cut {cut!r} for {name}. Valid forms: 'pooled', 'mlp', 'stage:N' "
            f"(for this model: {valid_cuts(model)})."
        )
    adapter = _adapter_for(model)
    if adapter is None:
        raise ModelError(
            f"cut={cut!r}: no stage adapter for {name} ({type(model).__name__}); stage cuts support "
            f"{', '.join(a.cls.__name__ for a in _ADAPTERS)}. Use cut='pooled' or 'mlp' for this model."
        )
    n, n_stages = int(match.group(1)), len(adapter.stages(model))
    if not 0 <= n <= n_stages:
        raise ModelError(
            f"cut={cut!r} is out of range for {name}: it has {n_stages} stages, so valid cuts are "
            f"'stage:0' (stem only) to 'stage:{n_stages}' (all stages), plus 'pooled' and 'mlp'."
        )
    encoder, head = adapter.split(model, n)
    split = SplitModel(encoder, head, cut, None)
    if input_shape is not None:
        split.feature_dim = _probe_shape(encoder, input_shape)
    return split


def valid_cuts(model: nn.Module) -> list[str]:
    """Every cut :func:`split_model` accepts for this model."""
    cuts = ["pooled", "mlp"]
    adapter = _adapter_for(model)
    if adapter is not None:
        cuts += [f"stage:{i}" for i in range(len(adapter.stages(model)) + 1)]
    return cuts


# ---------------------------------------------------------------- module views


def _view(module: nn.Module, drop: Iterable[str]) -> nn.Module:
    """Shallow copy of ``module`` that shares everything except the dotted names in ``drop``.

    The copy runs the original class's methods (``forward_head``,
    ``_pos_embed`` ...) on the same submodule and parameter objects, but the
    dropped entries are not registered, so they belong to the other half of
    the split. Accessing a dropped entry raises AttributeError instead of
    silently running it.
    """
    view = copy.copy(module)
    view._modules = dict(module._modules)
    view._parameters = dict(module._parameters)
    view._buffers = dict(module._buffers)
    view._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    nested: dict[str, list[str]] = {}
    for name in drop:
        first, _, rest = name.partition(".")
        if rest:
            nested.setdefault(first, []).append(rest)
            continue
        for registry in (view._modules, view._parameters, view._buffers):
            registry.pop(first, None)
    for first, rest in nested.items():
        view._modules[first] = _view(module._modules[first], rest)
    return view


def _keep_only(module: nn.Module, keep: Iterable[str]) -> nn.Module:
    """View of ``module`` with only the named direct children/parameters/buffers."""
    keep = set(keep)
    names = [*module._modules, *module._parameters, *module._buffers]
    return _view(module, [n for n in names if n not in keep])


class _PooledEncoder(nn.Module):
    """Model up to the pooled pre-logits features, via timm's own forward methods."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body  # the model minus its classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_head(self.body.forward_features(x), pre_logits=True)


class _StageEncoder(nn.Module):
    """Stem, then the first N stages."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential) -> None:
        super().__init__()
        self.stem = stem
        self.stages = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class _StageHead(nn.Module):
    """Remaining stages, the post-stage norm/conv, then the model's own ``forward_head``."""

    def __init__(self, stages: nn.Sequential, post: nn.Module, top: nn.Module) -> None:
        super().__init__()
        self.stages = stages
        self.post = post
        self.top = top  # the model minus its feature layers: pooling, norm, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top.forward_head(self.post(self.stages(x)))


class _VitEmbed(nn.Module):
    """ViT input side of ``forward_features``: patches, tokens + position, pre-norm."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.vit = _keep_only(
            model, ["patch_embed", "pos_drop", "patch_drop", "norm_pre", "cls_token", "reg_token", "pos_embed"]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


@dataclass(frozen=True)
class _StageAdapter:
    """How one family's ``forward_features`` decomposes into stem, stages and post.

    ``features`` names every direct child/parameter used by
    ``forward_features``; the rest of the model (pooling, classifier) is the
    top that runs ``forward_head``. Only applies when the class still uses the
    family's ``forward_features`` (subclasses that override it are refused).
    """

    cls: type
    stem: Callable[[nn.Module], nn.Module]
    stages: Callable[[nn.Module], list[nn.Module]]
    post: Callable[[nn.Module], nn.Module]
    features: tuple[str, ...]

    def applies(self, model: nn.Module) -> bool:
        return isinstance(model, self.cls) and type(model).forward_features is self.cls.forward_features

    def split(self, model: nn.Module, n: int) -> tuple[nn.Module, nn.Module]:
        stages = self.stages(model)
        encoder = _StageEncoder(self.stem(model), nn.Sequential(*stages[:n]))
        top = _view(model, [f for f in self.features if _has_entry(model, f)])
        return encoder, _StageHead(nn.Sequential(*stages[n:]), self.post(model), top)


def _has_entry(module: nn.Module, name: str) -> bool:
    return name in module._modules or name in module._parameters or name in module._buffers


_ADAPTERS: tuple[_StageAdapter, ...] = (
    # ResNet.forward_features: conv1, bn1, act1, maxpool, layer1..layer4
    _StageAdapter(
        cls=ResNet,
        stem=lambda m: nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool),
        stages=lambda m: [m.layer1, m.layer2, m.layer3, m.layer4],
        post=lambda m: nn.Identity(),
        features=("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    ),
    # ConvNeXt.forward_features: stem, stages, norm_pre
    _StageAdapter(
        cls=ConvNeXt,
        stem=lambda m: m.stem,
        stages=lambda m: list(m.stages),
        post=lambda m: m.norm_pre,
        features=("stem", "stages", "norm_pre"),
    ),
    # EfficientNet.forward_features: conv_stem, bn1, blocks, conv_head, bn2
    _StageAdapter(
        cls=EfficientNet,
        stem=lambda m: nn.Sequential(m.conv_stem, m.bn1),
        stages=lambda m: list(m.blocks),
        post=lambda m: nn.Sequential(m.conv_head, m.bn2),
        features=("conv_stem", "bn1", "blocks", "conv_head", "bn2"),
    ),
    # VisionTransformer.forward_features: patch_embed, _pos_embed, patch_drop, norm_pre, blocks, norm
    _StageAdapter(
        cls=VisionTransformer,
        stem=_VitEmbed,
        stages=lambda m: list(m.blocks),
        post=lambda m: m.norm,
        features=(
            "patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm",
            "cls_token", "reg_token", "pos_embed",
        ),
    ),
)


def _adapter_for(model: nn.Module) -> Optional[_StageAdapter]:
    return next((a for a in _ADAPTERS if a.applies(model)), None)


# ---------------------------------------------------------------- helpers


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return f"model {cfg.get('architecture', type(model).__name__)!r}"


def _classifier_name(model: nn.Module, name: str, cut: str) -> Optional[str]:
    """Dotted name of the model's classifier module (None if it has none, e.g. num_classes=0)."""
    if not hasattr(model, "get_classifier") or not hasattr(model, "forward_head"):
        raise ModelError(
            f"cut={cut!r} needs a timm model (with forward_features/forward_head/get_classifier); "
            f"got {type(model).__name__}. Build it with splitfl.models.create_model."
        )
    clf = model.get_classifier()
    if cut == "pooled" and not isinstance(clf, nn.Linear):
        raise ModelError(
            f"cut='pooled' shares the classifier as a linear head, but {name} has "
            f"{type(clf).__name__} as classifier. Create it with num_classes >= 1, or use cut='mlp'."
        )
    if not isinstance(clf, nn.Module) or not any(True for _ in clf.parameters()):
        return None
    return next((n for n, m in model.named_modules() if m is clf and n), None)


def _mlp_head(model: nn.Module, name: str, hidden: int, activation: str) -> MLPHead:
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes < 1:
        raise ModelError(f"cut='mlp' needs the number of classes, but {name} has num_classes={num_classes}.")
    if activation not in ACTIVATIONS:
        raise ModelError(f"mlp_activation={activation!r} is unknown; choose one of {list(ACTIVATIONS)}.")
    return MLPHead(int(model.num_features), hidden, num_classes, activation)


def _probe_shape(encoder: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """Encoder output shape for one image, from a no-grad forward in eval mode."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            param = next(encoder.parameters(), None)
            x = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
            out = encoder(x)
    except RuntimeError as e:
        raise ModelError(f"Encoder cannot run on images of shape {tuple(input_shape)}: {e}") from None
    finally:
        encoder.train(was_training)
    return tuple(out.shape[1:])
