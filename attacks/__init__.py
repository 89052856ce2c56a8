"""Attack harness core: gradient-inversion attacks, pinned image metrics and the leakage rate.

Library functions take tensors and models; wiring to run transcripts and the
CLI lives elsewhere. See attacks/README.md for the threat model.
"""
from attacks.gradient_inversion import (
    InversionResult,
    add_gaussian_noise,
    dlg,
    gradients_from_update,
    idlg,
    infer_labels,
    inverting_gradients,
    local_update,
    model_gradients,
    reconstruct,
)
from attacks.leakage import (
    LeakageDetails,
    leak_flags,
    leakage_curve,
    leakage_rate,
    ssim_cutoff_curve,
)
from attacks.metrics import (
    MatchResult,
    match_reconstructions,
    pairwise_ssim,
    psnr,
    ssim,
    to_unit,
)
from attacks.models import LeNetDLG, lenet_dlg

__all__ = [
    "InversionResult", "LeNetDLG", "LeakageDetails", "MatchResult", "add_gaussian_noise", "dlg",
    "gradients_from_update", "idlg", "infer_labels", "inverting_gradients", "leak_flags", "leakage_curve",
    "leakage_rate", "lenet_dlg", "local_update", "match_reconstructions", "model_gradients", "pairwise_ssim",
    "psnr", "reconstruct", "ssim", "ssim_cutoff_curve", "to_unit",
]
