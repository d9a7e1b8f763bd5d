"""EDM preconditioning, loss weighting, label dropout and guidance."""
import math

import torch
from hypothesis import given, settings, strategies as st

from pagoda.teacher import Denoiser, drop_labels, edm_loss, edm_scalings, guided
from pagoda.unet import PRESETS, UNet


@settings(max_examples=30, deadline=None)
@given(sigma=st.floats(1e-3, 100.0), sd=st.floats(0.1, 2.0))
def test_scalings_identities(sigma, sd):
    s = torch.tensor(sigma, dtype=torch.float64)
    c_skip, c_out, c_in = edm_scalings(s, sd)
    # unit-variance input and target (Karras et al. 2022, appendix B.6)
    assert math.isclose(float(c_in**2 * (sd**2 + s**2)), 1.0, rel_tol=1e-9)
    assert math.isclose(float(c_out**2), float(sd**2 * s**2 / (s**2 + sd**2)), rel_tol=1e-9)
    assert math.isclose(float(c_skip), sd**2 / (sigma**2 + sd**2), rel_tol=1e-9)


def test_c_noise_conventions():
    """The denoiser hands F the noise label of its convention: 250·ln σ ("adm") or ln(σ)/4 ("edm")."""
    class Recorder(torch.nn.Module):
        def forward(self, x, noise_labels, labels):
            self.seen = noise_labels
            return torch.zeros_like(x)

    s = torch.tensor([0.002, 1.0, 80.0])
    for convention, expected in (("adm", 250 * torch.log(s)), ("edm", torch.log(s) / 4)):
        D = Denoiser(Recorder(), c_noise=convention)
        D(torch.zeros(3, 1, 4, 4), s)
        torch.testing.assert_close(D.unet.seen, expected)


def test_denoiser_limits():
    unet = UNet(PRESETS["tiny"])
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    D = Denoiser(unet)
    x = torch.randn(3, 1, 8, 8)
    # σ → 0: D(x) → x (c_skip → 1, c_out → 0)
    torch.testing.assert_close(D(x, torch.full((3,), 1e-6)), x, atol=1e-5, rtol=0)
    # the network output enters with weight c_out
    sigma = torch.full((3,), 2.0)
    c_skip, c_out, c_in = edm_scalings(sigma)
    F = unet(x * c_in[:, None, None, None], 250 * torch.log(sigma), None)
    torch.testing.assert_close(D(x, sigma), c_skip[:, None, None, None] * x + c_out[:, None, None, None] * F)


def test_loss_weight_makes_optimal_denoiser_unit_loss():
    # For a denoiser that returns the noisy input, the weighted loss is λ σ² per pixel = (σ²+σ_d²)/σ_d² on average.
    class Identity(Denoiser):
        def forward(self, x, sigma, labels=None):
            return x

    D = Identity(UNet(PRESETS["tiny"]))
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4096, 1, 8, 8)
    loss = edm_loss(D, x, generator=g)
    sigma = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1.2 - 1.2).exp()
    expected = (sigma**2 + 0.25) / 0.25
    ratio = loss / expected  # = chi²(64)/64 per sample: mean 1, std √(2/64) ≈ 0.177
    assert abs(ratio.mean().item() - 1) < 0.02
    assert abs(ratio.std().item() - (2 / 64) ** 0.5) < 0.02


def test_label_dropout_and_guidance():
    labels = torch.arange(10).repeat(100)
    y = drop_labels(labels, 10, 0.3, torch.Generator().manual_seed(1))
    dropped = (y.sum(1) == 0).float().mean().item()
    assert 0.25 < dropped < 0.35
    assert torch.equal(y.argmax(1)[y.sum(1) > 0], labels[y.sum(1) > 0])
    assert drop_labels(labels, None, 0.3) is None
    unet = UNet(PRESETS["tiny"])
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    D = Denoiser(unet)
    x, s, lab = torch.randn(2, 1, 8, 8), torch.full((2,), 1.0), torch.tensor([1, 2])
    torch.testing.assert_close(guided(D, 1.0)(x, s, lab), D(x, s, lab))
    cond, uncond = D(x, s, lab), D(x, s, torch.zeros(2, 10))
    torch.testing.assert_close(guided(D, 3.0)(x, s, lab), uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5)
