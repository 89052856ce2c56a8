"""The attack config: a compare config (base run keys plus ``variants``) with an ``attack`` section.

Kept apart from the harness so the configuration reference and the command line read it without
loading torch or the attacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jsonargparse import ArgumentParser

from splitfl.variants import CompareConfig, variants_parser


@dataclass
class AttackSettings:
    """The attacker's budget and the scoring rules."""

    method: str = "ig"  # ig (Inverting Gradients), idlg or dlg
    iterations: int = 1000  # optimiser steps of each inversion start
    restarts: int = 1  # inversion starts per observation (the best is kept)
    lr: float = 0.1  # the attack optimiser's step (ig)
    tv_weight: float = 1e-3  # weight of the total-variation image prior
    max_observations: int = 16  # (round, site) updates or batches attacked per variant
    distractors: int = 200  # outside images in the re-identification pool (>= 100)
    margin: float = 0.1  # leaked: re-identified and SSIM gain over the mean image >= margin
    seed: int = 0  # seed of the attacks' random starts (and the decoder's training)
    # split regimes: which activation inversions to run (white-box through the known encoder, a decoder trained
    # on the attacker's auxiliary images, or both); iterations, lr and tv_weight set the white-box budget
    split_attack: str = "both"
    decoder_epochs: int = 30  # split decoder attack: epochs training the decoder
    decoder_lr: float = 1e-3  # split decoder attack: the decoder's learning rate
    # split regimes with a trainable encoder: the curious fellow hospital inverts the relayed encoder's update
    # (attacks.fellow_inversion); its budget, with lr and tv_weight above
    fellow_iterations: int = 4000


@dataclass
class AttackConfig(CompareConfig):
    attack: AttackSettings = field(default_factory=AttackSettings)


def build_attack_parser() -> ArgumentParser:
    """``splitfl attack``'s command line."""
    return variants_parser(
        AttackConfig,
        "Train each variant with the server's view recorded (reused when finished), run the attacks for its "
        "regime on that view, and score them: OUT/NAME/{leakage.json,montage.png}, OUT/leakage_summary.{md,csv,json,png}.",
        "YAML: run config keys (no regime), 'variants' and 'attack'",
        "comma-separated variant names to attack",
    )
