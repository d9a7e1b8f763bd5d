"""PaGoDA's stage-2/3 losses: reconstruction distances, DiffAugment, the hinge losses and the held-out margin,
the adaptive (VQGAN) weight, and the distillation teacher-sample cache (the discriminators: pagoda/discriminators.py).

Everything here takes tensors / modules / parameters; nothing knows about the decoder or the solvers.
How one stage step uses them (pagoda/stage.py, per micro-batch; z from the latent cache, z' fresh; D is a
discriminators.make_discriminator, its heads' logits a list):

    d = make_distance("lite0", channels=1, input_size=32)
    rec = d(G(z, y), x).mean()                                       # L_rec = d(G(E(x_lo), y), x_hi)
    adv = g_hinge_loss(D(diff_augment(G(z2, y2), policy, gens), y2))  # L_adv = −mean_h E D_h(G(z'))
    loss = rec + lam * adaptive_weight(rec, adv, G.last_layer_weight) * adv
    L_D = d_hinge_loss(D(diff_augment(x_real, policy, gens), y), D(diff_augment(G(z3, y3).detach(), policy, gens), y3))
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pagoda.backbone import EfficientNetLite0
from pagoda.grow import DEFAULT_DISTANCE
from pagoda.io import load_checkpoint, save_checkpoint

PSEUDO_HUBER_C = 0.00054  # iCT (Song & Dhariwal 2023): c = 0.00054 * sqrt(dim) for data in [-1, 1]


class LossConfigError(ValueError):
    """A loss / discriminator that cannot be built: the message names the problem and the fix."""


def _check_pair(fake: torch.Tensor, real: torch.Tensor) -> None:
    if fake.shape != real.shape or fake.ndim != 4:
        raise LossConfigError(f"distance needs two (B, C, H, W) tensors of equal shape, got {tuple(fake.shape)} "
                              f"and {tuple(real.shape)}: resize the real batch to the generator's resolution")
    if min(fake.shape[-2:]) < 4:
        raise LossConfigError(f"distance needs images of at least 4 px, got {tuple(fake.shape[-2:])}")


def pyramid(x: torch.Tensor, min_size: int = 8, levels: int | None = None) -> list[torch.Tensor]:
    """[x, x/2, x/4, ...] by 2x2 average pooling, down to min_size px (or exactly `levels` levels)."""
    out = [x]
    while (len(out) < levels) if levels is not None else (min(out[-1].shape[-2:]) // 2 >= min_size):
        out.append(F.avg_pool2d(out[-1], 2))
    return out


def pseudo_huber(fake: torch.Tensor, real: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim) (iCT, Song & Dhariwal 2023)."""
    dim = fake[0].numel()
    c = PSEUDO_HUBER_C * math.sqrt(dim) if c is None else c
    return ((fake - real).square().flatten(1).sum(1) + c * c).sqrt() - c


def _rms_huber(diff_sq_mean: torch.Tensor) -> torch.Tensor:
    """Pseudo-Huber divided by sqrt(dim): sqrt(mean (a-b)^2 + c0^2) - c0, resolution independent."""
    return (diff_sq_mean + PSEUDO_HUBER_C ** 2).sqrt() - PSEUDO_HUBER_C


class L2Distance(nn.Module):
    """Mean squared error per sample."""

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        _check_pair(fake, real)
        return (fake - real).square().flatten(1).mean(1)


class PseudoHuberDistance(nn.Module):
    """Pseudo-Huber per sample, as in improved consistency training."""

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        _check_pair(fake, real)
        return pseudo_huber(fake, real)


