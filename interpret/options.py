"""What a report explains and how thoroughly: the options of ``splitfl report`` and their command line.

Kept apart from :mod:`interpret.report` so that the command line and the
configuration reference read them without loading torch or Captum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from jsonargparse import ActionYesNo, ArgumentParser

from splitfl.errors import UserError

METHODS: tuple[str, ...] = ("integrated_gradients", "gradcam", "occlusion", "smoothgrad")
# Ordinal tasks (retinal grades): Integrated Gradients (signed, complete) and Grad-CAM (coarse, cheap). Per-grade
# maps cost one attribution per grade and method, so Occlusion and SmoothGrad are left out by default.
DEFAULT_ORDINAL_METHODS: tuple[str, ...] = ("integrated_gradients", "gradcam")


@dataclass
class ReportOptions:
    """What to explain and how thoroughly (defaults sized for a CPU in a few minutes)."""

    methods: tuple[str, ...] = METHODS
    n_images: int = 16
    start: int = 0
    split: str = "test"  # which split of a MedMNIST .npz
    batch_size: int = 16
    checks: bool = True
    sensitivity_images: int = 4  # Captum's sensitivity re-runs the method: on the first few images only
    compare: list[str] = field(default_factory=list)  # other runs' folders: agreement with each
    seed_twin: Optional[str] = None  # with compare: a run differing from compare[0] only in seed (the yardstick)
    top_fraction: float = 0.1
    pdf: bool = False
    progress: bool = True
    seed: int = 0
    # ordinal tasks only: methods for the per-grade and contrast maps (empty: none), trust checks of the contrast
    ordinal_methods: tuple[str, ...] = DEFAULT_ORDINAL_METHODS
    ordinal_contrast_checks: bool = True


class ReportError(UserError, ValueError):
    """Options that cannot make a report (what is wrong and what to do)."""


def build_report_parser() -> ArgumentParser:
    """``splitfl report``'s command line, its defaults those of :class:`ReportOptions`."""
    p = ArgumentParser(description="Explain a trained model on a set of images with Captum (Integrated Gradients, "
                                   "Grad-CAM, Occlusion, SmoothGrad), check the explanations and write one "
                                   "self-contained HTML report (numbers also in OUT.json).")
    p.add_argument("--run", type=str, required=True, help="output folder of `splitfl train` (holds best_model.pt)")
    p.add_argument("--images", type=str, required=True,
                   help="a .npz (MedMNIST file or images/labels arrays) or a folder of PNG/JPEG (optional manifest.csv)")
    p.add_argument("--out", type=str, required=True, help="the report's .html file")
    d = ReportOptions()
    p.add_argument("--methods", type=str, nargs="+", default=list(d.methods), help=f"any of {list(METHODS)}")
    p.add_argument("--n-images", type=int, default=d.n_images, help="how many images to explain")
    p.add_argument("--start", type=int, default=d.start, help="index of the first image")
    p.add_argument("--split", type=str, default=d.split, help="split of a MedMNIST .npz (train, val, test)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per attribution batch")
    p.add_argument("--checks", action=ActionYesNo, default=True, help="run the trust checks (deletion/insertion, "
                   "randomised model, infidelity, sensitivity)")
    p.add_argument("--sensitivity-images", type=int, default=d.sensitivity_images,
                   help="images on which Captum's sensitivity (which re-runs each method) is measured")
    p.add_argument("--compare", type=str, nargs="+", default=[], help="other runs' folders: agreement of their maps with "
                   "this model's (e.g. the centralized twin)")
    p.add_argument("--seed-twin", type=Optional[str], default=None,
                   help="a run identical to the first --compare run but for its seed: the agreement yardstick")
    p.add_argument("--top-fraction", type=float, default=d.top_fraction, help="top pixels compared for overlap")
    p.add_argument("--pdf", action=ActionYesNo, default=False, help="also print the report to PDF (headless Chromium)")
    p.add_argument("--progress", action=ActionYesNo, default=True, help="progress bars")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random baselines and perturbations")
    p.add_argument("--ordinal-methods", type=str, nargs="*", default=list(d.ordinal_methods),
                   help="ordinal tasks (retinal grades): methods for the per-grade and expected-grade contrast maps "
                        f"(one attribution per grade and method; none to skip); any of {list(METHODS)}")
    p.add_argument("--ordinal-contrast-checks", action=ActionYesNo, default=d.ordinal_contrast_checks,
                   help="ordinal tasks: also run the trust checks on the expected-grade contrast maps "
                        "(--no_ordinal-contrast-checks to skip)")
    return p
