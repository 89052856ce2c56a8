"""Synthetic medical-looking images whose labels live in spatial structure.

The project has to run end to end (training, attacks, interpretability)
without downloading anything, so each supported modality has a generator
that draws images from a seed. The class signal is deliberately *spatial*
(a localised opacity, counted lesions, a tissue texture) and every image's
per-channel mean and standard deviation are re-drawn from class-independent
ranges at the end, so a model cannot succeed from global brightness or
colour alone; saliency maps then have something real to point at.

All geometry is in normalised coordinates ([-1, 1] across the image), so the
same generator works at 28 and 64 px. Rendering is vectorised over images
(in chunks to bound memory) and uses only numpy with
``np.random.default_rng``, so output is byte-for-byte repeatable.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from splitfl.data.base import ArrayDataset, DataError, DataSplits, TaskInfo

MODALITIES: tuple[str, ...] = ("xray", "fundus", "histology")

TASKS: dict[str, TaskInfo] = {
    "xray": TaskInfo("synthetic-xray", "binary", ("normal", "pneumonia"), 1),
    "fundus": TaskInfo(
        "synthetic-fundus", "ordinal", ("no DR", "mild", "moderate", "severe", "proliferative"), 3
    ),
    "histology": TaskInfo(
        "synthetic-histology", "multiclass", ("adipose", "lymphocytes", "stroma", "tumor"), 3
    ),
}

# Upper bound on floats per intermediate (n, K, S, S) array; keeps 64 px runs small.
_CHUNK_BUDGET = 6_000_000
_SPLITS: tuple[str, ...] = ("train", "val", "test")

Array = np.ndarray
Renderer = Callable[[np.random.Generator, Array, int], Array]


# --------------------------------------------------------------------------- helpers


def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates in [-1, 1]; u grows rightwards, v downwards."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    v, u = np.meshgrid(c, c, indexing="ij")
    return u, v


def _col(a: Array) -> Array:
    """Per-image parameter (n,) -> (n, 1, 1) so it broadcasts over pixels."""
    return np.asarray(a, dtype=np.float32)[:, None, None]


def _smoothstep_mask(d: Array, soft: Array | float) -> Array:
    """Soft inside-mask for a normalised distance d (1 on the boundary)."""
    return 0.5 * (1.0 + np.tanh((1.0 - d) / (2.0 * soft)))


def _ellipse(u: Array, v: Array, cx: Array, cy: Array, a: Array, b: Array, soft: float) -> Array:
    """Soft-edged filled ellipses, one per image: (n, S, S) in [0, 1]."""
    d = np.sqrt(((u - _col(cx)) / _col(a)) ** 2 + ((v - _col(cy)) / _col(b)) ** 2)
    return _smoothstep_mask(d, soft)


def _min_sigma(size: int, pixels: float = 0.6) -> float:
    """Smallest blob sigma (normalised units) that still shows at this resolution."""
    return pixels * 2.0 / size


def _blobs(
    u: Array, v: Array, cx: Array, cy: Array, sigma: Array, amp: Array, power: float = 1.0
) -> Array:
    """Sum of K (generalised) Gaussian blobs per image; (n, K) params -> (n, S, S).

    ``power`` > 1 flattens the top and sharpens the rim (soft-edged patches)
    while 1 gives plain Gaussian dots. Inactive blobs just get amp 0.
    """
    u, v = np.asarray(u), np.asarray(v)
    if u.ndim == 2:  # shared image grid rather than per-image coordinates
        u, v = u[None], v[None]
    du = u[:, None] - cx[:, :, None, None].astype(np.float32)
    dv = v[:, None] - cy[:, :, None, None].astype(np.float32)
    r2 = (du * du + dv * dv) / (2.0 * sigma[:, :, None, None] ** 2)
    shape = np.exp(-(r2**power)) if power != 1.0 else np.exp(-r2)
    return np.einsum("nk,nkhw->nhw", amp.astype(np.float32), shape.astype(np.float32))


def _counts(rng: np.random.Generator, low: Array, high: Array, k_max: int) -> Array:
    """Active mask (n, k_max) with a uniform count in [low, high] per image."""
    n = len(low)
    count = rng.integers(low, high + 1, size=n)
    return np.arange(k_max)[None, :] < np.minimum(count, k_max)[:, None]


def _in_disc(rng: np.random.Generator, shape: tuple[int, ...], radius: Array | float) -> tuple[Array, Array]:
    """Uniform points in a disc of the given radius (area-uniform)."""
    r = np.sqrt(rng.random(shape)) * radius
    t = rng.uniform(0.0, 2.0 * np.pi, shape)
    return r * np.cos(t), r * np.sin(t)


def _match_stats(
    img: Array, rng: np.random.Generator, mean: Array, std: Array | None
) -> Array:
    """Give each image a target per-channel mean (and contrast) drawn independently of the label.

    This is what makes the task spatial: afterwards global intensity and
    colour carry (almost) no class information. Contrast is set with one gain
    for all channels (on the luminance std) so hues are not distorted. Two
    passes shrink the small residual that clipping to [0, 1] leaves behind.
    """
    mean = mean.astype(np.float32)[:, None, None, :]
    for _ in range(2):
        m = img.mean(axis=(1, 2), keepdims=True)
        if std is None:  # multiplicative gain: keeps black (e.g. fundus border) black
            img = img * (mean / np.maximum(m, 1e-4))
        else:
            s = img.mean(axis=3, keepdims=True).std(axis=(1, 2), keepdims=True)
            img = (img - m) * (std.astype(np.float32)[:, None, None, None] / np.maximum(s, 1e-4)) + mean
        img = np.clip(img, 0.0, 1.0)
    return img


def _noise(rng: np.random.Generator, img: Array, low: float, high: float) -> Array:
    """Additive Gaussian sensor noise with a per-image level."""
    level = rng.uniform(low, high, img.shape[0]).astype(np.float32)[:, None, None, None]
    return img + level * rng.standard_normal(img.shape, dtype=np.float32)


def _defocus(rng: np.random.Generator, img: Array, max_weight: float) -> Array:
    """Mild per-image blur (two passes of a [w, 1-2w, w] kernel per axis), like focus variation."""
    w = rng.uniform(0.0, max_weight, img.shape[0]).astype(np.float32)[:, None, None, None]
    for _ in range(2):
        for axis in (1, 2):
            lo = np.concatenate([img.take([0], axis), img.take(np.arange(img.shape[axis] - 1), axis)], axis)
            hi = np.concatenate([img.take(np.arange(1, img.shape[axis]), axis), img.take([-1], axis)], axis)
            img = (1 - 2 * w) * img + w * (lo + hi)
    return img


def _worley(
    rng: np.random.Generator, x: Array, y: Array, cell: Array, presence: float = 1.0, n_attrs: int = 0
) -> tuple[Array, Array, Array, Array, Array]:
    """Cellular (Worley) noise: one jittered feature point per lattice cell.

    Gives, per pixel, the distance to the nearest and second-nearest point
    (in cell units), the offset to the nearest point and that point's random
    attributes. Cell textures (fat cells, nuclei, spindles) are built from
    these, at a cost independent of how many cells there are.
    """
    n = x.shape[0]
    gx, gy = x / _col(cell), y / _col(cell)
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    lo_x, lo_y = int(ix.min()) - 1, int(iy.min()) - 1
    w, h = int(ix.max()) - lo_x + 2, int(iy.max()) - lo_y + 2
    pts = rng.random((n, h, w, 2), dtype=np.float32)
    present = rng.random((n, h, w)) < presence
    attrs = rng.random((n, h, w, max(n_attrs, 1)), dtype=np.float32)
    nid = np.arange(n)[:, None, None]
    d1 = np.full(gx.shape, np.inf, np.float32)
    d2 = np.full(gx.shape, np.inf, np.float32)
    ox = np.zeros(gx.shape, np.float32)
    oy = np.zeros(gx.shape, np.float32)
    best_cx = np.zeros(gx.shape, np.int64)
    best_cy = np.zeros(gx.shape, np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cx, cy = ix + dx - lo_x, iy + dy - lo_y
            px = ix + dx + pts[nid, cy, cx, 0]
            py = iy + dy + pts[nid, cy, cx, 1]
            ddx, ddy = gx - px, gy - py
            d = np.sqrt(ddx * ddx + ddy * ddy)
            d = np.where(present[nid, cy, cx], d, np.inf)
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            d1 = np.where(closer, d, d1)
            ox, oy = np.where(closer, ddx, ox), np.where(closer, ddy, oy)
            best_cx, best_cy = np.where(closer, cx, best_cx), np.where(closer, cy, best_cy)
    return d1, d2, ox, oy, attrs[nid, best_cy, best_cx]


def _balanced_labels(rng: np.random.Generator, n: int, n_classes: int) -> Array:
    """Equal class counts (up to one) in a seeded random order."""
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


# --------------------------------------------------------------------------- chest X-ray


def _render_xray(rng: np.random.Generator, labels: Array, size: int) -> Array:
    """Chest film: body, two dark lungs, ribs, spine, heart; pneumonia = soft opacities in a lung."""
    n = len(labels)
    u0, v0 = _grid(size)
    # Patient position/size jitter: all anatomy is drawn in patient coordinates.
    scale = rng.uniform(0.88, 1.08, n)
    u = (u0 - _col(rng.uniform(-0.1, 0.1, n))) / _col(scale)
    v = (v0 - _col(rng.uniform(-0.1, 0.1, n))) / _col(scale)
    zero = np.zeros(n, np.float32)

    body = _ellipse(u, v, zero, zero + 0.15, rng.uniform(0.82, 0.95, n), zero + 1.25, 0.04)
    img = 0.06 + 0.5 * body
    img += 0.22 * np.exp(-((u / 0.08) ** 2)) * body  # spine

    lung_cx = np.stack([-rng.uniform(0.34, 0.42, n), rng.uniform(0.34, 0.42, n)], 1)
    lung_cy = rng.uniform(-0.14, -0.02, (n, 2))
    lung_a = rng.uniform(0.22, 0.29, (n, 2))
    lung_b = rng.uniform(0.48, 0.6, (n, 2))
    lungs = np.maximum(
        _ellipse(u, v, lung_cx[:, 0], lung_cy[:, 0], lung_a[:, 0], lung_b[:, 0], 0.07),
        _ellipse(u, v, lung_cx[:, 1], lung_cy[:, 1], lung_a[:, 1], lung_b[:, 1], 0.07),
    )
    img -= 0.3 * lungs

    period = _col(rng.uniform(0.2, 0.27, n))
    phase = _col(rng.uniform(0.0, 2 * np.pi, n))
    ribs = np.clip(np.cos(2 * np.pi * (v - 0.35 * u * u) / period + phase), 0.0, 1.0) ** 3
    img += 0.1 * ribs * lungs

    heart = _ellipse(
        u, v, rng.uniform(0.06, 0.18, n), rng.uniform(0.18, 0.3, n),
        rng.uniform(0.2, 0.3, n), rng.uniform(0.16, 0.24, n), 0.15,
    )
    img += 0.18 * heart

    # Pneumonia: 1-3 soft-edged consolidations, some faint, inside a lung field.
    # Normal lungs get the same number of small nodular markings (vessels seen
    # end-on), so "something bright in a lung" alone is not the answer.
    k = 3
    sick = labels == 1
    rows = np.arange(n)[:, None]

    def in_lung() -> tuple[Array, Array]:
        side = rng.integers(0, 2, (n, k))
        du, dv = _in_disc(rng, (n, k), 0.62)
        return lung_cx[rows, side] + du * lung_a[rows, side], lung_cy[rows, side] + dv * lung_b[rows, side]

    active = _counts(rng, np.where(sick, 1, 0), np.where(sick, 3, 0), k)
    cx, cy = in_lung()
    sigma = np.maximum(rng.uniform(0.07, 0.15, (n, k)), _min_sigma(size, 0.9))
    amp = rng.uniform(0.14, 0.42, (n, k)) * active
    img += _blobs(u, v, cx, cy, sigma, amp, power=1.5) * (0.35 + 0.65 * lungs)
    marks = rng.random((n, k)) < 0.5
    mx, my = in_lung()
    msig = np.maximum(rng.uniform(0.025, 0.045, (n, k)), _min_sigma(size, 0.6))
    img += _blobs(u, v, mx, my, msig, rng.uniform(0.15, 0.35, (n, k)) * marks)

    # Label-irrelevant clutter: small bright dots (leads, buttons) and a corner marker.
    k_c = 3
    clutter_on = rng.random((n, k_c)) < 0.45
    ccx, ccy = rng.uniform(-0.9, 0.9, (2, n, k_c))
    csig = np.maximum(rng.uniform(0.02, 0.045, (n, k_c)), _min_sigma(size, 0.55))
    img += _blobs(u0, v0, ccx, ccy, csig, rng.uniform(0.3, 0.6, (n, k_c)) * clutter_on)
    corner_x = np.where(rng.random(n) < 0.5, -0.78, 0.78)
    marker = (np.abs(u0 - _col(corner_x)) < 0.1) & (np.abs(v0 + 0.8) < 0.07)
    img += 0.5 * marker * _col(rng.random(n) < 0.5)

    # Exposure gradient (heel effect) and noise.
    ang = rng.uniform(0, 2 * np.pi, n)
    img += _col(rng.uniform(0.0, 0.12, n)) * (u0 * _col(np.cos(ang)) + v0 * _col(np.sin(ang)))
    img = _noise(rng, img[..., None], 0.02, 0.06)
    return _match_stats(img, rng, rng.uniform(0.36, 0.56, (n, 1)), rng.uniform(0.16, 0.23, n))


# --------------------------------------------------------------------------- retinal fundus

# Per-grade (min, max) counts of red lesions (microaneurysms/haemorrhages) and exudates.
_RED_COUNTS = np.array([(0, 0), (1, 3), (4, 6), (8, 11), (8, 11)])
_EXUDATE_COUNTS = np.array([(0, 0), (0, 0), (1, 2), (2, 4), (2, 4)])
_HAEM_PROB = np.array([0.0, 0.1, 0.3, 0.5, 0.5])  # chance a red lesion is a larger blot


def _render_fundus(rng: np.random.Generator, labels: Array, size: int) -> Array:
    """Fundus photo: orange-red disc on black, optic disc, vessels; DR grade = lesion load."""
    n = len(labels)
    u, v = _grid(size)
    cx, cy = rng.uniform(-0.06, 0.06, (2, n))
    radius = rng.uniform(0.84, 0.95, n)
    dist = np.sqrt((u - _col(cx)) ** 2 + (v - _col(cy)) ** 2) / _col(radius)
    retina = _smoothstep_mask(dist, 0.02)
    shade = (1.0 - 0.45 * dist**2) * retina

    base = np.stack(
        [rng.uniform(0.78, 0.95, n), rng.uniform(0.3, 0.42, n), rng.uniform(0.08, 0.16, n)], 1
    ).astype(np.float32)
    # Low-frequency choroidal mottling.
    fx, fy, ph = rng.uniform(2.0, 5.0, n), rng.uniform(2.0, 5.0, n), rng.uniform(0, 6.3, n)
    mottle = 1.0 + 0.06 * np.sin(_col(fx) * u + _col(ph)) * np.cos(_col(fy) * v)
    img = (shade * mottle)[..., None] * base[:, None, None, :]

    # Optic disc (left or right eye) and macula on the other side.
    eye = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    odx = cx + eye * radius * rng.uniform(0.42, 0.52, n)
    ody = cy + rng.uniform(-0.08, 0.08, n)
    odr = rng.uniform(0.1, 0.14, n)
    od = _ellipse(u, v, odx, ody, odr, odr * rng.uniform(1.0, 1.2, n), 0.25)[..., None]
    img = img * (1 - 0.85 * od) + 0.85 * od * np.array([1.0, 0.88, 0.62], np.float32)
    mac = np.exp(-((u - _col(odx - eye * radius * 0.5)) ** 2 + (v - _col(ody)) ** 2) / (2 * 0.14**2))
    img *= 1.0 - 0.3 * mac[..., None]

    # Vessels: arcs leaving the optic disc, in polar coordinates about it.
    rho = np.sqrt((u - _col(odx)) ** 2 + (v - _col(ody)) ** 2)
    phi = np.arctan2(v - _col(ody), (u - _col(odx)) * _col(-eye))  # 0 points to the macula
    vessels = np.zeros_like(rho)
    for base_angle, bend in ((1.25, -1.0), (-1.25, 1.0), (2.3, -0.3), (-2.3, 0.3)):
        a0 = _col(base_angle + rng.uniform(-0.2, 0.2, n))
        curve = a0 + _col(bend * rng.uniform(0.6, 1.2, n)) * rho
        off = (phi - curve + np.pi) % (2 * np.pi) - np.pi  # wrapped angle
        width = np.maximum(_col(rng.uniform(0.025, 0.04, n)) * (1 - 0.4 * rho), _min_sigma(size, 0.45))
        reach = rho < _col(rng.uniform(0.9, 1.5, n))
        vessels = np.maximum(vessels, np.exp(-((rho * off / width) ** 2)) * reach)
    vessels *= (rho > _col(odr * 0.5)) * retina
    img *= 1.0 - vessels[..., None] * np.array([0.3, 0.5, 0.5], np.float32)

    grade = labels
    # Red lesions: microaneurysms (dots) and haemorrhages (blots).
    k_red = int(_RED_COUNTS.max())
    active = _counts(rng, _RED_COUNTS[grade, 0], _RED_COUNTS[grade, 1], k_red)
    lx, ly = _in_disc(rng, (n, k_red), 0.78 * radius[:, None])
    blot = rng.random((n, k_red)) < _HAEM_PROB[grade][:, None]
    sig = np.where(blot, rng.uniform(0.05, 0.085, (n, k_red)), rng.uniform(0.025, 0.04, (n, k_red)))
    red = _blobs(u, v, cx[:, None] + lx, cy[:, None] + ly, np.maximum(sig, _min_sigma(size, 0.6)),
                 rng.uniform(0.7, 1.0, (n, k_red)) * active)
    red = np.clip(red, 0, 1)[..., None]
    img *= 1.0 - red * np.array([0.5, 0.8, 0.8], np.float32)

    # Hard exudates: bright yellow flecks.
    k_ex = int(_EXUDATE_COUNTS.max())
    active = _counts(rng, _EXUDATE_COUNTS[grade, 0], _EXUDATE_COUNTS[grade, 1], k_ex)
    ex, ey = _in_disc(rng, (n, k_ex), 0.7 * radius[:, None])
    yel = _blobs(u, v, cx[:, None] + ex, cy[:, None] + ey,
                 np.maximum(rng.uniform(0.03, 0.055, (n, k_ex)), _min_sigma(size, 0.6)),
                 rng.uniform(0.7, 1.0, (n, k_ex)) * active)
    yel = np.clip(yel, 0, 1)[..., None]
    img = img * (1 - 0.8 * yel) + 0.8 * yel * np.array([1.0, 0.92, 0.4], np.float32)

    # Proliferative DR: a tuft of fine new vessels near the disc or an arcade.
    prolif = _col(grade == 4)
    t_ang = rng.uniform(0, 2 * np.pi, n)
    tx = odx + np.cos(t_ang) * rng.uniform(0.15, 0.4, n)
    ty = ody + np.sin(t_ang) * rng.uniform(0.15, 0.4, n)
    tuft_env = np.exp(-((u - _col(tx)) ** 2 + (v - _col(ty)) ** 2) / (2 * _col(rng.uniform(0.09, 0.13, n)) ** 2))
    rot = rng.uniform(0, np.pi, n)
    ru = u * _col(np.cos(rot)) + v * _col(np.sin(rot))
    rv = -u * _col(np.sin(rot)) + v * _col(np.cos(rot))
    per = max(0.2, 4.0 / size)
    mesh = (np.cos(2 * np.pi * ru / per) * np.cos(2 * np.pi * rv / per)) ** 2
    tuft = np.clip(1.6 * tuft_env * (0.3 + 0.7 * mesh), 0, 1) * prolif * retina
    img *= 1.0 - tuft[..., None] * np.array([0.45, 0.75, 0.75], np.float32)

    # Label-irrelevant: lens dust (grey spots) and a faint light reflex.
    k_d = 2
    dust_on = rng.random((n, k_d)) < 0.3
    dx, dy = _in_disc(rng, (n, k_d), 0.8)
    dust = _blobs(u, v, dx, dy, np.maximum(rng.uniform(0.05, 0.1, (n, k_d)), _min_sigma(size, 0.8)),
                  0.35 * dust_on)
    img *= 1.0 - np.clip(dust, 0, 1)[..., None]
    rx, ry = cx + rng.uniform(-0.3, 0.3, n), cy + rng.uniform(-0.3, 0.3, n)
    reflex = np.exp(-((u - _col(rx)) ** 2 + (v - _col(ry)) ** 2) / 0.08)
    img += (0.12 * reflex * retina * _col(rng.random(n) < 0.5))[..., None]

    img = _noise(rng, img, 0.01, 0.03) * retina[..., None]
    target = base.mean(0, keepdims=True) * np.array([0.56, 0.5, 0.45], np.float32)  # typical means
    target = target * rng.uniform(0.85, 1.15, (n, 1)) * rng.uniform(0.9, 1.1, (n, 3))
    return _match_stats(np.clip(img, 0, 1), rng, target, None)


# --------------------------------------------------------------------------- H&E histology

# Optical densities of haematoxylin and eosin (Ruifrok & Johnston).
_H_OD = np.array([0.65, 0.70, 0.29], np.float32)
_E_OD = np.array([0.07, 0.99, 0.11], np.float32)


def _adipose(rng: np.random.Generator, u: Array, v: Array, size: int) -> tuple[Array, Array]:
    """Large empty round fat cells: thin pink membranes between Voronoi cells."""
    n = u.shape[0]
    cell = rng.uniform(0.38, 0.52, n)
    d1, d2, *_ = _worley(rng, u, v, cell)
    width = np.maximum(_col(0.05 / cell), _col(_min_sigma(size, 0.5) / cell))
    membrane = np.exp(-(((d2 - d1) / width) ** 2))
    return 0.05 + 0.3 * membrane, 0.16 + 0.9 * membrane


def _lymphocytes(rng: np.random.Generator, u: Array, v: Array, size: int) -> tuple[Array, Array]:
    """Sheets of small, dense, round, dark nuclei."""
    n = u.shape[0]
    cell = np.maximum(rng.uniform(0.13, 0.2, n), 3.0 * 2.0 / size * 0.75)
    d1, *_ = _worley(rng, u, v, cell, presence=0.9)
    nuc = _smoothstep_mask(d1 / _col(rng.uniform(0.3, 0.42, n)), 0.12)
    return 0.15 + 1.4 * nuc, 0.2 + 0.25 * (1 - nuc)


def _stroma(rng: np.random.Generator, u: Array, v: Array, size: int) -> tuple[Array, Array]:
    """Wavy parallel collagen fibres with sparse spindle-shaped nuclei along them."""
    n = u.shape[0]
    ang = rng.uniform(0, np.pi, n)
    t = u * _col(np.cos(ang)) + v * _col(np.sin(ang))
    w = -u * _col(np.sin(ang)) + v * _col(np.cos(ang))
    wave = _col(rng.uniform(0.5, 0.9, n))
    w = w + _col(rng.uniform(0.04, 0.1, n)) * np.sin(2 * np.pi * t / wave + _col(rng.uniform(0, 6.3, n)))
    period = np.maximum(rng.uniform(0.15, 0.21, n), 6.0 / size)
    fibre = (0.5 + 0.5 * np.cos(2 * np.pi * w / _col(period))) ** 2
    d1, *_ = _worley(rng, t * 0.3, w, np.full(n, 0.2), presence=0.35)
    nuc = _smoothstep_mask(d1 / 0.3, 0.15)
    return 0.08 + 1.1 * nuc, 0.15 + 0.85 * fibre * (1 - nuc)


def _tumor(rng: np.random.Generator, u: Array, v: Array, size: int) -> tuple[Array, Array]:
    """Crowded, large, irregular and variably dark (pleomorphic) nuclei."""
    n = u.shape[0]
    cell = rng.uniform(0.24, 0.36, n)
    d1, _, ox, oy, attrs = _worley(rng, u, v, cell, presence=0.95, n_attrs=3)
    theta = np.arctan2(oy, ox)
    wobble = 1.0 + 0.15 * np.cos(2 * theta + 6.3 * attrs[..., 0]) + 0.1 * np.cos(3 * theta + 6.3 * attrs[..., 1])
    radius = 0.43 * wobble
    nuc = _smoothstep_mask(d1 / radius, 0.1)
    dark = 0.7 + 0.9 * attrs[..., 2]
    nucleolus = np.exp(-((d1 / 0.12) ** 2))
    return 0.12 + nuc * (dark + 0.4 * nucleolus), 0.22 + 0.2 * (1 - nuc)


_TISSUES = (_adipose, _lymphocytes, _stroma, _tumor)


def _tissue(rng: np.random.Generator, labels: Array, u: Array, v: Array, size: int) -> tuple[Array, Array]:
    """Haematoxylin and eosin concentration maps for each image's tissue class."""
    hema = np.zeros(u.shape, np.float32)
    eosin = np.zeros(u.shape, np.float32)
    for cls, draw in enumerate(_TISSUES):
        sel = np.flatnonzero(labels == cls)
        if sel.size:
            hema[sel], eosin[sel] = draw(rng, u[sel], v[sel], size)
    return hema, eosin


