"""The attack config: a compare config (base run keys plus ``variants``) with an ``attack`` section, and the
malicious servers' settings (``imprint``, ``fsha``, ``labels``).

Kept apart from the harness and the attacks so the configuration reference and the command line read it
without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jsonargparse import ArgumentParser

from splitfl.variants import CompareConfig, variants_parser


@dataclass
class AttackSettings:
    """The attacker's budget and the scoring rules."""

    # curious: the server follows the protocol and attacks what it recorded (attacks.harness); malicious: it
    # deviates to make the hospitals leak (attacks.active: each variant's 'attack' is imprint, fsha or labels)
    server: str = "curious"
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
class ImprintSettings:
    """The attacker's choices and the scoring rules of one malicious-server run."""

    local_steps: int = 4  # optimizer steps each hospital takes in the attacked round (its data: this many batches)
    num_sites: int | None = None  # hospitals (None: the config's data.partition.num_sites)
    attack_round: int = 1  # the round whose broadcast is crafted (rounds before it are honest)
    bins: int | None = None  # block rows (None: 16 x the images behind the attacked message, W1 <= MAX_BLOCK_WEIGHTS)
    gain: float | None = None  # W1 scale (None: chosen by simulating a hospital's round on the attacker's images)
    gains: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # the grid choose_gain tries
    residual_scale: float = 1e-2  # RMS of the switched-on block's residual on the attacker's images
    dp_noise_multiplier: float = 1.0  # fedavg+dp when the config sets no DP noise
    model_guard: float | None = None  # the hospitals' fed.model_guard (None: the config's)
    honest: bool = False  # control: the server broadcasts the model as trained and runs the same decoding
    # Against fed.model_guard: from attack_round on, move the block towards the crafted weights by steps the guard
    # accepts (this share of its bound, which the consortium config makes public); attack the first round it arrives.
    ramp: float | None = None
    max_rounds: int = 30  # ramp: give up after this many rounds
    # The server picks who takes part: in the attacked round it samples this site alone, so the "aggregate" a key
    # holder decrypts under fed.secure: he is that one site's update (None: the config's sampling).
    isolate: int | None = None
    distractors: int | None = None  # outside images in the re-identification pool (None: the whole test split)
    margin: float = 0.1  # leaked: re-identified and SSIM gain over the mean image >= margin
    montage_images: int = 16  # images shown in each montage
    threads: int = 1  # torch threads of the attacked run (many small steps: extra threads contend)
    # Record the server's view under <out>/run/transcript (fed.transcript: the crafted broadcast, every upload, the
    # hospitals' ground truth), as the passive harness does; off by default (ResNet-18 rounds are tens of MB each).
    transcript: bool = False


@dataclass
class FSHASettings:
    """The malicious server's budget (defaults: the paper's published WGAN-GP setting where it has one)."""

    observations: int = 8  # training steps at the start of the last epoch whose activations are inverted and scored
    distractors: int = 200  # test images in the re-identification pool (>= 100)
    aux_from_test: int = 0  # test images after the distractors added to the attacker's own (validation) images
    margin: float = 0.1  # leaked: re-identified and SSIM gain over the mean image >= margin
    pretrain_steps: int = 200  # pilot autoencoder steps on the auxiliary images before the protocol starts
    pretrain_lr: float = 1e-3  # Adam learning rate of that pretraining
    lr_pilot: float = 1e-5  # Adam learning rate of pilot and decoder during the attack (paper: lr_tilde)
    lr_critic: float = 1e-4  # Adam learning rate of the critic (paper: lr_D)
    gp_weight: float = 500.0  # weight of the critic's gradient penalty (paper: gradient_penalty)
    critic_steps: int = 5  # critic updates per hospital step, each on a fresh auxiliary batch (WGAN-GP's n_critic)
    critic_betas: tuple[float, float] = (0.5, 0.9)  # Adam betas of the critic (WGAN-GP, Gulrajani et al. 2017)
    decoder_width: int = 32  # channels of the decoder f~^-1's convolutions
    grad_scale: float = 1.0  # factor on the gradient returned to the hospitals
    # split-plain: also train the honest head on the hospitals' logit gradients and return its logits, so their loss
    # falls as under an honest server (what a server does against the hospitals' split.loss_guard)
    disguise: bool = False
    seed: int = 0  # seed of the attacker's networks and auxiliary batches
    montage_images: int = 16  # images shown in each montage


@dataclass
class LabelSettings:
    """What is scored."""

    observations: int = 50  # training steps (from the first) whose inferred labels are scored
    craft_head: bool = True  # False: the honest head, read the same way (a curious server, for comparison)


@dataclass
class AttackConfig(CompareConfig):
    attack: AttackSettings = field(default_factory=AttackSettings)
    imprint: ImprintSettings = field(default_factory=ImprintSettings)  # malicious FedAvg server (attack: imprint)
    fsha: FSHASettings = field(default_factory=FSHASettings)  # malicious split server (attack: fsha)
    labels: LabelSettings = field(default_factory=LabelSettings)  # malicious split server (attack: labels)


def build_attack_parser() -> ArgumentParser:
    """``splitfl attack``'s command line."""
    return variants_parser(
        AttackConfig,
        "Curious server (attack.server: curious): train each variant with the server's view recorded (reused when "
        "finished), run the attacks for its regime on that view, and score them. Malicious server (attack.server: "
        "malicious): run each variant's active attack (imprint, fsha, labels) against the hospitals' own code. "
        "Writes OUT/NAME/{leakage.json,montage.png}, OUT/leakage_summary.{md,csv,json,png}.",
        "YAML: run config keys (no regime), 'variants' and 'attack'",
        "comma-separated variant names to attack",
    )
