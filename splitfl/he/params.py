"""CKKS parameter sets for the split-HE head, and the checks that keep them safe.

A parameter set fixes the ring degree N (slots = N/2), the RNS primes of the
coefficient modulus (first = the prime results are decrypted under, middle
primes = one rescale level each, last = SEAL's special prime for key
switching) and the encoding scale 2**scale_bits. Three things can go wrong
and each has a check that says which numbers to change:

* security: the total modulus is bounded by the HomomorphicEncryption.org
  standard for 128-bit classical security (:func:`check_security`);
* depth: every plaintext/ciphertext multiplication is followed by a rescale
  that consumes one middle prime (:func:`check_depth`);
* range: values are stored as ``round(v * scale)`` modulo the remaining primes,
  so a value too large for the bits left above the scale wraps around and
  decrypts to garbage (:func:`max_abs_value`).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HEError",
    "CKKSParams",
    "PRESETS",
    "MAX_COEFF_MODULUS_BITS_128",
    "MIN_INTEGER_BITS",
    "check_product_depth",
    "MIN_SCALE_BITS",
    "get_preset",
    "check_security",
    "check_depth",
    "check_key_switching",
    "max_abs_value",
]


class HEError(ValueError):
    """A homomorphic-encryption input or setting is wrong; the message says what, where and what to do."""


# HomomorphicEncryption.org security standard (Albrecht et al., 2018), table for
# 128-bit classical security with a ternary secret: the largest total bit count
# log2(q) of the coefficient modulus (all primes, special prime included) per N.
MAX_COEFF_MODULUS_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

# Bits of the first prime that must remain above the scale: the sign plus the
# integer part of every value the client decrypts (10 bits: |v| < 2**9 = 512).
MIN_INTEGER_BITS = 10
# Below 2**20 the encoding rounding alone costs ~1e-6 relative precision per slot.
MIN_SCALE_BITS = 20
# SEAL accepts primes of at most 60 bits (CoeffModulus::Create).
_MAX_PRIME_BITS = 60


@dataclass(frozen=True)
class CKKSParams:
    """One CKKS parameter set: ring degree, RNS prime sizes (bits) and scale bits."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        where = f"CKKSParams {self.name!r}"
        if not isinstance(n, int) or n < 1024 or n & (n - 1):
            raise HEError(f"{where}: poly_modulus_degree={n!r} must be a power of two >= 1024 (e.g. 8192).")
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            raise HEError(
                f"{where}: coeff_mod_bit_sizes={list(bits)} needs at least 2 primes (data prime(s) + SEAL's special "
                "prime), e.g. [60, 40, 60]."
            )
        bad = [b for b in bits if not 2 <= b <= _MAX_PRIME_BITS]
        if bad:
            raise HEError(f"{where}: prime sizes {bad} are outside SEAL's 2..{_MAX_PRIME_BITS} bits; split them.")
        if not isinstance(self.scale_bits, int) or self.scale_bits < 1:
            raise HEError(f"{where}: scale_bits={self.scale_bits!r} must be a positive integer (e.g. 40).")

    @property
    def slots(self) -> int:
        """Complex slots per ciphertext (N/2); the packing stores two real values per slot."""
        return self.poly_modulus_degree // 2

    @property
    def levels(self) -> int:
        """Rescales available: the middle primes (all but the first and the special prime)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def total_bits(self) -> int:
        """Bits of the whole coefficient modulus, special prime included (what security depends on)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def describe(self) -> str:
        return (
            f"{self.name}: N={self.poly_modulus_degree}, coeff_mod_bit_sizes={list(self.coeff_mod_bit_sizes)} "
            f"({self.total_bits} bits), scale=2^{self.scale_bits}"
        )


