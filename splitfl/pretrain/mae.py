"""Masked autoencoder pretraining (He et al. 2022) of a timm :class:`~timm.models.vision_transformer.VisionTransformer`.

The encoder is the timm ViT itself, run on the visible patches only: its own
``patch_embed``, then its own ``_pos_embed`` (which prepends the prefix tokens,
class and register tokens, and adds the position embeddings in whichever layout
the model uses: with ``no_embed_class`` the patches get their positions before
the prefix tokens are concatenated, otherwise the concatenated sequence does),
then the patch tokens are subsampled per image, after their positions are added
and with the prefix tokens kept, as timm's own ``PatchDropout`` does. Then
``norm_pre``, ``blocks`` and ``norm``. So the weights learnt are exactly the
ones ``forward_features`` uses downstream, under the same key names.

A light decoder (its own width, depth and heads) sees the encoded visible
tokens plus a shared mask token at every masked position, with 2-D position
embeddings, and predicts every patch's pixels; the loss is the mean squared
error on the masked patches only, against per-patch normalised pixels when
``norm_pix_loss`` is on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from splitfl.pretrain.config import MAEConfig, PretrainError


@dataclass
class Masking:
    """One batch's random masking: which patches each image keeps, and how to undo the shuffle.

    ``ids_keep`` (B, n_keep): kept patch indices; ``ids_restore`` (B, L): position of each patch in the
    shuffled order; ``mask`` (B, L): 1 for a masked patch, 0 for a visible one, in the original order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def random_masking(batch: int, n_patches: int, mask_ratio: float, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> Masking:
    """Per-image random masking of ``mask_ratio`` of the patches (at least one stays visible).

    The noise comes from ``generator`` on the CPU so that the masks, hence the run, are the same on any device.
    """
    n_keep = max(1, int(n_patches * (1.0 - mask_ratio)))
    noise = torch.rand(batch, n_patches, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, n_patches)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle[:, :n_keep].to(device), ids_restore.to(device), mask.to(device))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch*patch*C) in the row-major order of the ViT's patch tokens."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, patch*patch*C) -> (B, C, H, W)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def _gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def check_vit(model: nn.Module, name: str) -> VisionTransformer:
    """The model as a ViT MAE can mask, or a PretrainError saying why not."""
    if not isinstance(model, VisionTransformer):
        raise PretrainError(
            f"method mae needs a timm VisionTransformer (e.g. vit_tiny_patch16_224 with timm_kwargs "
            f"{{patch_size: 4}}), but model.name {name!r} is a {type(model).__name__}; use method: simclr for "
            "CNNs and other architectures"
        )
    if getattr(model, "dynamic_img_size", False):
        raise PretrainError(f"method mae: {name!r} was built with dynamic_img_size; pretrain at a fixed img_size")
    patch = model.patch_embed.patch_size
    if len(set(patch)) != 1:
        raise PretrainError(f"method mae needs square patches, {name!r} has patch_size {tuple(patch)}")
    return model


class MAE(nn.Module):
    """ViT encoder (the timm model, unchanged) + light pixel decoder; ``forward`` returns the loss."""

    def __init__(self, vit: VisionTransformer, cfg: MAEConfig, channels: int) -> None:
        super().__init__()
        self.encoder = vit
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        self.channels = channels
        self.patch = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.n_patches = self.grid[0] * self.grid[1]
        self.n_prefix = int(vit.num_prefix_tokens)
        dim = cfg.decoder_dim
        self.decoder_embed = nn.Linear(vit.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = build_sincos2d_pos_embed(list(self.grid), dim).unsqueeze(0)  # (1, L, dim), row-major like the patches
        if cfg.decoder_pos_embed == "learned":
            self.decoder_pos_embed = nn.Parameter(pos.clone())
        else:
            self.register_buffer("decoder_pos_embed", pos, persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(dim, cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio, qkv_bias=True) for _ in range(cfg.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch * self.patch * channels)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """Decoder weights as MAE initialises them (xavier-uniform linears, small mask token); the ViT keeps timm's init."""
        nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The ViT's ``forward_features`` on the kept patches: (B, prefix + n_keep, D)."""
        vit = self.encoder
        x = vit._pos_embed(vit.patch_embed(images))  # prefix tokens + patches, positions added per the model's layout
        prefix, patches = x[:, : self.n_prefix], x[:, self.n_prefix:]
        x = torch.cat([prefix, _gather_tokens(patches, ids_keep)], dim=1)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Pixels predicted for every patch: (B, L, patch*patch*C)."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.n_prefix], x[:, self.n_prefix:]
        b, n_keep = visible.shape[:2]
        filled = torch.cat([visible, self.mask_token.expand(b, self.n_patches - n_keep, -1)], dim=1)
        patches = _gather_tokens(filled, ids_restore) + self.decoder_pos_embed.to(filled.dtype)
        x = torch.cat([prefix, patches], dim=1)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.n_prefix:])

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (per-patch normalised targets if ``norm_pix_loss``)."""
        target = patchify(images, self.patch).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        masking = random_masking(images.shape[0], self.n_patches, self.mask_ratio, generator, images.device)
        pred = self.decode(self.encode(images, masking.ids_keep), masking.ids_restore)
        return self.loss(images, pred, masking.mask)


def build_mae(model: nn.Module, name: str, cfg: MAEConfig, channels: int) -> MAE:
    return MAE(check_vit(model, name), cfg, channels)

