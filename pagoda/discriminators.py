"""PaGoDA's discriminators: a projected one over frozen EfficientNet-Lite0 features (the official family) and a
multi-scale one trained from scratch. Both return a list of per-head logit tensors; the hinge losses
(pagoda/losses.py) average each head and then the heads, as the official code does.

    D = make_discriminator("projected", resolution=32, channels=1, num_classes=10, width=64)
    heads = D(x, y)                                  # [(B, ...), ...]: one tensor of logits per head

Projected (Sauer et al. 2021, Projected GANs Converge Faster; sony/pagoda `pg_modules`): images in [−1, 1]
(DiffAugment applied by the trainer at their own resolution) → grey replicated to RGB, Lite0 normalisation,
bilinear resize to `input_size` → the frozen feature network: Lite0's 4 maps (strides 4-32), cross-channel
mixing (CCM: fixed random 1×1 convs to w, 2w, 4w, 8w channels) and cross-scale mixing (CSM: top-down, add the
deeper map, bilinear ×2, fixed random 1×1 conv) → 4 trainable heads, one per scale: spectral-normed 4×4
stride-2 convs + LeakyReLU(0.2) down to ≤ 8 px, a 4×4 conv to a 64-d map, projected on the class embedding
(<h, e(y)>/√64, Miyato & Koyama 2018). A text D (`text_dim`) projects on a linear map of the caption's pooled text
embedding instead, e(y) = W·pooled(y) (y a pagoda.text.TextEmbedding). Official heads use BatchNorm; ours leave it
out so that a global batch gives the same update however it is split over ranks and accumulation steps.
"""
from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.backbone import EfficientNetLite0
from pagoda.grow import DISCRIMINATORS
from pagoda.io import load_checkpoint
from pagoda.losses import LossConfigError, pyramid
from pagoda.text import TextEmbedding

CMAP_DIM = 64  # width of the class-projection space (official `cmap_dim`)


def _sn(module: nn.Module, on: bool = True) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if on else module


def check_labels(labels: torch.Tensor | TextEmbedding | None, num_classes: int | None, batch: int,
                 text_dim: int | None = None) -> torch.Tensor | None:
    """What the projection embeds: class labels (B,), or a text D's pooled text embedding (B, text_dim); a one-line
    error for a condition this discriminator cannot take."""
    if labels is None:
        return None
    if isinstance(labels, TextEmbedding):
        if not text_dim or labels.pooled.shape != (batch, text_dim):
            raise LossConfigError(f"text given to a discriminator without text_dim {labels.pooled.shape[-1]}: build it "
                                  f"with text_dim=the encoder's width")
        return labels.pooled.float()
    if not num_classes:
        raise LossConfigError("labels given to an unconditional discriminator: build it with num_classes=N")
    if labels.shape != (batch,) or labels.dtype != torch.long or labels.min() < 0 or labels.max() >= num_classes:
        raise LossConfigError(f"labels must be a LongTensor of shape ({batch},) with values in [0, {num_classes})")
    return labels


def _embedding(num_classes: int | None, text_dim: int | None, dim: int) -> nn.Module | None:
    """e(y): a class embedding, a linear map of the pooled text, or None (unconditional)."""
    return nn.Embedding(num_classes, dim) if num_classes else nn.Linear(text_dim, dim) if text_dim else None


# ---------------------------------------------------------------------------------------------------
# Projected discriminator over frozen EfficientNet-Lite0 features.


class FeatureProjector(nn.Module):
    """Lite0's 4 maps → CCM → CSM (Projected GAN `F_RandomProj`, proj_type 2, expand): frozen, randomly mixed."""

    def __init__(self, width: int = 64, input_size: int = 64, pretrained: bool = True):
        super().__init__()
        self.input_size = input_size
        self.backbone = EfficientNetLite0("default" if pretrained else None).fold_batchnorm()
        ccm = [width, 2 * width, 4 * width, 8 * width]  # cross-channel mixing widths
        self.ccm = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(EfficientNetLite0.FEATURE_CHANNELS, ccm))
        self.channels = [width, width, 2 * width, 4 * width]  # CSM outputs, finest first (expand halves)
        self.csm = nn.ModuleList(nn.Conv2d(w, c, 1) for w, c in zip(ccm, self.channels))
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureProjector:
        return super().train(False)  # frozen: fixed random projections, backbone in eval

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images in [−1, 1] → 4 maps (finest first) at input_size / 2, / 4, / 8, / 16."""
        x = EfficientNetLite0.normalize(x)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        c = [m(f) for m, f in zip(self.ccm, self.backbone.features(x))]
        out, deeper = [], None
        for level in (3, 2, 1, 0):  # CSM, top-down: add the deeper (upsampled) map, ×2 bilinear, 1×1 conv
            h = c[level] if deeper is None else c[level] + deeper
            deeper = self.csm[level](F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True))
            out.insert(0, deeper)
        return out


class ProjectedHead(nn.Module):
    """One scale's head: SN 4×4 stride-2 convs + LeakyReLU down to ≤ 8 px, a 4×4 conv to CMAP_DIM, class projection."""

    def __init__(self, channels: int, size: int, num_classes: int | None, max_channels: int, text_dim: int | None = None):
        super().__init__()
        layers, c = [], channels
        while size > 8:
            layers += [_sn(nn.Conv2d(c, min(2 * c, max_channels), 4, 2, 1)), nn.LeakyReLU(0.2)]
            c, size = min(2 * c, max_channels), size // 2
        self.down = nn.Sequential(*layers)
        self.cls = _sn(nn.Conv2d(c, CMAP_DIM if num_classes or text_dim else 1, min(4, size), 1, 0, bias=False))
        self.embed = _embedding(num_classes, text_dim, CMAP_DIM)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.cls(self.down(h))
        if self.embed is None:
            return out.flatten(1)
        e = self.embed(labels)[:, :, None, None]  # (B, CMAP_DIM, 1, 1)
        return ((out * e).sum(1) / math.sqrt(CMAP_DIM)).flatten(1)  # <h, e(y)> / √cmap per position