class MultiscaleDistance(nn.Module):
    """Pseudo-Huber of the image pyramid (full, /2, /4, ... down to 8 px): sqrt(mean_l MSE_l + c0^2) - c0.

    The per-level squared errors are averaged first and one pseudo-Huber is taken per sample (with the
    iCT constant per pixel, c0 = 0.00054, i.e. pseudo-Huber / sqrt(dim)). So every level weighs the same,
    the value does not grow with resolution (λ and learning rates stay comparable across growth stages),
    and a level that is already right (e.g. the coarse levels after growing) adds little gradient.
    Averaging one pseudo-Huber per level instead lets solved levels dominate the normalised gradient:
    measured 1.6 dB worse on the proxy described at pagoda.grow.DEFAULT_DISTANCE.
    """

    def __init__(self, min_size: int = 8):
        super().__init__()
        self.min_size = min_size

    def level_mse(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Per-sample mean over pyramid levels of the per-level mean squared error."""
        levels = pyramid(torch.cat([fake, real]), self.min_size)
        return torch.stack([(a - b).square().flatten(1).mean(1) for a, b in (lv.chunk(2) for lv in levels)]).mean(0)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        _check_pair(fake, real)
        return _rms_huber(self.level_mse(fake, real))


class RandomFeatureDistance(nn.Module):
    """Pseudo-Huber of (pyramid pixel MSE + feature_weight * MSE of a frozen random conv net's activations).

    Why random features work: a conv net with fixed random filters is a bank of multi-scale
    edge/texture detectors (random-weight networks already support texture synthesis and image
    reconstruction: Ustyuzhaninov et al. 2017, He et al. 2016). Matching rectified filter responses
    penalises blurred or missing edges far more than a pixel norm does. Each filter is made zero-mean
    (no response on flat regions; colour / brightness are left to the pixel term) and unit-norm (every
    channel normalised to the same energy, so no channel dominates). Between depths we average-pool by
    2, so depth k sees structures of ~3*2^k px. Weights come from a fixed seed: deterministic, no download.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128), seed: int = 0,
                 feature_weight: float = 1.0, min_size: int = 8):
        super().__init__()
        self.in_channels, self.feature_weight = in_channels, feature_weight
        self.pixel = MultiscaleDistance(min_size)
        g = torch.Generator().manual_seed(seed)
        for i, (cin, cout) in enumerate(zip((in_channels, *widths[:-1]), widths)):
            w = torch.randn(cout, cin, 3, 3, generator=g)
            w = w - w.mean(dim=(1, 2, 3), keepdim=True)               # zero DC response
            w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)        # unit energy per channel
            self.register_buffer(f"w{i}", w, persistent=False)
        self.depth = len(widths)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Rectified responses of the random filter bank at each depth."""
        if x.shape[1] != self.in_channels:
            if x.shape[1] != 1:
                raise LossConfigError(f"features distance built for {self.in_channels} channels got {x.shape[1]}: "
                                      f"make_distance('features', channels={x.shape[1]})")
            x = x.expand(-1, self.in_channels, -1, -1)               # grey image as RGB
        feats = []
        for i in range(self.depth):
            if i > 0 and min(x.shape[-2:]) >= 2:
                x = F.avg_pool2d(x, 2)
            x = F.leaky_relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), getattr(self, f"w{i}")), 0.2)
            feats.append(x)
        return feats

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        _check_pair(fake, real)
        feats = self.features(torch.cat([fake, real]))
        feat_mse = torch.stack([(a - b).square().flatten(1).mean(1) for a, b in (f.chunk(2) for f in feats)]).mean(0)
        return _rms_huber(self.pixel.level_mse(fake, real) + self.feature_weight * feat_mse)


_LPIPS_WEIGHTS = {"vgg": ("vgg16", "vgg16-397923af.pth"), "alex": ("alexnet", "alexnet-owt-7be5be79.pth")}


def _home_short(path: Path) -> str:
    home = Path.home()
    return "~/" + str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


class LPIPSDistance(nn.Module):
    """LPIPS (Zhang et al. 2018); only when the `lpips` package and its backbone weights are local."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in _LPIPS_WEIGHTS:
            raise LossConfigError(f"LPIPS net must be one of {sorted(_LPIPS_WEIGHTS)}, got {net!r}")
        arch, fname = _LPIPS_WEIGHTS[net]
        ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
        if importlib.util.find_spec("lpips") is None or not (ckpt_dir / fname).is_file():
            raise LossConfigError(f"LPIPS needs pretrained weights that cannot be downloaded here: pip install lpips "
                                  f"and place {arch} weights in {_home_short(ckpt_dir)} (or use --distance multiscale)")
        import lpips  # local weights exist, so torchvision loads them from the hub cache without downloading

        self.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        _check_pair(fake, real)
        x = torch.cat([fake, real])
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if min(x.shape[-2:]) < 64:                                   # VGG/AlexNet pool 4-5 times
            x = F.interpolate(x, scale_factor=64 / min(x.shape[-2:]), mode="bilinear", align_corners=False)
        a, b = x.chunk(2)
        return self.model(a, b).flatten()


