"""splitfl's attack harness: what a curious or malicious server can reconstruct from each regime (see attacks/README.md).

* :mod:`attacks.gradient_inversion` - DLG, iDLG, Inverting Gradients;
* :mod:`attacks.metrics`, :mod:`attacks.leakage`, :mod:`attacks.scoring` - pinned SSIM/PSNR, Hungarian
  matching, the leakage rate;
* :mod:`attacks.keyless`, :mod:`attacks.fed_inversion`, :mod:`attacks.split_inversion` - the server's recorded
  view of a real run (read through :mod:`splitfl.runs`), read as the server can read it;
* :mod:`attacks.imprint`, :mod:`attacks.imprint_model`, :mod:`attacks.malicious_fed` - a malicious FedAvg
  server (crafted global model, Fowl et al.);
* :mod:`attacks.malicious_split`, :mod:`attacks.fsha`, :mod:`attacks.label_inference` - a malicious split
  server (feature-space hijacking, crafted head);
* :mod:`attacks.config` - the attack config (curious or malicious server, each attack's settings);
* :mod:`attacks.harness` - ``splitfl attack`` (curious server); :mod:`attacks.active` - its malicious server.

Names are imported lazily (PEP 562), so ``splitfl --help`` does not load torchmetrics.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "attacks.gradient_inversion": ["InversionResult", "add_gaussian_noise", "dlg", "gradients_from_update", "idlg",
                                   "infer_labels", "inverting_gradients", "local_update", "model_gradients", "reconstruct"],
    "attacks.leakage": ["LeakageDetails", "leak_flags", "leakage_curve", "leakage_rate", "ssim_cutoff_curve"],
    "attacks.metrics": ["MatchResult", "match_reconstructions", "pairwise_ssim", "psnr", "ssim", "to_unit"],
    "attacks.models": ["LeNetDLG", "lenet_dlg"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'attacks' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
