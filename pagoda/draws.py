"""What one stage step draws at random: a pure function of (seed, stage, step), from generators seeded by
(seed, 1000 + stage, step[, D step j + 1]). Hence `--resume` is bit-exact, and N ranks split one global batch (each
rank takes its slices of every draw) into the update of 1 rank with batch N·B.

    draws = StageDraws(seed=0, stage=1, batch=64, entries=6000, d_steps=1, latent=(1, 8, 8), sigma_max=80.0,
                       num_classes=10, guidance_max=0.0, guided_adv=True)
    d = draws(step)                       # StepDraw: the L_rec batch's entries and flips, (z', y', ω'), seeds, D steps
    x = augment(x, policy, d.aug_seed, first)   # DiffAugment, sample i from (seed, first + i): split-independent

A text run draws caption indices where a class run draws classes (`num_classes` = the number of training captions;
y' uniform over them, as y' over the classes, no null caption); `caption_condition` turns indices into the text G,
D and the teacher take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pagoda.loop import step_generator
from pagoda.losses import diff_augment

DISTILL_POOL = 4096  # size of the fixed z pool whose teacher samples the distillation loss uses


@dataclass
class Fresh:
    """Fresh (z', y', ω') of the adversarial terms; y' None for an unconditional G, ω' None for an unguided one."""

    z: torch.Tensor  # (B, C, R0, R0) ~ N(0, σ_max² I)
    y: torch.Tensor | None  # (B,) class labels (a text run: caption indices; after `part(..., condition)` their text)
    omega: torch.Tensor | None  # (B,) guidance scales

    def part(self, sl: slice, device: torch.device, condition: Callable | None = None) -> Fresh:
        """This micro-batch's rows, on the device; y' through `condition` (caption_condition) when given."""
        z, y, omega = (None if t is None else t[sl].to(device) for t in (self.z, self.y, self.omega))
        return Fresh(z, y if condition is None or y is None else condition(y), omega)


@dataclass
class DStepDraw:
    """The draws of one D step."""

    real: torch.Tensor  # (B,) latent-cache entries of the real batch
    recon: torch.Tensor  # (B,) entries whose reconstructions the reconstruction-D judges (official 512 px)
    fresh: Fresh  # the fakes' (z', y', ω')
    flips: torch.Tensor  # (B,) bool: h-flip the real image


@dataclass
class StepDraw:
    """Everything random in one step (the global batch; each rank takes its slices)."""

    entries: torch.Tensor  # (B,) latent-cache entries of the reconstruction batch
    flips: torch.Tensor  # (B,) bool: use the h-flipped image and latent
    fresh: Fresh  # (z', y', ω') of L_adv
    aug_seed: int  # DiffAugment seed of this step
    pool: torch.Tensor  # (B,) distillation-pool indices
    d_steps: list[DStepDraw]


@dataclass
class Pairs:
    """One micro-batch read from the latent cache, on the device."""

    x: torch.Tensor  # (B, C, R, R) the image at the stage resolution
    z: torch.Tensor  # (B, C, R0, R0) its latent E(x_lo)
    y: torch.Tensor | None  # (B,) its labels (a text run: its caption's TextEmbedding)


@dataclass(frozen=True)
class StageDraws:
    """The random draws of stage `stage` of a run (one global batch per step)."""

    seed: int
    stage: int  # the stage's index in the run (0 = stage 2, the decoder at the teacher resolution)
    batch: int  # global batch
    entries: int  # latent-cache entries to draw from
    d_steps: int  # D steps per G step
    latent: tuple[int, int, int]  # (C, R0, R0) of z
    sigma_max: float
    num_classes: int | None
    guidance_max: float  # > 1: draw ω' ~ U[1, ω_max] (0: an unguided G, nothing drawn)
    guided_adv: bool  # False: the fakes' ω' = 1 (the real data are the ω = 1 distribution)

    def rng(self, *keys: int) -> torch.Generator:
        return step_generator(self.seed, 1000 + self.stage, *keys)

    def fresh(self, g: torch.Generator, n: int) -> Fresh:
        """n fresh (z', y', ω'); ω' only for an ω-conditioned G (else nothing is drawn)."""
        z = self.sigma_max * torch.randn(n, *self.latent, generator=g)
        y = torch.randint(0, self.num_classes, (n,), generator=g) if self.num_classes else None
        omega = 1 + (self.guidance_max - 1) * torch.rand(n, generator=g) if self.guidance_max else None
        if omega is not None and not self.guided_adv:
            omega = torch.ones_like(omega)
        return Fresh(z, y, omega)

    def __call__(self, step: int) -> StepDraw:
        """Step k's draws, in a fixed order (changing it changes every run)."""
        B, N = self.batch, self.entries
        g = self.rng(step)
        entries, flips = torch.randint(0, N, (B,), generator=g), torch.rand(B, generator=g) < 0.5
        fresh = self.fresh(g, B)
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        pool = torch.randint(0, DISTILL_POOL, (B,), generator=g)
        d_steps = []
        for j in range(self.d_steps):
            gj = self.rng(step, j + 1)
            real, recon = torch.randint(0, N, (B,), generator=gj), torch.randint(0, N, (B,), generator=gj)
            fresh_j = self.fresh(gj, B)
            d_steps.append(DStepDraw(real, recon, fresh_j, torch.rand(B, generator=gj) < 0.5))
        return StepDraw(entries, flips, fresh, aug_seed, pool, d_steps)


def caption_condition(model, captions: list[str]) -> Callable:
    """y (caption indices) -> model.encode_text(the captions) (a pagoda.text.TextEmbedding on the model's device)."""
    def condition(y: torch.Tensor):
        return model.encode_text([captions[i] for i in y.tolist()])
    return condition


def augment(x: torch.Tensor, policy: str, seed: int, first: int) -> torch.Tensor:
    """DiffAugment with sample i drawn from (seed, first + i), its index in the global batch: the same augmentation
    however the batch is split over ranks and accumulation steps ('' = none)."""
    if not policy:
        return x
    return diff_augment(x, policy, [step_generator(seed, first + i) for i in range(len(x))])
