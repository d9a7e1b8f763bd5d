"""Text-to-image measurements of issue 21 §6-7 for any sampler `generate(prompts, seed) -> (N, 3, R, R)` in [-1, 1].

One image per prompt; the prompts are emoji captions (pagoda.data.EmojiDataset). What is measured, per sample set:
  subgroup   the fraction the emoji-subgroup classifier of the sample's resolution (pagoda/classifier.py) puts in
             the prompt's CLDR subgroup ("red apple" -> food-fruit)                                     (§6a)
  top1/top5  retrieval: the fraction whose own emoji is the nearest / among the 5 nearest of all 3,655 real emoji,
             by the distance of EfficientNet-Lite0 features at 64 px (samples below 64 px bicubic-upsampled) (§6b)
  tone       the fraction of single-tone prompts ("…: dark skin tone") whose sample the emoji-tone classifier
             puts in the named tone (of 5; chance 1/5); the 20 held-out prompts are all dark, so their rate is read
             beside the rate at which the same emoji's trained tones are called dark                      (§7)
  fid/kid    against the real training emoji at the sample's resolution (pagoda/metrics.py, clean-fid) (§6)
A sampler that returns each prompt's real image scores the ceilings (`real_sampler`); one that ignores its prompt
scores chance. The floor of FID is real vs real: two random halves of the training images (1,740 each).

    real = RealEmoji()                                          # every captioned emoji at 64 px, looked up by caption
    x = draw(real_sampler(16), real.captions[:100], seed=0)     # (100, 3, 16, 16): the prompts' real images
    Retrieval(real).rates(x, real.captions[:100])               # {'top1': …, 'top5': …}; 1.0 and 1.0 at 64 px
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pagoda.backbone import EfficientNetLite0
from pagoda.classifier import Classifier, caption_tone, classifier_for, emoji_subgroups
from pagoda.data import EMOJI_HELD_OUT_TONE, EMOJI_TONES, EmojiDataset, emoji_tone_bases
from pagoda.images import resample
from pagoda.metrics import (FeatureExtractor, MetricsError, ReferenceStats, dataset_reference, fid_from_stats,
                            kid_from_features, mean_cov)

Generate = Callable[[list[str], int], torch.Tensor]  # (prompts, seed) -> one image per prompt, (N, 3, R, R) in [-1, 1]
RETRIEVAL_RES = 64  # Lite0 features of every image at this resolution
CALL = 100  # prompts per generate call; call k of a draw gets seed `seed * SEED_STRIDE + k`
SEED_STRIDE = 100_003


class RealEmoji:
    """Every captioned emoji (split 'all') at `resolution`: images, captions, their subgroup and tone labels."""

    def __init__(self, resolution: int = RETRIEVAL_RES):
        data = EmojiDataset("all", resolution)
        self.images, self.captions = data.batch(torch.arange(len(data)))[0], data.captions
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.subgroups, self.classes = data.subgroups, emoji_subgroups(resolution)

    def ids(self, prompts: list[str]) -> torch.Tensor:
        """Index of each prompt's emoji; a prompt that is no emoji caption: one-line ValueError."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise ValueError(f"prompt {missing[0]!r} is not an emoji caption; fix: measure with captions of "
                             f"EmojiDataset('all') (the retrieval and classifiers need the prompt's own emoji)")
        return torch.tensor([self.index[p] for p in prompts])

    def subgroup_labels(self, prompts: list[str]) -> torch.Tensor:
        """The emoji-subgroup class of each prompt."""
        return torch.tensor([self.classes.index(self.subgroups[i]) for i in self.ids(prompts).tolist()])


def real_sampler(resolution: int, via: int | None = None) -> Generate:
    """The ceiling as a sampler: each prompt's real image at `resolution` (the data set's, ADM-resized from 72 px),
    or at `via` px bicubic-upsampled to `resolution` (the "real 8 px + bicubic" floor of a grown stage). Ignores
    the seed."""
    real = RealEmoji(via or resolution)

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        return resample(real.images[real.ids(prompts)], resolution)
    return generate


def noise_sampler(resolution: int) -> Generate:
    """Chance as a sampler: uniform noise in [-1, 1] whatever the prompt, seeded."""
    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(prompts), 3, resolution, resolution, generator=g) * 2 - 1
    return generate


