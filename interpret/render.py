"""Turn maps and numbers into the report's self-contained HTML: every picture is an embedded PNG.

The picture helpers work on arrays in the model's input range ([-1, 1]); heat maps are drawn
over the grey image with one colour scale (matplotlib's ``inferno``), each map scaled to its own
maximum so that a map says *where*, not *how much* (its size is in the trust table instead). The
ordinal report's grade maps share one scale per row (a grade with little evidence stays dark), and its
signed contrast maps use a diverging scale (``RdBu_r``: blue = towards a lower grade, red = higher)
over the image in grey.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from matplotlib import colormaps
from PIL import Image

COLORMAP = "inferno"
DIVERGING_COLORMAP = "RdBu_r"  # signed maps (the ordinal contrast): blue = towards a lower grade, red = higher
OVERLAY_ALPHA = 0.55
TEMPLATE = "report.html.j2"


def png_data_uri(rgb: np.ndarray) -> str:
    """(H, W, 3) uint8 -> ``data:image/png;base64,...`` (the report must be one file)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_rgb(x: torch.Tensor, grey: bool = False) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8 (grey images repeated over the three channels).

    ``grey=True`` turns a colour image into its luminance (ITU-R 601 weights): under a heat map a red-orange
    fundus would otherwise be confused with the map's own reds.
    """
    a = ((x.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    a = np.transpose(a, (1, 2, 0))
    if a.shape[2] == 3 and grey:
        lum = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        a = np.round(lum).astype(np.uint8)[..., None]
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def heat_rgb(attribution: torch.Tensor, scale: Optional[float] = None) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 colours; scaled by its own maximum (zero map -> darkest colour).

    ``scale`` replaces the map's own maximum, so that several maps (one per grade) share one scale and a
    map with little evidence looks dark rather than stretched to full brightness.
    """

    a = attribution.detach().cpu().float().numpy()
    a = np.nan_to_num(a)
    top = float(scale) if scale is not None and scale > 0 else (float(np.max(a)) if np.max(a) > 0 else 1.0)
    scaled = np.clip(a / top, 0.0, 1.0)
    return (colormaps[COLORMAP](scaled)[..., :3] * 255).round().astype(np.uint8)


def overlay_rgb(x: torch.Tensor, attribution: torch.Tensor, alpha: float = OVERLAY_ALPHA,
                scale: Optional[float] = None, grey: bool = False) -> np.ndarray:
    """The heat map blended over the original (``scale``: see :func:`heat_rgb`; ``grey``: see :func:`image_rgb`)."""
    base = image_rgb(x, grey).astype(np.float32)
    heat = heat_rgb(attribution, scale).astype(np.float32)
    return np.clip((1 - alpha) * base + alpha * heat, 0, 255).astype(np.uint8)


def signed_overlay_rgb(x: torch.Tensor, attribution: torch.Tensor, alpha: float = 0.8,
                       scale: Optional[float] = None) -> np.ndarray:
    """A signed map over the original in grey: red where it is positive, blue where negative, the image where ~0.

    Colour strength follows |map| / scale (default: the map's largest magnitude, symmetric around 0), and the
    blend weight too, so a weak map leaves the image readable instead of washing it with the colormap's white.
    The image is shown in grey so that a red fundus is not mistaken for positive evidence.
    """

    a = np.nan_to_num(attribution.detach().cpu().float().numpy())
    top = float(scale) if scale is not None and scale > 0 else float(np.max(np.abs(a)))
    s = np.clip(a / top, -1.0, 1.0) if top > 0 else np.zeros_like(a)
    colour = colormaps[DIVERGING_COLORMAP](0.5 + 0.5 * s)[..., :3] * 255
    weight = (alpha * np.sqrt(np.abs(s)))[..., None]
    base = image_rgb(x, grey=True).astype(np.float32)
    return np.clip((1 - weight) * base + weight * colour, 0, 255).astype(np.uint8)


def colorbar_uri(width: int = 240, height: int = 14) -> str:
    ramp = torch.linspace(0, 1, width).repeat(height, 1)
    return png_data_uri(heat_rgb(ramp))


def diverging_colorbar_uri(width: int = 240, height: int = 14) -> str:
    """The signed maps' scale: blue (negative) through the image's own grey to red (positive)."""

    ramp = np.linspace(0.0, 1.0, width)[None].repeat(height, 0)
    return png_data_uri((colormaps[DIVERGING_COLORMAP](ramp)[..., :3] * 255).round().astype(np.uint8))


def render_html(context: dict[str, Any]) -> str:
    """Fill the Jinja2 template (autoescaped: names from files and configs cannot inject markup)."""

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined)
    return env.get_template(TEMPLATE).render(**context)