def _render_histology(rng: np.random.Generator, labels: Array, size: int) -> Array:
    """H&E patch via Beer-Lambert stain mixing; the tissue class sets the texture."""
    n = len(labels)
    u0, v0 = _grid(size)
    # Random zoom; textures are already position-free (random cell points).
    zoom = _col(rng.uniform(0.9, 1.1, n))
    u, v = u0 * zoom, v0 * zoom
    hema, eosin = _tissue(rng, labels, u, v, size)

    # Patches are labelled by their main tissue; 40% have a border region
    # (up to ~45% of the area) of another tissue, as real tiles often do.
    mixed = np.flatnonzero(rng.random(n) < 0.4)
    other = (labels[mixed] + rng.integers(1, len(_TISSUES), mixed.size)) % len(_TISSUES)
    h2, e2 = _tissue(rng, other, u[mixed], v[mixed], size)
    ang = rng.uniform(0, 2 * np.pi, mixed.size)
    proj = u0 * _col(np.cos(ang)) + v0 * _col(np.sin(ang))
    region = 1.0 / (1.0 + np.exp(-(proj - _col(rng.uniform(0.1, 0.7, mixed.size))) / 0.05))
    hema[mixed] = hema[mixed] * (1 - region) + h2 * region
    eosin[mixed] = eosin[mixed] * (1 - region) + e2 * region

    # Label-irrelevant: eosinophilic debris and an occasional tissue fold.
    k = 2
    on = rng.random((n, k)) < 0.3
    bx, by = rng.uniform(-0.9, 0.9, (2, n, k))
    eosin += _blobs(u0, v0, bx, by, np.maximum(rng.uniform(0.04, 0.08, (n, k)), _min_sigma(size, 0.6)),
                    0.8 * on)
    fang = rng.uniform(0, np.pi, n)
    across = u0 * _col(np.cos(fang)) + v0 * _col(np.sin(fang)) - _col(rng.uniform(-0.7, 0.7, n))
    fold = np.exp(-((across / 0.08) ** 2))
    eosin += 0.5 * fold * _col(rng.random(n) < 0.2)

    # Per-slide stain vectors and strengths (stain variation between labs).
    h_od = _H_OD[None] * rng.uniform(0.85, 1.15, (n, 3)).astype(np.float32)
    e_od = _E_OD[None] * rng.uniform(0.85, 1.15, (n, 3)).astype(np.float32)
    od = (hema[..., None] * _col(rng.uniform(0.8, 1.2, n))[..., None] * h_od[:, None, None, :]
          + eosin[..., None] * _col(rng.uniform(0.8, 1.2, n))[..., None] * e_od[:, None, None, :])
    img = _noise(rng, _defocus(rng, np.exp(-od), 0.25), 0.01, 0.03)
    mean = np.array([0.72, 0.52, 0.7], np.float32)[None]
    mean = mean + rng.uniform(-0.08, 0.08, (n, 1)) + rng.uniform(-0.05, 0.05, (n, 3))
    std = rng.uniform(0.09, 0.15, n)
    return _match_stats(img, rng, mean, std)


