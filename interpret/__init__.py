"""splitfl's interpretability library: attribution maps and the checks that say whether to trust them.

* :mod:`interpret.attributions` - Integrated Gradients, Grad-CAM (CNN and
  ViT token grid), Occlusion, SmoothGrad via Captum: ``attribute``,
  ``attribute_all``;
* :mod:`interpret.faithfulness` - deletion/insertion vs random maps,
  Captum infidelity and sensitivity, the model-randomisation test;
* :mod:`interpret.agreement` - rank correlation and top-k overlap of two
  models' maps;
* :mod:`interpret.ordinal` - ordinal grading: per-grade maps, the
  expected-grade contrast, grading agreement (kappa, grade error);
* :mod:`interpret.targets` - the Grad-CAM layer, and which models Captum's
  DeepLift cannot explain.

Names are imported lazily (PEP 562), so importing :mod:`interpret` does not
load Captum.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "interpret.attributions": ["DEFAULT_VALUE_RANGE", "EXTRA_METHODS", "METHODS", "attribute", "attribute_all",
                               "ig_completeness_gap"],
    "interpret.faithfulness": ["deletion_insertion", "infidelity_scores", "randomisation_check", "randomise_model",
                               "sensitivity_scores", "target_probability"],
    "interpret.agreement": ["compare_maps", "spearman_per_image", "top_fraction_overlap"],
    "interpret.ordinal": ["contrast_maps", "grade_maps", "grading_metrics", "per_grade_maps"],
    "interpret.targets": ["gradcam_layer", "uses_smooth_nonlinearity"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'interpret' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