PRESETS: dict[str, CKKSParams] = {
    # Depth-1 linear heads: one rescale, 4096 complex slots, |error| ~1e-7, 19 integer bits.
    "default": CKKSParams(8192, (60, 40, 60), 40, "default"),
    # MLP heads (linear -> square/poly2 -> linear): four rescale levels.
    "deep": CKKSParams(16384, (60, 40, 40, 40, 40, 60), 40, "deep"),
    # split-he-full (splitfl.he.encrypted_head): one ciphertext x ciphertext product per output, rescaled once.
    # Fresh values at scale 2^50; the product (2^100, 120 bits) keeps 19 integer bits and its rescale by the
    # 60-bit prime lands at ~2^40 with 19 integer bits too; |error| ~1e-10. Same cost as default (two data primes).
    "full": CKKSParams(8192, (60, 60, 60), 50, "full"),
    # Smallest secure ring that holds one rescale: fast tests, |error| ~1e-4, 11 integer bits.
    "small": CKKSParams(4096, (40, 29, 40), 29, "small"),
    # Encrypted FedAvg (splitfl.he.aggregation): additions only (depth 0). Updates are encrypted at the
    # LAST level, where only the first 60-bit prime is left, so each value costs 8 bytes (seeded) on the
    # wire; the 36-bit rescale prime (every preset keeps one level and key switching) and the special
    # prime live only in the keys. Scale 2^36 leaves 24 bits above it: |sum_k n_k * x| up to 2^21 ~ 2.1e6
    # (aggregation.capacity); error of the sum ~1e-8 per value.
    "aggregation": CKKSParams(8192, (60, 36, 60), 36, "aggregation"),
}


def get_preset(name: str) -> CKKSParams:
    """Preset by name, with the list of names when it is unknown."""
    try:
        return PRESETS[name]
    except KeyError:
        raise HEError(f"Unknown CKKS preset {name!r}; choose one of {sorted(PRESETS)}.") from None


def check_security(params: CKKSParams) -> None:
    """Raise HEError unless the set meets 128-bit classical security (HomomorphicEncryption.org table)."""
    n = params.poly_modulus_degree
    limit = MAX_COEFF_MODULUS_BITS_128.get(n)
    if limit is None:
        raise HEError(
            f"{params.describe()}: N={n} is not in the 128-bit security table "
            f"(N in {sorted(MAX_COEFF_MODULUS_BITS_128)})."
        )
    if params.total_bits > limit:
        raise HEError(
            f"{params.describe()} is NOT 128-bit secure: the coefficient modulus has {params.total_bits} bits but "
            f"N={n} allows at most {limit} (HomomorphicEncryption.org standard). Drop "
            f"{params.total_bits - limit} bits from coeff_mod_bit_sizes or double poly_modulus_degree."
        )


def check_depth(params: CKKSParams, multiplicative_depth: int) -> None:
    """Raise HEError unless ``multiplicative_depth`` rescales fit and the scale/range stay consistent.

    Each multiplication is followed by a rescale that divides by (and drops) one
    middle prime, so (1) there must be one middle prime per multiplication,
    (2) each middle prime must be as large as the scale, or the scale drifts by
    their ratio at every level, and (3) the first prime, the only one left at the
    end, must keep ``MIN_INTEGER_BITS`` above the scale for the sign and the
    integer part of the results.
    """
    if multiplicative_depth < 0:
        raise HEError(f"multiplicative_depth={multiplicative_depth} must be >= 0.")
    bits = params.coeff_mod_bit_sizes
    if multiplicative_depth > params.levels:
        raise HEError(
            f"{params.describe()} has {params.levels} rescale level(s) (len(coeff_mod_bit_sizes) - 2) but the "
            f"computation needs {multiplicative_depth}: add {multiplicative_depth - params.levels} middle prime(s) "
            f"of {params.scale_bits} bits (and check_security), or use the 'deep' preset."
        )
    middle = bits[1:-1]
    for i, b in enumerate(middle, start=1):
        if b != params.scale_bits:
            raise HEError(
                f"{params.describe()}: middle prime #{i} has {b} bits but scale_bits={params.scale_bits}; a rescale "
                f"divides by that prime, so the scale drifts by 2^{b - params.scale_bits} per level. Make every "
                f"middle prime {params.scale_bits} bits."
            )
    if params.scale_bits < MIN_SCALE_BITS:
        raise HEError(
            f"{params.describe()}: scale 2^{params.scale_bits} is below 2^{MIN_SCALE_BITS}; the encoding error "
            f"(~2^-{params.scale_bits} per value) would swamp the result. Raise scale_bits."
        )
    integer_bits = bits[0] - params.scale_bits
    if integer_bits < MIN_INTEGER_BITS:
        raise HEError(
            f"{params.describe()}: the first prime ({bits[0]} bits) leaves only {integer_bits} integer bit(s) "
            f"above the scale (values up to about ±2^{integer_bits - 1}); at least {MIN_INTEGER_BITS} are needed. "
            f"Raise the first prime to {params.scale_bits + MIN_INTEGER_BITS}+ bits or lower scale_bits."
        )