def draw(generate: Generate, prompts: list[str], seed: int) -> torch.Tensor:
    """One image per prompt, CALL prompts per call (call k seeded `seed * SEED_STRIDE + k`); checked shape and range."""
    out = []
    for k in range(0, len(prompts), CALL):
        chunk = prompts[k:k + CALL]
        with torch.no_grad():
            x = generate(chunk, seed * SEED_STRIDE + k // CALL).detach().float().cpu()
        if x.ndim != 4 or len(x) != len(chunk) or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            raise MetricsError(f"the sampler returned {tuple(x.shape)} for {len(chunk)} prompts; fix: "
                               f"generate(prompts, seed) must return one 3×R×R image per prompt")
        if not torch.isfinite(x).all():
            raise MetricsError("the sampler returned NaN or inf; fix: check the generator (diverged?)")
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


# Prompt sets ----------------------------------------------------------------------------------------

def fid_prompts(n: int | None = None) -> list[str]:
    """The training captions (all 3,480, or the first n of a fixed permutation): the prompts of FID and alignment."""
    captions = EmojiDataset("train", 8).captions
    order = np.random.default_rng(0).permutation(len(captions))
    return [captions[i] for i in order[:n]]


def tone_prompts() -> list[str]:
    """Item 7's prompts: the 20 emoji whose ": dark skin tone" is held out (never trained on), each in all 5 tones
    (balanced: any sampler that ignores the tone scores 1/5; the dark ones alone are the held-out composition)."""
    bases = emoji_tone_bases(EmojiDataset("all", 8).captions)
    return [f"{b}: {t} skin tone" for b in bases for t in EMOJI_TONES]


# Alignment ------------------------------------------------------------------------------------------

def subgroup_accuracy(classifier: Classifier, x: torch.Tensor, prompts: list[str], real: RealEmoji) -> float:
    """The fraction of samples the emoji-subgroup classifier puts in their prompt's subgroup (§6a)."""
    return classifier.accuracy(x, real.subgroup_labels(prompts))


def tone_accuracy(classifier: Classifier, x: torch.Tensor, prompts: list[str]) -> float:
    """The fraction of samples of single-tone prompts that the emoji-tone classifier puts in the named tone (§7)."""
    tones = [caption_tone(p) for p in prompts]
    if None in tones:
        raise ValueError(f"prompt {prompts[tones.index(None)]!r} names no single skin tone; fix: score only "
                         f"prompts ending in ': <tone> skin tone' (tone_prompts())")
    return classifier.accuracy(x, torch.tensor(tones))


class Retrieval:
    """Nearest real emoji by Lite0 features (§6b). An image's descriptor: each of Lite0's 4 feature maps (strides
    4 … 32) averaged over space and L2-normalised, concatenated; distances are Euclidean between descriptors.
    A real 64-px image is its own nearest neighbour (distance 0, nothing excluded): top-1 = 1 is the 64-px ceiling
    by construction; real images at lower resolutions + bicubic give the ceilings of the lower stages."""

    def __init__(self, real: RealEmoji, net: EfficientNetLite0 | None = None, batch: int = 256):
        self.real, self.batch = real, batch
        self.net = net if net is not None else EfficientNetLite0().fold_batchnorm()
        self.gallery = self.describe(resample(real.images, RETRIEVAL_RES))

    @torch.no_grad()
    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1], R ≤ 64 (bicubic-upsampled to 64) -> (N, 496) descriptors."""
        out = []
        for xb in resample(x, RETRIEVAL_RES).split(self.batch):
            maps = self.net.features(self.net.normalize(xb))
            out.append(torch.cat([F.normalize(m.mean((2, 3)), dim=1) for m in maps], 1))
        return torch.cat(out)

    def ranks(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per sample: how many real emoji are strictly nearer to it than its prompt's own (0 = retrieved first)."""
        own = self.real.ids(prompts)
        d = torch.cdist(self.describe(x), self.gallery)
        return (d < d.gather(1, own[:, None])).sum(1)

    def rates(self, x: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """top1 / top5: the fraction of samples whose own emoji is the nearest / among the 5 nearest real emoji."""
        r = self.ranks(x, prompts)
        return {"top1": (r < 1).float().mean().item(), "top5": (r < 5).float().mean().item()}


# FID / KID ------------------------------------------------------------------------------------------

def fid_kid(features: np.ndarray, ref: ReferenceStats, kid_subsets: int = 100) -> dict[str, float]:
    """FID against the reference's mu/sigma and KID (×10³) against its kept features."""
    kid, kid_std = kid_from_features(features, ref.features, subsets=kid_subsets)
    return {"fid": fid_from_stats(*mean_cov(features), ref.mu, ref.sigma), "kid_x1e3": 1e3 * kid,
            "kid_std_x1e3": 1e3 * kid_std, "n": len(features), "ref_n": ref.n}


def real_vs_real(ref: ReferenceStats, kid_subsets: int = 100) -> dict[str, float]:
    """The floor: FID/KID between two random halves of the reference images (its kept features, a seeded
    permutation of all of them when n ≤ metrics.KID_FEATURES). At half the n of a sample row, so an upper bound of
    the floor at full n (FID's bias grows as n shrinks)."""
    f = ref.features
    if f is None or len(f) < ref.n:
        raise MetricsError(f"the reference {ref.name} keeps {0 if f is None else len(f)} of its {ref.n} features; "
                           f"fix: a reference of at most metrics.KID_FEATURES images")
    half = len(f) // 2
    a, b = f[:half], f[half:2 * half]
    kid, kid_std = kid_from_features(a, b, subsets=kid_subsets)
    return {"fid": fid_from_stats(*mean_cov(a), *mean_cov(b)), "kid_x1e3": 1e3 * kid, "kid_std_x1e3": 1e3 * kid_std,
            "n": half, "ref_n": half}


# One row of the tables ---------------------------------------------------------------------------

class Measures:
    """Everything one row needs, built once: real emoji, prompt sets, Lite0 retrieval, classifiers, FID references."""

    def __init__(self, classifiers: str | Path, n: int | None = None, extractor: FeatureExtractor | None = None,
                 ref_n: int | None = None, cache_dir: Path | None = None, progress=None):
        self.real = RealEmoji()
        self.retrieval = Retrieval(self.real)
        self.prompts = {"train": fid_prompts(n), "held-out": EmojiDataset("test", 8).captions,
                        "five tones": tone_prompts()}
        self.folder, self.progress, self.classifiers = Path(classifiers), progress, {}
        self.extractor, self.ref_n, self.cache_dir, self.refs = extractor, ref_n, cache_dir, {}

    def classifier(self, task: str, res: int) -> Classifier:
        """The cached classifier of `task` at `res` (trained with its default config on first use)."""
        if (task, res) not in self.classifiers:
            self.classifiers[task, res] = classifier_for(self.folder, res, self.progress, task=task)
        return self.classifiers[task, res]

    def reference(self, res: int) -> ReferenceStats:
        """The FID reference: the real training emoji at `res` (or a seeded ref_n of them), cached on disk."""
        if res not in self.refs:
            self.refs[res] = dataset_reference("emoji", res, self.extractor, "train", self.ref_n, self.cache_dir)
        return self.refs[res]

    def row(self, model: str, omega, generate: Generate, seed: int = 0, fid: str = "samples") -> dict:
        """One table row: draw every prompt set once, score it. fid: 'samples', 'real halves' (the floor) or 'none'."""
        x = {name: draw(generate, prompts, seed) for name, prompts in self.prompts.items()}
        res = x["train"].shape[-1]
        subgroup, tone = self.classifier("emoji-subgroup", res), self.classifier("emoji-tone", res)
        five = self.prompts["five tones"]
        dark = [i for i, prompt in enumerate(five) if prompt.endswith(EMOJI_HELD_OUT_TONE)]  # never trained on
        other = [i for i in range(len(five)) if i not in dark]
        row = {"model": model, "resolution": res, "omega": omega,
               "subgroup": subgroup_accuracy(subgroup, x["train"], self.prompts["train"], self.real),
               "subgroup_held_out": subgroup_accuracy(subgroup, x["held-out"], self.prompts["held-out"], self.real),
               "tone_held_out": tone_accuracy(tone, x["five tones"][dark], [five[i] for i in dark]),
               "tone_five": tone_accuracy(tone, x["five tones"], self.prompts["five tones"]),
               # a sampler that ignores the tone scores tone_held_out == dark_elsewhere: read the two side by side
               "dark_elsewhere": tone.accuracy(x["five tones"][other], torch.full((len(other),), EMOJI_TONES.index("dark")))}
        for name, suffix in (("train", ""), ("held-out", "_held_out")):
            row.update({k + suffix: v for k, v in self.retrieval.rates(x[name], self.prompts[name]).items()})
        if fid == "samples":
            row.update(fid_kid(self.extractor.features(x["train"]), self.reference(res)))
        elif fid == "real halves":
            row.update(real_vs_real(self.reference(res)))
        return row
