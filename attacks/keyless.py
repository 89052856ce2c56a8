"""What a server without the key can read out of the ciphertexts it holds.

The harness does not assume that encryption hides everything: it hands the
attacks the server's best reading of each encrypted message and scores what
comes out, like any other view. A CKKS ciphertext is a pair (c0, c1) with
c0 + c1*s = Delta*m + e (mod q) for the secret key s. Without s the closest
thing to decryption is to guess s = 0, i.e. to read c0 as if it were the
encoded message: centre its coefficients mod q and divide by the scale Delta,
exactly the steps of decryption and coefficient decoding. Under RLWE this
reading is indistinguishable from uniform noise, which is what the scores
then show.
"""
from __future__ import annotations

import numpy as np
import tenseal.sealapi as sa

from splitfl.he.aggregation import load_update
from splitfl.he.keys import engine_for, load_public_context


def ciphertext_readout(ct: object, modulus: int) -> np.ndarray:
    """c0 of one SEAL ciphertext (its first RNS prime), centred mod ``modulus`` and divided by its scale."""
    n = ct.poly_modulus_degree()
    words = ct.dyn_array()  # every RNS coefficient of c0, then of c1; c0's first prime comes first
    coeffs = np.fromiter((words.at(i) for i in range(n)), dtype=np.uint64, count=n)
    centred = np.where(coeffs > modulus // 2, coeffs.astype(np.float64) - float(modulus), coeffs.astype(np.float64))
    return centred / float(ct.scale)


def encrypted_update_readout(payload: bytes, public_context: bytes, length: int) -> np.ndarray:
    """A site's encrypted FedAvg update as a keyless server reads it: ``length`` values, divided by its count.

    The payload is first checked and loaded exactly as the aggregating server
    does (:func:`splitfl.he.aggregation.load_update`), with the public context
    the server holds.
    """

    ctx = load_public_context(public_context)
    info, cts = load_update(ctx, payload, length)
    eng = engine_for(ctx)
    modulus = eng.context.get_context_data(cts[0].parms_id()).parms().coeff_modulus()[0].value()
    values = np.concatenate([ciphertext_readout(ct, modulus) for ct in cts])
    return values[:length] / info.count


def zero_key_decryptor(engine: object) -> object:
    """A SEAL Decryptor whose secret key is all zeros: ``decrypt(ct)`` is then c0, the keyless reading.

    The attacker makes its own key generator (public parameters only) and zeroes the key's polynomial,
    so the reading goes through SEAL's own decryption and CKKS decoding, slot by slot.
    """

    sk = sa.KeyGenerator(engine.context).secret_key()
    sk.data().set_zero()
    return sa.Decryptor(engine.context, sk)


def ciphertext_slots_readout(ct: object, engine: object, decryptor: object | None = None) -> np.ndarray:
    """All CKKS slots (complex) of one ciphertext decrypted with s guessed 0 and decoded at its scale."""

    decryptor = decryptor if decryptor is not None else zero_key_decryptor(engine)
    pt = sa.Plaintext()
    decryptor.decrypt(ct, pt)
    return np.array(engine.encoder.decode_complex(pt), dtype=np.complex128)