class Lite0Distance(nn.Module):
    """Perceptual distance on frozen ImageNet EfficientNet-Lite0 features (sony/pagoda's `cnn_vit` distance, Lite0 half):
    both images resized (bilinear) to `input_size`, the 4 feature maps f_l normalised to unit length over channels at
    every position, d = Σ_l mean_{h,w} ‖f̂_l(fake) − f̂_l(real)‖². Official: also DeiT features (weights not
    obtainable offline) and DiffAugment applied identically to both inputs (ours: none, so d stays deterministic)."""

    def __init__(self, input_size: int = 64, pretrained: bool = True):
        super().__init__()
        self.input_size, self.net = input_size, EfficientNetLite0("default" if pretrained else None).fold_batchnorm()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = EfficientNetLite0.normalize(x)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return [f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in self.net.features(x)]

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        _check_pair(fake, real)
        with torch.no_grad():
            target = self.features(real)
        return sum((a - b).square().sum(1).flatten(1).mean(1) for a, b in zip(self.features(fake), target))


class SumDistance(nn.Module):
    """d = Σ_i d_i, named 'a+b' (e.g. 'lite0+multiscale': Lite0 features for texture, the pixel pyramid for where
    things are; features normalised per position alone leave the low frequencies loose)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return sum(d(fake, real) for d in self.parts)


class ScaledDistance(nn.Module):
    """d = k · d_part, named 'k*part' (e.g. 'lite0+4*multiscale')."""

    def __init__(self, k: float, part: nn.Module):
        super().__init__()
        self.k, self.part = k, part

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return self.k * self.part(fake, real)


DISTANCES = {"l2": L2Distance, "pseudo_huber": PseudoHuberDistance, "multiscale": MultiscaleDistance,
              "features": RandomFeatureDistance, "lite0": Lite0Distance, "lpips": LPIPSDistance}


def make_distance(name: str = DEFAULT_DISTANCE, channels: int = 3, input_size: int = 64,
                  pretrained: bool = True) -> nn.Module:
    """Reconstruction distance by name for images of `channels` channels: a module d(fake, real) -> (B,); 'a+b' sums
    two, 'k*a' scales one. `input_size` / `pretrained`: the Lite0 distance's backbone input and weights (False: random, e.g. on meta)."""
    if "+" in name:
        return SumDistance([make_distance(part, channels, input_size, pretrained) for part in name.split("+")])
    if "*" in name:  # 'k*name': the distance times k
        k, _, part = name.partition("*")
        try:
            k = float(k)
        except ValueError:
            raise LossConfigError(f"bad distance weight in {name!r}: write k*name with a number k, e.g. 2*multiscale") from None
        return ScaledDistance(k, make_distance(part, channels, input_size, pretrained))
    if name not in DISTANCES:
        raise LossConfigError(f"unknown distance {name!r}: choose one of {', '.join(DISTANCES)}")
    if name == "features":
        return RandomFeatureDistance(in_channels=channels)
    return Lite0Distance(input_size, pretrained) if name == "lite0" else DISTANCES[name]()


