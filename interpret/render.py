"""Turn maps and numbers into the report's self-contained HTML: every picture is an embedded PNG.

The picture helpers work on arrays in the model's input range ([-1, 1]); heat maps are drawn
over the grey image with one colour scale (matplotlib's ``inferno``), each map scaled to its own
maximum so that a map says *where*, not *how much* (its size is in the trust table instead).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

COLORMAP = "inferno"
OVERLAY_ALPHA = 0.55
TEMPLATE = "report.html.j2"


def png_data_uri(rgb: np.ndarray) -> str:
    """(H, W, 3) uint8 -> ``data:image/png;base64,...`` (the report must be one file)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_rgb(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8 (grey images repeated over the three channels)."""
    a = ((x.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    a = np.transpose(a, (1, 2, 0))
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def heat_rgb(attribution: torch.Tensor) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 colours; scaled by its own maximum (zero map -> darkest colour)."""
    from matplotlib import colormaps

    a = attribution.detach().cpu().float().numpy()
    a = np.nan_to_num(a)
    top = float(np.max(a)) if np.max(a) > 0 else 1.0
    scaled = np.clip(a / top, 0.0, 1.0)
    return (colormaps[COLORMAP](scaled)[..., :3] * 255).round().astype(np.uint8)


def overlay_rgb(x: torch.Tensor, attribution: torch.Tensor, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The heat map blended over the grey original."""
    base = image_rgb(x).astype(np.float32)
    heat = heat_rgb(attribution).astype(np.float32)
    return np.clip((1 - alpha) * base + alpha * heat, 0, 255).astype(np.uint8)


def colorbar_uri(width: int = 240, height: int = 14) -> str:
    ramp = torch.linspace(0, 1, width).repeat(height, 1)
    return png_data_uri(heat_rgb(ramp))


def render_html(context: dict[str, Any]) -> str:
    """Fill the Jinja2 template (autoescaped: names from files and configs cannot inject markup)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined)
    return env.get_template(TEMPLATE).render(**context)