_RENDERERS: dict[str, tuple[Renderer, int]] = {
    # modality -> (renderer, max blobs per image, for chunk sizing)
    "xray": (_render_xray, 6),
    "fundus": (_render_fundus, int(_RED_COUNTS.max())),
    "histology": (_render_histology, 9),
}


# --------------------------------------------------------------------------- public API


def render_images(modality: str, labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one uint8 image (N, S, S, C) per label, in memory-bounded chunks."""
    render, k_max = _RENDERERS[modality]
    chunk = max(16, _CHUNK_BUDGET // (k_max * size * size))
    out = np.empty((len(labels), size, size, TASKS[modality].n_channels), np.uint8)
    for start in range(0, len(labels), chunk):
        part = render(rng, labels[start : start + chunk], size)
        out[start : start + chunk] = np.round(part * 255.0).astype(np.uint8)
    return out


def make_synthetic(
    modality: str, n_train: int, n_val: int, n_test: int, size: int = 28, seed: int = 0
) -> DataSplits:
    """Train/val/test splits of a synthetic modality, balanced and fully seeded.

    Each split has its own random stream derived from (seed, split), so
    changing ``n_train`` leaves the val/test images unchanged.
    """
    if modality not in TASKS:
        raise DataError(f"data.modality: unknown synthetic modality {modality!r}; choose one of {list(MODALITIES)}")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in counts.items():
        if int(n) != n or n < 1:
            raise DataError(f"data.n_{name}: must be a positive whole number of images, got {n!r}")
    if int(size) != size or size < 16:
        raise DataError(f"data.size: synthetic images need size >= 16 px, got {size!r}")
    task = TASKS[modality]
    mod_id = MODALITIES.index(modality)
    splits = {}
    for split_id, name in enumerate(_SPLITS):
        rng = np.random.default_rng([int(seed), mod_id, split_id])
        labels = _balanced_labels(rng, int(counts[name]), task.num_outputs)
        images = render_images(modality, labels, int(size), rng)
        splits[name] = ArrayDataset(images, labels, task, where=f"synthetic {modality} {name}")
    return DataSplits(
        task, splits["train"], splits["val"], splits["test"], source=f"synthetic:{modality}",
        meta={"modality": modality, "size": int(size), "seed": int(seed)},
    )
