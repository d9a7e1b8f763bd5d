"""A small Fashion-MNIST classifier per resolution, and the class-accuracy metric of conditional samples.

A sample of class y is "accurate" when this classifier puts it in class y; `pagoda eval --accuracy` reports the
fraction. One network per resolution R (images ADM-downsampled with `images.downsample`, as the stages see them):
3×3 conv-BN-ReLU layers, 2×2 max-pools and a linear layer on the flattened maps, trained on the train split with
AdamW + one-cycle, label smoothing 0.1, seeded, on CPU; a network trained with flips predicts from the mean of
the class probabilities of x and its mirror (test-time flip). It is cached as RUN/classifier/fmnist-R.pt (a
weights_only-loadable dict) and reused when present. Measured (test split, 10 000 images): docs/benchmarks.md §10.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pagoda.data import FashionMNIST
from pagoda.io import CheckpointError, checkpoint_kind, load_checkpoint, save_checkpoint

CLASSIFIER = "pagoda.classifier"  # the "kind" of a classifier file
NUM_CLASSES = 10
ProgressFn = Callable[[int, int], None]  # (done, total) training steps


def classifier_file(resolution: int) -> str:
    """File name of the cached classifier at `resolution`: fmnist-8.pt, fmnist-32.pt."""
    return f"fmnist-{int(resolution)}.pt"


@dataclass(frozen=True)
class ClassifierConfig:
    """How one classifier is built and trained (stored in its file)."""

    resolution: int
    layers: str  # conv widths in order, "p" = a 2×2 max-pool after that conv, e.g. "32p,64,64p,128"
    epochs: float  # passes over the training images
    batch: int = 128
    lr: float = 3e-3  # one-cycle peak of AdamW (weight decay 5e-4)
    flip: float = 0.0  # probability of a horizontal flip of each training image
    shift: int = 0  # each batch translated by up to ±shift pixels (background-padded)
    images: int | None = None  # the first N training images (None: all 60 000)
    seed: int = 0


def classifier_config(resolution: int, **override) -> ClassifierConfig:
    """The default configuration at `resolution` (≤ 8, ≤ 16, else the 32-px one), with `override` applied."""
    if resolution <= 8:
        cfg = ClassifierConfig(resolution, "64,64,128p,128,256p,256", epochs=12, flip=0.5)
    elif resolution <= 16:
        cfg = ClassifierConfig(resolution, "64,64p,128,128p,256", epochs=4, flip=0.5, shift=1)
    else:
        cfg = ClassifierConfig(resolution, "32p,64,64p,128,128p,256", epochs=2, flip=0.5, shift=2)
    return replace(cfg, **override)


class Classifier(nn.Module):
    """1×R×R images in [−1, 1] -> 10 Fashion-MNIST logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config, layers, c, size = config, [], 1, config.resolution
        for token in config.layers.split(","):
            width = int(token.rstrip("p"))
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if token.endswith("p"):
                layers, size = layers + [nn.MaxPool2d(2)], size // 2
            c = width
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * size * size, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities; a network trained with flips averages them over x and its mirror (test-time flip)."""
        p = self(x).softmax(1)
        return (p + self(x.flip(-1)).softmax(1)) / 2 if self.config.flip > 0 else p

    @torch.no_grad()
    def correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image: is it classified as its label? (bool, on the CPU; batches of 1000, eval mode)."""
        R = self.config.resolution
        if images.shape[1:] != (1, R, R):
            raise ValueError(f"this classifier takes 1×{R}×{R} images, got {tuple(images.shape[1:])}; "
                             f"fix: use the classifier of the images' resolution")
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()
        pred = torch.cat([self.probabilities(x.to(dev)).argmax(1).cpu() for x in images.float().split(1000)])
        self.train(was_training)
        return pred == labels.cpu()

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The fraction of `images` classified as their `labels`."""
        return self.correct(images, labels).float().mean().item()


def _augment(x: torch.Tensor, cfg: ClassifierConfig, g: torch.Generator) -> torch.Tensor:
    """Random h-flips per image and one random translation per batch (background −1 shifted in)."""
    flip = torch.rand(len(x), generator=g) < cfg.flip
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.shift:
        s, R = cfg.shift, x.shape[-1]
        dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
        x = F.pad(x, (s, s, s, s), value=-1.0)[..., dy:dy + R, dx:dx + R]
    return x


def train_classifier(cfg: ClassifierConfig, progress: ProgressFn | None = None) -> Classifier:
    """Train on the Fashion-MNIST train split at cfg.resolution (seeded, CPU); returned in eval mode."""
    data = FashionMNIST("train", resolution=cfg.resolution)
    x, y = data.images[:cfg.images], data.labels[:cfg.images]
    torch.manual_seed(cfg.seed)
    model = Classifier(cfg)
    steps = max(1, math.ceil(cfg.epochs * len(y) / cfg.batch))
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(steps):
        idx = torch.randint(0, len(y), (cfg.batch,), generator=g)
        loss = F.cross_entropy(model(_augment(x[idx], cfg, g)), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        progress and progress(step + 1, steps)
    return model.eval()


def split_accuracy(model: Classifier, split: str = "test", n: int | None = None) -> float:
    """Accuracy on the first n (default all) images of a Fashion-MNIST split at the model's resolution."""
    data = FashionMNIST(split, resolution=model.config.resolution)
    return model.accuracy(data.images[:n], data.labels[:n])


def save_classifier(model: Classifier, path: str | os.PathLike, test_acc: float) -> Path:
    """Atomically write {kind, config, state_dict, test_accuracy} (weights_only-loadable)."""
    return save_checkpoint({"kind": CLASSIFIER, "config": asdict(model.config), "test_accuracy": float(test_acc),
                            "state_dict": model.state_dict()}, path)


def load_classifier(path: str | os.PathLike, resolution: int) -> Classifier:
    """The classifier in `path` (eval mode); a damaged, foreign or other-resolution file: one-line CheckpointError."""
    fix = "fix: delete it (`pagoda eval --accuracy` trains and caches a new one)"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        raise CheckpointError(f"{path} is damaged or not a checkpoint; {fix}") from None
    if checkpoint_kind(ckpt) != CLASSIFIER:
        raise CheckpointError(f"{path} is not a pagoda classifier (kind {checkpoint_kind(ckpt)!r}); {fix}")
    try:
        model = Classifier(ClassifierConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unusable classifier ({str(e).strip().splitlines()[0]}); {fix}") from None
    if model.config.resolution != resolution:
        raise CheckpointError(f"{path} classifies {model.config.resolution}px images, not {resolution}px; {fix}")
    return model.eval()


def classifier_for(folder: str | os.PathLike, resolution: int, progress: ProgressFn | None = None) -> Classifier:
    """The cached classifier folder/fmnist-R.pt, trained (default config) and cached first if missing."""
    path = Path(folder) / classifier_file(resolution)
    if path.is_file():
        return load_classifier(path, resolution)
    model = train_classifier(classifier_config(resolution), progress=progress)
    save_classifier(model, path, split_accuracy(model))
    return model
