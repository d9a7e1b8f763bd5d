"""Classifiers of real images per resolution, one per task, and the accuracy metric of conditional samples.

A sample conditioned on y is "accurate" when the task's classifier puts it in class y. Tasks (`TASKS`):
  fmnist          the 10 Fashion-MNIST classes; `pagoda eval --accuracy` (trained with flips)
  emoji-subgroup  the ~100 CLDR subgroups of the emoji ("food-fruit"): text alignment, issue 21 §6a (no flips)
  emoji-tone      the 5 skin tones of single-tone emoji ("…: dark skin tone"): composition, issue 21 §7 (no flips)
One network per (task, resolution R) (images ADM-downsampled with `images.downsample`, as the stages see them):
3×3 conv-BN-ReLU layers, 2×2 max-pools and a linear layer on the flattened maps, trained on the train split with
AdamW + one-cycle, label smoothing 0.1, seeded, on CPU; a network trained with flips predicts from the mean of
the class probabilities of x and its mirror (test-time flip). It is cached as RUN/classifier/TASK-R.pt
(fmnist-8.pt, emoji-tone-64.pt; a weights_only-loadable dict) and reused when present. Measured: Fashion
docs/benchmarks.md §10; emoji bench/t2i_eval.py.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pagoda.data import EMOJI_TONES, EmojiDataset, FashionMNIST
from pagoda.io import CheckpointError, checkpoint_kind, load_checkpoint, save_checkpoint

CLASSIFIER = "pagoda.classifier"  # the "kind" of a classifier file
NUM_CLASSES = 10  # Fashion-MNIST's
TONE_SUFFIX = re.compile(r": (" + "|".join(map(re.escape, EMOJI_TONES)) + r") skin tone$")  # one tone, as named last
ProgressFn = Callable[[int, int], None]  # (done, total) training steps


def emoji_subgroups(resolution: int = 8) -> list[str]:
    """The emoji-subgroup classes: every captioned emoji's CLDR subgroup, sorted."""
    return sorted(set(EmojiDataset("all", resolution).subgroups))


def caption_tone(caption: str) -> int | None:
    """The index in EMOJI_TONES of a single-tone caption ("waving hand: dark skin tone" -> 4), else None."""
    m = TONE_SUFFIX.search(caption)
    return EMOJI_TONES.index(m.group(1)) if m else None


