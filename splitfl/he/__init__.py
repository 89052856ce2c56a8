"""CKKS core of the ``split-he`` protocol: keys, slot packing, encrypted linear head, wire format.

Hospitals hold the consortium's secret context and encrypt activations (and,
for encoder fine-tuning, logit gradients); the server holds only the public
context and evaluates its linear head on the ciphertexts. See
:class:`PackedLinearHE` for the protocol steps and ``bench/he_head.py`` for
measured costs.
"""
from __future__ import annotations

from .keys import (
    context_fingerprint,
    create_secret_context,
    load_public_context,
    load_secret_context,
    params_of,
    public_context_bytes,
    save_secret_context,
)
from .linear import PackedLinearHE
from .mlp import MLP_DEPTH, PackedMLPHE, mlp_public_context_bytes
from .packing import PackedLayout
from .params import (
    PRESETS,
    CKKSParams,
    HEError,
    check_depth,
    check_product_depth,
    check_key_switching,
    check_security,
    get_preset,
    max_abs_value,
)
from .wire import EncryptedBatch

__all__ = [
    "CKKSParams",
    "EncryptedBatch",
    "HEError",
    "MLP_DEPTH",
    "PRESETS",
    "PackedLayout",
    "PackedLinearHE",
    "PackedMLPHE",
    "check_depth",
    "check_product_depth",
    "check_key_switching",
    "check_security",
    "context_fingerprint",
    "create_secret_context",
    "get_preset",
    "load_public_context",
    "load_secret_context",
    "max_abs_value",
    "mlp_public_context_bytes",
    "params_of",
    "public_context_bytes",
    "save_secret_context",
]
