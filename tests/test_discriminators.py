"""The discriminators: per-head logits, class projection, growth/continuity, and that they learn fast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda.discriminators import Discriminator, ProjectedDiscriminator, make_discriminator
from pagoda.losses import LossConfigError, d_hinge_loss, diff_augment, margin


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), f"max |a - b| = {(a - b).abs().max()}"


def cat(heads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([h.flatten(1) for h in heads], 1)


@pytest.fixture(scope="module")
def projected():
    torch.manual_seed(0)
    return ProjectedDiscriminator(16, 1, num_classes=10, width=16, input_size=64)


# --- multiscale (from scratch) ---------------------------------------------------------------------

@pytest.mark.parametrize("channels,res", [(1, 8), (3, 16), (1, 32)])
def test_multiscale_shapes_and_projection(channels, res):
    D = Discriminator(res, channels, num_classes=5, base_channels=8, max_channels=32).eval()
    x, y = torch.randn(4, channels, res, res), torch.tensor([0, 1, 2, 3])
    heads = D(x, y)
    assert [h.shape for h in heads] == [(4, 1)] * len(D.resolutions) and D.resolutions == [r for r in (32, 16, 8) if r <= res]
    assert not torch.allclose(cat(heads), cat(D(x, (y + 1) % 5)))  # labels enter through the projection
    assert cat(D(x)).shape == (4, len(heads))                     # unconditional path: psi only
    with pytest.raises(LossConfigError, match="labels must be"):
        D(x, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(LossConfigError, match="grow"):
        D(torch.randn(4, channels, 2 * res, 2 * res), y)
    with pytest.raises(LossConfigError, match="num_classes"):
        Discriminator(8, 1, base_channels=8)(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))


def test_multiscale_grow_keeps_every_old_head():
    """D continuity: grow() keeps the function of every head (same logits on the downsampled input, eval mode);
    the new full-resolution head starts with gain 0 and learns."""
    D = Discriminator(8, 3, num_classes=4, base_channels=8, max_channels=32)
    cat(D(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))).sum().backward()   # a train step's power iteration
    D.eval()
    D2 = D.grow().eval()
    assert D2.resolution == 16 and D2.resolutions == [16, 8] and D2.gain.tolist() == [0.0, 1.0]
    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    new, old = D2(x, y), D(F.avg_pool2d(x, 2), y)
    assert_close(new[1], old[0]) and torch.equal(new[0], torch.zeros(5, 1))
    D4 = D2.grow().eval()
    assert_close(D4(torch.randn(5, 3, 32, 32), y)[0], torch.zeros(5, 1))
    D2.train()
    cat(D2(x, y)).sum().backward()
    assert D2.gain.grad[0] != 0
    assert D2.heads["8"].psi.parametrizations.weight.original is not D.heads["8"].psi.parametrizations.weight.original


def _blobs(n: int, side: str, g: torch.Generator) -> torch.Tensor:
    """Gaussian blobs on a 16 px canvas, centred in the left or right half."""
    cy = torch.rand(n, 1, 1, generator=g) * 10 + 3
    cx = torch.rand(n, 1, 1, generator=g) * 4 + (2 if side == "left" else 10)
    ii, jj = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    img = torch.exp(-((ii - cy) ** 2 + (jj - cx) ** 2) / 4.0)
    return (img * 2 - 1).unsqueeze(1)


def _train_to_separate(D, steps: int, lr: float, g: torch.Generator) -> tuple[float, float]:
    """Hinge-train D (Adam, betas (0, 0.99)) on left vs right blobs; (AUC before, AUC after) on held-out pairs."""
    real_test, fake_test = _blobs(64, "left", g), _blobs(64, "right", g)

    def auc() -> float:
        with torch.no_grad():
            r, f = cat(D.eval()(real_test)).mean(1), cat(D(fake_test)).mean(1)
        D.train()
        return (r[:, None] > f[None, :]).float().mean().item()

    before = auc()
    opt = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=lr, betas=(0.0, 0.99))
    for _ in range(steps):
        x = diff_augment(torch.cat([_blobs(24, "left", g), _blobs(24, "right", g)]), "color", g)
        heads = D(x)
        loss = d_hinge_loss([h[:24] for h in heads], [h[24:] for h in heads])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, auc()


def test_multiscale_hinge_training_separates_toy_distributions():
    torch.manual_seed(0)
    before, after = _train_to_separate(Discriminator(16, 1, base_channels=8, max_channels=16), 12, 2e-3,
                                       torch.Generator().manual_seed(0))
    assert before < 0.5 and after > 0.95


# --- projected (frozen EfficientNet-Lite0) ---------------------------------------------------------

def test_projected_heads_projection_and_frozen_features(projected):
    D = projected
    x, y = torch.rand(3, 1, 16, 16) * 2 - 1, torch.tensor([0, 4, 9])
    heads = D(x, y)
    # CSM maps at 64 px input: 32, 16, 8, 4; heads go down to <= 8 px, then a 4x4 conv: 5x5, 5x5, 5x5, 1x1 logits
    assert [h.shape for h in heads] == [(3, 25), (3, 25), (3, 25), (3, 1)]
    assert not torch.allclose(cat(heads), cat(D(x, torch.tensor([1, 1, 1]))))
    assert cat(D(torch.rand(3, 1, 32, 32) * 2 - 1, y)).shape == (3, 76)  # any input size: resized to 64
    trainable = {n.split(".")[0] for n, p in D.named_parameters() if p.requires_grad}
    assert trainable == {"heads"}                                      # backbone, CCM and CSM are frozen
    D.train()
    assert not D.features.training and not D.features.backbone.training
    xg = x.clone().requires_grad_()
    cat(D(xg, y)).sum().backward()                                     # G's gradient flows through the features
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in D.features.parameters())
    D.zero_grad()
    with pytest.raises(LossConfigError, match=r"expects \(B, 1, H, W\)"):
        D(torch.rand(3, 3, 16, 16), y)
    with pytest.raises(LossConfigError, match="multiple of 32"):
        ProjectedDiscriminator(16, 1, None, input_size=50, pretrained=False)


def test_projected_separates_toy_distributions_in_a_few_dozen_steps():
    """The pretrained features make a fresh projected D learn fast: left vs right blobs in 20 steps."""
    torch.manual_seed(0)
    D = ProjectedDiscriminator(16, 1, num_classes=None, width=16, input_size=64)
    before, after = _train_to_separate(D, 20, 2e-3, torch.Generator().manual_seed(1))
    assert after > 0.95 and after > before


def test_projected_grow_is_the_same_function(projected):
    """D continuity for the projected D: the features resize any input, so the grown D is the same function."""
    D2 = projected.grow()
    assert D2.resolution == 32 and D2 is not projected
    x, y = torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3])
    projected.eval(), D2.eval()
    for a, b in zip(projected(x, y), D2(x, y)):
        assert torch.equal(a, b)
    projected.train()


def test_margin_and_factory():
    real, fake = [torch.ones(4, 2), torch.full((4, 1), 3.0)], [torch.zeros(4, 2), torch.ones(4, 1)]
    assert margin(real, fake) == pytest.approx(((1 - 0) + (3 - 1)) / 2)
    assert isinstance(make_discriminator("multiscale", 8, 1, None, width=8), Discriminator)
    assert isinstance(make_discriminator("projected", 8, 1, None, width=8, pretrained=False), ProjectedDiscriminator)
    with pytest.raises(LossConfigError, match="unknown discriminator"):
        make_discriminator("stylegan", 8, 1, None)