def check_product_depth(params: CKKSParams) -> None:
    """Raise HEError unless one ciphertext x ciphertext product, rescaled once, fits (split-he-full's head).

    Two fresh values at scale 2^s multiply to 2^(2s), which must stay ``MIN_INTEGER_BITS`` below the top
    modulus; the rescale divides by the last data prime q, so the result sits at 2^(2s) / q and the first
    prime must keep ``MIN_INTEGER_BITS`` above that. (Unlike :func:`check_depth`, the rescaling prime need not
    equal the scale: nothing is multiplied after it.)
    """
    bits = params.coeff_mod_bit_sizes
    if params.levels < 1:
        raise HEError(f"{params.describe()} has no rescaling level; a ciphertext x ciphertext product needs one "
                      "(use the 'full' preset).")
    product, top = 2 * params.scale_bits, sum(bits[:-1])
    result = product - bits[-2]
    for what, room in (("the product before its rescale", top - product), ("the rescaled result", bits[0] - result)):
        if room < MIN_INTEGER_BITS:
            raise HEError(f"{params.describe()}: {what} keeps {room} integer bit(s) (at least {MIN_INTEGER_BITS} "
                          "needed); lower scale_bits or raise the primes (the 'full' preset: 60/60/60, scale 2^50).")
    if result < MIN_SCALE_BITS:
        raise HEError(f"{params.describe()}: the rescaled product sits at scale 2^{result}, below 2^{MIN_SCALE_BITS}; "
                      "raise scale_bits or lower the rescaling prime.")


def check_key_switching(params: CKKSParams) -> None:
    """Raise HEError if rotations/relinearization would be too noisy (special prime smaller than the others).

    Key switching divides its noise by the special prime; one smaller than the
    data primes leaves noise above the scale. The linear head never switches
    keys, but Galois keys (the per-sample baseline) and MLP heads do.
    """
    bits = params.coeff_mod_bit_sizes
    if bits[-1] < max(bits[:-1]):
        raise HEError(
            f"{params.describe()}: the special (last) prime has {bits[-1]} bits, fewer than the largest data "
            f"prime ({max(bits[:-1])} bits); rotations and relinearization would drown the result in noise. "
            "Make the last prime the largest."
        )


def max_abs_value(params: CKKSParams, multiplicative_depth: int = 1) -> float:
    """Largest |value| a slot can hold at every step of a depth-``multiplicative_depth`` evaluation.

    A value v is stored as round(v * scale) modulo the primes left at that
    step; it must stay below half that modulus. After each multiplication the
    scale is scale**2 over all remaining primes, after the rescale it is back
    to ``scale`` over one prime fewer; the bound is the tightest of these, with
    one bit of margin for the primes being slightly below their power of two.
    For the default set (60, 40, 60) at 2^40 this is 2^18 = 262144.
    """
    check_depth(params, multiplicative_depth)
    data = list(params.coeff_mod_bit_sizes[:-1])
    s = params.scale_bits
    headroom = sum(data) - s  # fresh ciphertext
    for _ in range(multiplicative_depth):
        headroom = min(headroom, sum(data) - 2 * s)  # product, before the rescale
        data.pop()  # the rescale drops the last data prime
        headroom = min(headroom, sum(data) - s)
    return float(2 ** (headroom - 2))
