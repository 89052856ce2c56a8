"""SimCLR's augmentations, batched on the device with per-image random parameters drawn from a seeded generator.

A torchvision transform draws one set of parameters per call, so applying it
to a batch would give every image the same crop; per-image calls in a data
loader are slow on two CPU cores and hard to reproduce on resume. Here every
parameter is drawn per image from a CPU ``torch.Generator`` (so a run is the
same on any device and resumes exactly) and applied to the whole batch at
once: random resized crop and horizontal flip as one affine resampling,
colour jitter (brightness, contrast, saturation, hue as a rotation of the
YIQ chroma plane) or, for grey images, brightness and contrast, random
grey-scale, and Gaussian blur with a per-image sigma.

Images come in and go out normalised to [-1, 1]; the photometric operations
work on [0, 1] and clamp to it, as torchvision's do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from splitfl.pretrain.config import SimCLRConfig

# RGB -> YIQ (NTSC); hue rotates the (I, Q) plane, luma (Y) is the ITU-R 601 grey PIL uses.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = _RGB_TO_YIQ[0]


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _coin(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def crop_flip(x: torch.Tensor, cfg: SimCLRConfig, g: torch.Generator) -> torch.Tensor:
    """Random resized crop (area fraction and aspect ratio per image) plus horizontal flip, bilinear, same size out."""
    n = x.shape[0]
    area = _uniform(n, cfg.crop_scale[0], cfg.crop_scale[1], g)
    log_ratio = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width and height as fractions of the image
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1.0 - w) * (2.0 * torch.rand(n, generator=g) - 1.0)  # centre in [-1, 1] coordinates, crop inside
    cy = (1.0 - h) * (2.0 * torch.rand(n, generator=g) - 1.0)
    flip = torch.where(_coin(n, cfg.flip_p, g), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    return torch.einsum("bchw,c->bhw", x, _LUMA.to(x.device, x.dtype)).unsqueeze(1)


def colour_jitter(x: torch.Tensor, cfg: SimCLRConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast (and for RGB saturation and hue) with probability ``jitter_p``, on [0, 1] images."""
    n, c = x.shape[:2]
    on = _coin(n, cfg.jitter_p, g)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(n, 1.0 - strength, 1.0 + strength, g)
        return torch.where(on, f, torch.ones(n)).to(x.device, x.dtype).view(n, 1, 1, 1)

    brightness, contrast = factor(cfg.brightness), factor(cfg.contrast)
    x = (x * brightness).clamp(0, 1)
    mean = (_grey(x) if c == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    if c != 3:
        return x
    saturation = factor(cfg.saturation)
    grey = _grey(x)
    x = ((x - grey) * saturation + grey).clamp(0, 1)
    angle = torch.where(on, _uniform(n, -cfg.hue, cfg.hue, g), torch.zeros(n)) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    to_yiq = _RGB_TO_YIQ
    per_image = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (B, 3, 3): RGB -> YIQ, rotate chroma, back
    x = torch.einsum("bij,bjhw->bihw", per_image.to(x.device, x.dtype), x)
    return x.clamp(0, 1)


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """RGB images turned grey (luma repeated to 3 channels) with probability ``p``."""
    on = _coin(x.shape[0], p, g).to(x.device).view(-1, 1, 1, 1)
    return torch.where(on, _grey(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, p: float, sigma_range: list[float], g: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (in pixels), applied with probability ``p``."""
    n, c, h, w = x.shape
    on = _coin(n, p, g)
    sigma = _uniform(n, sigma_range[0], sigma_range[1], g)
    radius = max(1, min(math.ceil(3.0 * sigma_range[1]), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand(n, -1)
    kernel = torch.where(on[:, None], kernel, identity)  # images not blurred get a unit impulse
    k = kernel.to(x.device, x.dtype).repeat_interleave(c, dim=0)  # (B*C, K): one kernel per image and channel
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.reshape(n, c, h, w)


def simclr_view(images: torch.Tensor, cfg: SimCLRConfig, g: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch of [-1, 1] images, in [-1, 1]."""
    x = images * 0.5 + 0.5
    x = crop_flip(x, cfg, g).clamp(0, 1)
    x = colour_jitter(x, cfg, g)
    if x.shape[1] == 3 and cfg.grayscale_p > 0:
        x = random_grayscale(x, cfg.grayscale_p, g)
    if cfg.blur_p > 0:
        x = gaussian_blur(x, cfg.blur_p, cfg.blur_sigma, g)
    return (x - 0.5) / 0.5