# ---------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020): per-sample random colour, translation and cutout, differentiable.


Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per sample


def _draw(fn, shape: tuple[int, ...], x: torch.Tensor, generator: Generators, **kw) -> torch.Tensor:
    """fn(shape) from one generator, or sample i's row from generator i (as if each sample were augmented alone)."""
    if isinstance(generator, list):
        return torch.cat([fn((1, *shape[1:]), generator=g, device=g.device, **kw) for g in generator]).to(x.device)
    dev = generator.device if generator is not None else x.device
    return fn(shape, generator=generator, device=dev, **kw).to(x.device)


def _rand(shape: tuple[int, ...], x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return _draw(torch.rand, shape, x, generator, dtype=x.dtype)


def _randint(low: int, high: int, shape: tuple[int, ...], x: torch.Tensor, generator: Generators):
    return _draw(lambda sh, **kw: torch.randint(low, high, sh, **kw), shape, x, generator)


def _color(x: torch.Tensor, g: Generators) -> torch.Tensor:
    B = x.shape[0]
    x = x + (_rand((B, 1, 1, 1), x, g) - 0.5)                                       # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((B, 1, 1, 1), x, g) * 2) + mean                         # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((B, 1, 1, 1), x, g) + 0.5) + mean                    # contrast


def _translation(x: torch.Tensor, g: Generators, ratio: float = 0.125) -> torch.Tensor:
    B, _, H, W = x.shape
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    ty, tx = _randint(-sh, sh + 1, (B, 1, 1), x, g), _randint(-sw, sw + 1, (B, 1, 1), x, g)
    gb, gy, gx = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(H, device=x.device),
                                torch.arange(W, device=x.device), indexing="ij")
    gy, gx = (gy + ty + 1).clamp(0, H + 1), (gx + tx + 1).clamp(0, W + 1)            # zero-padded shift
    x_pad = F.pad(x, (1, 1, 1, 1))
    return x_pad.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, g: Generators, ratio: float = 0.2) -> torch.Tensor:
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    oy, ox = _randint(0, H + (1 - ch % 2), (B, 1, 1), x, g), _randint(0, W + (1 - cw % 2), (B, 1, 1), x, g)
    gb, gy, gx = torch.meshgrid(torch.arange(B, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gy, gx = (gy + oy - ch // 2).clamp(0, H - 1), (gx + ox - cw // 2).clamp(0, W - 1)
    mask = torch.ones(B, H, W, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    return x * mask.unsqueeze(1)


_AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout", generator: Generators = None) -> torch.Tensor:
    """DiffAugment: each sample gets its own random colour/translation(1/8)/cutout(0.2) draw (from its own
    generator when `generator` is a list, one per sample)."""
    for name in filter(None, (p.strip() for p in policy.split(","))):
        if name not in _AUGMENTS:
            raise LossConfigError(f"unknown DiffAugment op {name!r}: use a comma list of {', '.join(_AUGMENTS)}")
        x = _AUGMENTS[name](x, generator)
    return x.contiguous()


# ---------------------------------------------------------------------------------------------------
# Adversarial and generator objectives.


Logits = torch.Tensor | list[torch.Tensor]  # a discriminator's output: one tensor, or one per head


def _heads(logits: Logits) -> list[torch.Tensor]:
    return [logits] if torch.is_tensor(logits) else list(logits)


def d_hinge_loss(real_logits: Logits, fake_logits: Logits) -> torch.Tensor:
    """L_D = E relu(1 - D(x)) + E relu(1 + D(G(z'))) (PaGoDA "Losses", hinge GAN), per head, averaged over heads
    (sony/pagoda: the mean over every head's logits)."""
    return torch.stack([F.relu(1 - r).mean() + F.relu(1 + f).mean()
                        for r, f in zip(_heads(real_logits), _heads(fake_logits), strict=True)]).mean()


def g_hinge_loss(fake_logits: Logits) -> torch.Tensor:
    """L_adv = -E D(G(z')) for fresh z' ~ N(0, sigma_max^2 I), averaged over heads."""
    return -torch.stack([f.mean() for f in _heads(fake_logits)]).mean()


def margin(real_logits: Logits, fake_logits: Logits) -> float:
    """E D(x) − E D(G(z')), averaged over heads: > 0 when D tells them apart (logged on a held-out batch)."""
    return float(torch.stack([r.mean() - f.mean() for r, f in zip(_heads(real_logits), _heads(fake_logits))]).mean())


def _grad(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """∇_W loss (zeros when the loss does not depend on W), detached, float32."""
    if not loss.requires_grad:
        return torch.zeros_like(weight, dtype=torch.float32)
    (g,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
    return torch.zeros_like(weight, dtype=torch.float32) if g is None else g.detach().float()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                    min: float = 0.01, max: float = 10.0, eps: float = 1e-4,  # noqa: A002
                    reduce: Callable[[list[torch.Tensor]], None] | None = None) -> torch.Tensor:
    """w = ||grad_W L_rec|| / (||grad_W L_adv|| + eps) clipped to [min, max] (VQGAN; PaGoDA "Losses"), detached.

    `reduce` (e.g. an all-reduce mean over ranks) is applied in place to [grad_W L_rec, grad_W L_adv] before the
    norms, so that w is the global batch's."""
    if not last_layer_weight.requires_grad:
        raise LossConfigError("adaptive_weight needs the generator's last conv weight to require grad: "
                              "unfreeze the output head")
    grads = [_grad(rec_loss, last_layer_weight), _grad(adv_loss, last_layer_weight)]
    if reduce is not None:
        reduce(grads)
    # a missing / zero adversarial gradient gives ||g_rec|| / eps, clipped to max (or min if g_rec is zero too)
    w = grads[0].norm() / (grads[1].norm() + eps)
    return w.clamp(min, max).detach()


@dataclass
class GeneratorLoss:
    """The terms of one generator step (paper eq. 5 and §3.3), each a scalar tensor; `w` is detached."""

    rec: torch.Tensor  # L_rec = d(G(E(x_lo), y), x_hi)
    dstl: torch.Tensor  # L_dstl = d(↓G(z, y, ω), ODE_teacher,ω(z, y)) (0 when β = 0)
    adv: torch.Tensor  # L_adv = −E D(G(z', y', ω')) (0 before the adversarial term starts)
    anchor: torch.Tensor  # a·L_anchor = a·d(↓G(z'), G_R(z')) in a growth stage (0 when off)
    w: torch.Tensor  # the adaptive weight (0 when L_adv is off)
    reconstruction: torch.Tensor  # L_rec + β·L_dstl: the part that needs no discriminator
    adversarial: torch.Tensor  # λ·w·L_adv + a·L_anchor

    @property
    def total(self) -> torch.Tensor:
        """L_G = L_rec + β·L_dstl + λ·w·L_adv + a·L_anchor."""
        return self.reconstruction + self.adversarial


def generator_loss(rec: torch.Tensor, dstl: torch.Tensor | None = None, adv: torch.Tensor | None = None,
                   anchor: torch.Tensor | None = None, *, beta: float = 0.0, lam: float = 0.0,
                   last_layer_weight: torch.Tensor | None = None, w_max: float = 10.0,
                   reduce: Callable[[list[torch.Tensor]], None] | None = None) -> GeneratorLoss:
    """L_G = L_rec + β·L_dstl + λ·w·L_adv + a·L_anchor (PaGoDA eq. 5, §3.3), w = adaptive_weight(L_rec + β·L_dstl,
    L_adv) on G's last layer; `adv` None: the adversarial term is off (w = 0). `anchor` comes weighted."""
    zero = torch.zeros((), device=rec.device)
    reconstruction = rec if dstl is None else rec + beta * dstl
    if adv is None:
        return GeneratorLoss(rec, zero if dstl is None else dstl, zero, zero, zero, reconstruction, zero)
    anchor = zero if anchor is None else anchor
    w = adaptive_weight(reconstruction, adv, last_layer_weight, max=w_max, reduce=reduce)
    return GeneratorLoss(rec, zero if dstl is None else dstl, adv, anchor, w, reconstruction, lam * w * adv + anchor)


# ---------------------------------------------------------------------------------------------------
# Distillation: L_dstl = d(G(z), ODE_teacher(z)), teacher samples for a fixed z pool computed once.


class TeacherSampleCache:
    """A fixed pool of z ~ N(0, sigma_max^2 I) (and labels, and guidance scales ω ~ U[1, guidance_max] when
    guidance_max > 1), keyed by index, with teacher samples x0 = sample_fn(z, labels, ω) computed at most once per
    index, in memory and (optionally) on disk.

    The pool is drawn from `seed`, so the file is checked against (size, shape, classes, sigma_max, seed, ω_max).
    With `path`, the cache is saved atomically (pagoda.io.save_checkpoint) after every call that computed
    new samples (the teacher ODE solve costs far more than the write); a full cache is never rewritten.
    """

    def __init__(self, sample_fn: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
                 pool_size: int, shape: tuple[int, int, int], num_classes: int | None, sigma_max: float,
                 seed: int = 0, path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 guidance_max: float = 1.0):
        self.sample_fn, self.device = sample_fn, torch.device(device)
        self.path = Path(path) if path is not None else None
        self.meta = {"pool_size": pool_size, "shape": list(shape), "num_classes": num_classes,
                     "sigma_max": float(sigma_max), "seed": seed, "guidance_max": float(guidance_max)}
        if self.path is not None and self.path.is_file():
            ckpt = load_checkpoint(self.path)
            if ckpt.get("meta") != self.meta:
                raise LossConfigError(f"teacher-sample cache {self.path} was made with {ckpt.get('meta')}, not "
                                      f"{self.meta}: delete it or pass another path")
            self.z, self.labels, self.x0, self.done = ckpt["z"], ckpt["labels"], ckpt["x0"], ckpt["done"]
            self.omega = ckpt["omega"]
            return
        g = torch.Generator().manual_seed(seed)
        self.z = sigma_max * torch.randn(pool_size, *shape, generator=g)
        self.labels = torch.randint(0, num_classes, (pool_size,), generator=g) if num_classes else None
        self.omega = 1 + (guidance_max - 1) * torch.rand(pool_size, generator=g) if guidance_max > 1 else None
        self.x0: torch.Tensor | None = None                           # allocated at the first fill
        self.done = torch.zeros(pool_size, dtype=torch.bool)

    def __len__(self) -> int:
        return self.z.shape[0]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(z, labels, ω, x0) for pool indices; missing teacher samples computed in one sample_fn call."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        if indices.numel() and (indices.min() < 0 or indices.max() >= len(self)):
            raise LossConfigError(f"cache indices must lie in [0, {len(self)}): draw them from the pool size")
        todo = indices[~self.done[indices]].unique()
        if todo.numel():
            with torch.no_grad():
                x0 = self.sample_fn(*self._pool(todo)[:3])
            if self.x0 is None:
                self.x0 = torch.zeros(len(self), *x0.shape[1:])
            self.x0[todo], self.done[todo] = x0.detach().float().cpu(), True
            if self.path is not None:
                save_checkpoint({"meta": self.meta, "z": self.z, "labels": self.labels, "omega": self.omega,
                                 "x0": self.x0, "done": self.done}, self.path)
        x0 = self.x0[indices] if self.x0 is not None else torch.zeros(0, *self.z.shape[1:])
        return (*self._pool(indices), x0.to(self.device))

    def _pool(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(z, labels, ω) of pool entries, on the device."""
        return tuple(None if t is None else t[indices].to(self.device) for t in (self.z, self.labels, self.omega))