def _fmnist(split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = FashionMNIST(split, resolution=resolution)
    return data.images, data.labels


def _emoji_subgroup(split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    data, classes = EmojiDataset(split, resolution), emoji_subgroups(resolution)
    return data.batch(torch.arange(len(data)))[0], torch.tensor([classes.index(s) for s in data.subgroups])


def _emoji_tone(split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = EmojiDataset(split, resolution)
    keep = [(i, t) for i, c in enumerate(data.captions) if (t := caption_tone(c)) is not None]
    return data.batch(torch.tensor([i for i, _ in keep]))[0], torch.tensor([t for _, t in keep])


@dataclass(frozen=True)
class Task:
    """What a classifier classifies: its images (channels, background value) and labelled splits."""

    channels: int
    background: float  # the value shifted in by the translation augmentation
    labelled: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]  # (split, resolution) -> (images, labels)
    num_classes: Callable[[], int]


TASKS = {"fmnist": Task(1, -1.0, _fmnist, lambda: NUM_CLASSES),
         "emoji-subgroup": Task(3, 1.0, _emoji_subgroup, lambda: len(emoji_subgroups())),
         "emoji-tone": Task(3, 1.0, _emoji_tone, lambda: len(EMOJI_TONES))}


def task_of(name: str) -> Task:
    """The Task called `name`; an unknown name: one-line ValueError."""
    if name not in TASKS:
        raise ValueError(f"unknown classifier task {name!r}; fix: use one of {', '.join(TASKS)}")
    return TASKS[name]


def classifier_file(resolution: int, task: str = "fmnist") -> str:
    """File name of the cached classifier of `task` at `resolution`: fmnist-8.pt, emoji-subgroup-32.pt."""
    return f"{task}-{int(resolution)}.pt"


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
    images: int | None = None  # the first N training images (None: all of them)
    seed: int = 0
    task: str = "fmnist"  # a key of TASKS


# emoji (either task) at ≤ 8, ≤ 16, ≤ 32, else 64 px: (layers, epochs); 3,480 training images (1,328 toned)
EMOJI_DEFAULTS = {8: ("32,64p,128,128p", 30), 16: ("32p,64,64p,128p", 30), 32: ("32p,64p,128p,128p", 20),
                  64: ("16p,32p,64p,128p,128p", 15)}


def classifier_config(resolution: int, task: str = "fmnist", **override) -> ClassifierConfig:
    """The default configuration of `task` at `resolution` (≤ 8, ≤ 16, else the 32-px one), with `override` applied."""
    task_of(task)
    if task != "fmnist":  # emoji: colour, never mirrored (arrows, letters, flags, "left"/"right" in the names)
        layers, epochs = EMOJI_DEFAULTS[next((r for r in (8, 16, 32) if resolution <= r), 64)]
        cfg = ClassifierConfig(resolution, layers, epochs, shift=resolution // 16, task=task)
    elif resolution <= 8:
        cfg = ClassifierConfig(resolution, "64,64,128p,128,256p,256", epochs=12, flip=0.5)
    elif resolution <= 16:
        cfg = ClassifierConfig(resolution, "64,64p,128,128p,256", epochs=4, flip=0.5, shift=1)
    else:
        cfg = ClassifierConfig(resolution, "32p,64,64p,128,128p,256", epochs=2, flip=0.5, shift=2)
    return replace(cfg, **override)



class Classifier(nn.Module):
    """C×R×R images in [−1, 1] -> the logits of the task's classes."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        task = task_of(config.task)
        self.config, layers, c, size = config, [], task.channels, config.resolution
        for token in config.layers.split(","):
            width = int(token.rstrip("p"))
            layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if token.endswith("p"):
                layers, size = layers + [nn.MaxPool2d(2)], size // 2
            c = width
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * size * size, task.num_classes()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities; a network trained with flips averages them over x and its mirror (test-time flip)."""
        p = self(x).softmax(1)
        return (p + self(x.flip(-1)).softmax(1)) / 2 if self.config.flip > 0 else p

    @torch.no_grad()
    def correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image: is it classified as its label? (bool, on the CPU; batches of 1000, eval mode)."""
        R, C = self.config.resolution, task_of(self.config.task).channels
        if images.shape[1:] != (C, R, R):
            raise ValueError(f"this classifier takes {C}×{R}×{R} images, got {tuple(images.shape[1:])}; "
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
    """Random h-flips per image and one random translation per batch (the task's background shifted in)."""
    flip = torch.rand(len(x), generator=g) < cfg.flip
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if cfg.shift:
        s, R = cfg.shift, x.shape[-1]
        dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
        x = F.pad(x, (s, s, s, s), value=task_of(cfg.task).background)[..., dy:dy + R, dx:dx + R]
    return x


def train_classifier(cfg: ClassifierConfig, progress: ProgressFn | None = None) -> Classifier:
    """Train on the task's train split at cfg.resolution (seeded, CPU); returned in eval mode."""
    x, y = task_of(cfg.task).labelled("train", cfg.resolution)
    x, y = x[:cfg.images], y[:cfg.images]
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
    """Accuracy on the first n (default all) images of a split of the model's task at the model's resolution."""
    x, y = task_of(model.config.task).labelled(split, model.config.resolution)
    return model.accuracy(x[:n], y[:n])


def save_classifier(model: Classifier, path: str | os.PathLike, test_acc: float) -> Path:
    """Atomically write {kind, config, state_dict, test_accuracy} (weights_only-loadable)."""
    return save_checkpoint({"kind": CLASSIFIER, "config": asdict(model.config), "test_accuracy": float(test_acc),
                            "state_dict": model.state_dict()}, path)


def load_classifier(path: str | os.PathLike, resolution: int, task: str = "fmnist") -> Classifier:
    """The classifier in `path` (eval mode); a damaged, foreign, other-task or other-resolution file: one-line
    CheckpointError."""
    fix = "fix: delete it (`pagoda eval --accuracy` or bench/t2i_eval.py trains and caches a new one)"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        raise CheckpointError(f"{path} is damaged or not a checkpoint; {fix}") from None
    if checkpoint_kind(ckpt) != CLASSIFIER:
        raise CheckpointError(f"{path} is not a pagoda classifier (kind {checkpoint_kind(ckpt)!r}); {fix}")
    try:
        config = ClassifierConfig(**ckpt["config"])
        if config.task == task:
            model = Classifier(config)
            model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unusable classifier ({str(e).strip().splitlines()[0]}); {fix}") from None
    if config.task != task:
        raise CheckpointError(f"{path} classifies {config.task!r}, not {task!r}; {fix}")
    if model.config.resolution != resolution:
        raise CheckpointError(f"{path} classifies {model.config.resolution}px images, not {resolution}px; {fix}")
    return model.eval()


def classifier_for(folder: str | os.PathLike, resolution: int, progress: ProgressFn | None = None,
                   task: str = "fmnist") -> Classifier:
    """The cached classifier folder/TASK-R.pt, trained (default config) and cached first if missing."""
    path = Path(folder) / classifier_file(resolution, task)
    if path.is_file():
        return load_classifier(path, resolution, task)
    model = train_classifier(classifier_config(resolution, task=task), progress=progress)
    save_classifier(model, path, split_accuracy(model))
    return model