class ProjectedDiscriminator(nn.Module):
    """Projected GAN discriminator: frozen Lite0 + random CCM/CSM features, one trainable head per scale."""

    def __init__(self, resolution: int, channels: int, num_classes: int | None, width: int = 64,
                 input_size: int = 64, pretrained: bool = True, text_dim: int | None = None):
        super().__init__()
        if input_size < 32 or input_size % 32:
            raise LossConfigError(f"projected discriminator input size {input_size}: use a multiple of 32 (64, 128, 224)")
        self.resolution, self.in_channels, self.num_classes, self.text_dim = resolution, channels, num_classes, text_dim
        self.features = FeatureProjector(width, input_size, pretrained)
        sizes = [input_size // 2 ** (k + 1) for k in range(4)]
        self.heads = nn.ModuleList(ProjectedHead(c, s, num_classes, 8 * width, text_dim)
                                   for c, s in zip(self.features.channels, sizes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise LossConfigError(f"discriminator expects (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        y = check_labels(labels, self.num_classes, x.shape[0], self.text_dim)
        return [head(f, y) for head, f in zip(self.heads, self.features(x))]

    def grow(self) -> ProjectedDiscriminator:
        """The same discriminator for twice the resolution: the features resize any input, so every weight is kept."""
        new = copy.deepcopy(self)
        new.resolution = 2 * self.resolution
        return new


# ---------------------------------------------------------------------------------------------------
# Multi-scale discriminator from scratch.


class _Head(nn.Module):
    """Conv trunk -> sum-pooled h -> logit = psi(h) + <embed(y), h> (projection D, Miyato & Koyama 2018)."""

    def __init__(self, in_channels: int, resolution: int, num_classes: int | None, base_channels: int,
                 max_channels: int, spectral_norm: bool, text_dim: int | None = None):
        super().__init__()
        width = lambda k: min(max_channels, base_channels * 2 ** k)  # noqa: E731
        conv = lambda *a, **k: _sn(nn.Conv2d(*a, **k), spectral_norm)  # noqa: E731
        layers: list[nn.Module] = [conv(in_channels, width(0), 3, padding=1), nn.LeakyReLU(0.2)]
        k, res = 0, resolution
        while res > 4:                                                # 3x3 stride-2 convs down to 4 px
            layers += [conv(width(k), width(k + 1), 3, 2, 1), nn.LeakyReLU(0.2)]
            k, res = k + 1, res // 2
        layers += [conv(width(k), width(k), 3, padding=1), nn.LeakyReLU(0.2)]
        self.trunk = nn.Sequential(*layers)
        self.psi = _sn(nn.Linear(width(k), 1), spectral_norm)
        embed = _embedding(num_classes, text_dim, width(k))
        self.embed = None if embed is None else _sn(embed, spectral_norm)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.trunk(x).sum(dim=(2, 3))
        logit = self.psi(h).squeeze(1)
        if labels is not None and self.embed is not None:
            logit = logit + (self.embed(labels) * h).sum(1)
        return logit


class Discriminator(nn.Module):
    """From-scratch multi-scale projection discriminator: head_s(x downsampled to r_s), one logit per scale s.

    Scales r_s = resolution, /2, /4, ... down to 8 px (or `scales` of them), each with its own head
    (spectral-normed convs, 3x3 stride-2 down to 4 px, sum pooling, class projection) whose logit is scaled by
    a learnable gain. grow() gives the discriminator for 2R: every old head judges the same downsampled input as
    before (same logits), and a new full-resolution head starts with gain 0. Spectral norm is on by default:
    PaGoDA uses no R1 and no gradient clipping, so a from-scratch hinge D needs SN for its Lipschitz control.
    """

    def __init__(self, resolution: int, in_channels: int, num_classes: int | None = None, base_channels: int = 64,
                 max_channels: int = 256, scales: int | None = None, spectral_norm: bool = True, text_dim: int | None = None):
        super().__init__()
        if resolution < 4:
            raise LossConfigError(f"discriminator resolution must be >= 4 px, got {resolution}")
        auto = len(pyramid(torch.empty(1, 1, resolution, resolution)))
        scales = auto if scales is None else scales
        if not 1 <= scales or resolution >> (scales - 1) < 4:
            raise LossConfigError(f"{scales} scales at {resolution} px would go below 4 px: use scales <= {auto}")
        self.resolution, self.in_channels, self.num_classes = resolution, in_channels, num_classes
        self.cfg = dict(base_channels=base_channels, max_channels=max_channels, spectral_norm=spectral_norm,
                        text_dim=text_dim)
        self.resolutions = [resolution >> s for s in range(scales)]
        self.heads = nn.ModuleDict({str(r): _Head(in_channels, r, num_classes, **self.cfg) for r in self.resolutions})
        self.gain = nn.Parameter(torch.ones(scales))                  # per-scale logit gain, [0] = full res

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.resolution, self.resolution):
            r = self.resolution
            raise LossConfigError(f"discriminator expects (B, {self.in_channels}, {r}, {r}) images, got "
                                  f"{tuple(x.shape)}: grow() or rebuild it for this resolution")
        y = check_labels(labels, self.num_classes, x.shape[0], self.cfg["text_dim"])
        levels = pyramid(x, levels=len(self.resolutions))
        return [(self.gain[s] * self.heads[str(r)](xs, y))[:, None]  # (B, 1) per scale
                for s, (r, xs) in enumerate(zip(self.resolutions, levels))]

    def grow(self) -> Discriminator:
        """A discriminator for 2x resolution: old heads copied for the downsampled scales, new head gated at 0."""
        new = Discriminator(2 * self.resolution, self.in_channels, self.num_classes, scales=len(self.resolutions) + 1,
                            **self.cfg).to(self.gain.device)
        for r, head in self.heads.items():
            new.heads[r] = copy.deepcopy(head)
        with torch.no_grad():
            new.gain.copy_(torch.cat([torch.zeros_like(self.gain[:1]), self.gain]))
        return new


def make_discriminator(kind: str, resolution: int, channels: int, num_classes: int | None, width: int = 64,
                       input_size: int = 64, pretrained: bool = True, text_dim: int | None = None) -> nn.Module:
    """"projected" (frozen Lite0 features; `width` = CCM base width, `input_size` = backbone input) or
    "multiscale" (from scratch; `width` = first layer, doubling per level, capped at 4x); `text_dim`: conditioned
    on the pooled text embedding of that width (a text G's)."""
    if kind == "projected":
        return ProjectedDiscriminator(resolution, channels, num_classes, width, input_size, pretrained, text_dim)
    if kind == "multiscale":
        return Discriminator(resolution, channels, num_classes, base_channels=width, max_channels=4 * width,
                             text_dim=text_dim)
    raise LossConfigError(f"unknown discriminator {kind!r}: choose one of {', '.join(DISCRIMINATORS)}")


def build_discriminators(stage, channels: int, num_classes: int | None, pretrained: bool = True,
                         resolution: int | None = None, text_dim: int | None = None) -> tuple[nn.Module, nn.Module | None]:
    """(D, D_recon) of a grow.StageConfig (at `resolution`, default the stage's): the discriminator and the second one
    on reconstructions (official at 512, else None). The one builder of the stage and of the dry-run plan."""
    def make_D():
        return make_discriminator(stage.discriminator, resolution or stage.resolution, channels, num_classes,
                                  stage.d_channels, stage.d_input, pretrained, text_dim)
    D_recon = make_D() if stage.rec_disc_weight > 0 else None
    return make_D(), D_recon


def continued_discriminators(stage, channels: int, num_classes: int | None, prev_ckpt: str | os.PathLike,
                             text_dim: int | None = None) -> tuple[nn.Module, nn.Module | None]:
    """D continuity: the previous stage's final discriminator(s) (its checkpoint), grown to this stage."""
    Ds = build_discriminators(stage, channels, num_classes, resolution=stage.resolution // 2, text_dim=text_dim)
    states = load_checkpoint(prev_ckpt)["D"]
    for D, sd in zip([D for D in Ds if D is not None], states):
        D.load_state_dict(sd)
    return tuple(None if D is None else D.grow() for D in Ds)
