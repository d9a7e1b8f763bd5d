"""Generator: G(z) at σ_max, function-preserving growth with fade-in, official layout, freezing, checkpoints."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pagoda.decoder import FADE_MODE, Generator
from pagoda.grow import grow_widths
from pagoda.io import save_checkpoint
from pagoda.teacher import Denoiser
from pagoda.unet import PRESETS, UNet, UNetConfig

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _randomise(module, std=0.05, seed=0):
    """Trained-looking weights: every parameter random and non-zero (breaks ADM's zero init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _tiny(**kw) -> Generator:
    G = Generator(UNet(replace(PRESETS["tiny"], **kw)))
    _randomise(G)
    return G


def _up(x):
    return F.interpolate(x, scale_factor=2, mode=FADE_MODE)


def test_generator_is_the_network_at_sigma_max():
    G = _tiny()
    z, y = torch.randn(3, 1, 8, 8) * 80, torch.tensor([0, 4, 9])
    sigma = torch.tensor(80.0)
    ref = G.unet(z / (80**2 + 0.25) ** 0.5, 250 * torch.log(sigma), y)
    torch.testing.assert_close(G(z, y), ref, atol=0, rtol=0)
    assert (G.resolution, G.base_resolution, G.channels) == (8, 8, 1)
    assert G.last_layer_weight is G.unet.output_blocks[-1][0].out_layers[3].weight  # sony/pagoda's W
    with pytest.raises(ValueError, match=r"G expects latents z of shape \(B, 1, 8, 8\)"):
        G(torch.zeros(2, 1, 16, 16))


def test_from_teacher_copies_and_unfreezes():
    den = Denoiser(UNet(PRESETS["tiny"]), sigma_data=0.5, c_noise="adm").requires_grad_(False)
    G = Generator.from_teacher(den)
    assert G.unet is not den.unet and all(p.requires_grad for p in G.parameters())
    for a, b in zip(G.unet.parameters(), den.unet.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert G.sigma_max == den.sigma_max and G(80 * torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="already grown"):
        Generator.from_teacher(G.grow().unet)


@settings(max_examples=10, deadline=None)
@given(mc=st.sampled_from([32, 64]), grow=st.sampled_from([None, 32, 64]), grb=st.integers(1, 2),
       nrb=st.integers(1, 2), res=st.sampled_from([8, 16]), cond=st.booleans(), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_growth_is_function_preserving(mc, grow, grb, nrb, res, cond, batch, seed):
    cfg = replace(PRESETS["tiny"], resolution=res, model_channels=mc, num_res_blocks=nrb, grow_res_blocks=grb,
                  attention_resolutions=(res // 2,), num_classes=10 if cond else None)
    G = Generator(UNet(cfg))
    _randomise(G, seed=seed)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 1, res, res, generator=g) * 80
    y = torch.randint(0, 10, (batch,), generator=g) if cond else None
    with torch.no_grad():
        H = G.grow(grow)
        assert H.resolution == 2 * res and H.alpha.item() == 0
        torch.testing.assert_close(H(z, y), _up(G(z, y)), atol=1e-6, rtol=0)
        # α = 1: the new blocks alone (they are not identities once trained): the fade really mixes
        _randomise(H, seed=seed + 1)
        H.set_alpha(0.0)
        out0 = H(z, y)
        H.set_alpha(1.0)
        out1 = H(z, y)
        H.set_alpha(0.25)
        torch.testing.assert_close(H(z, y), 0.75 * out0 + 0.25 * out1, atol=1e-5, rtol=1e-5)
        assert (out1 - out0).abs().max() > 1e-3
        # second doubling at α = 0 equals up-sampling the α = 1 output of the first
        H.set_alpha(1.0)
        K = H.grow()
        assert K.resolution == 4 * res
        torch.testing.assert_close(K(z, y), _up(H(z, y)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("schedule", ["constant", "halve", "16/R", "64,48,24"])
def test_every_width_schedule_grows_function_preserving(schedule):
    """Three doublings 8 → 64 under each width schedule: at α = 0 each grown G equals the nearest up-sampling of the
    previous one (also where the width changes and the old head fades out); widths that are not multiples of 32 get
    gcd(32, width) GroupNorm groups; the checkpoint reloads the same function."""
    G = _tiny()
    widths = grow_widths(schedule, 8, 3, G.config.top_width)
    z, y = 80 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([3, 7])
    with torch.no_grad():
        for k, width in enumerate(widths):
            H = G.grow(width)
            torch.testing.assert_close(H(z, y), _up(G(z, y)), atol=1e-6, rtol=0)
            _randomise(H, seed=k + 1)  # "trained": the next doubling must preserve a non-trivial function
            H.set_alpha(1.0)
            G = H
        assert G.resolution == 64
        assert G.config.grow_channels == tuple(w or 32 for w in widths)  # constant: the trunk's top width, 32
        assert G.unet.out[0].num_groups == math.gcd(32, G.config.grow_channels[-1])  # 32, or 8 for 24 / 8 channels
        torch.testing.assert_close(Generator.from_checkpoint(G.to_checkpoint())(z, y), G(z, y), atol=0, rtol=0)


def test_fade_path_not_computed_at_alpha_one_and_fade_off():
    G = _tiny()
    calls = []
    for H in (G.grow(), G.grow(fade=False)):
        H.unet.out.register_forward_hook(lambda *a: calls.append(1))
        calls.clear()
        H(torch.randn(2, 1, 8, 8) * 80, torch.tensor([1, 2]))
        assert len(calls) == (2 if H.fade else 1)  # α = 0: head on old and new features; fade=False: once
    assert not H.fade and H.alpha.item() == 1
    with pytest.raises(ValueError, match="no fade-in path"):
        H.set_alpha(0.5)
    H = G.grow()
    H.set_alpha(3.0)  # clamped: fade finished
    calls.clear()
    H.unet.out.register_forward_hook(lambda *a: calls.append(1))
    H(torch.randn(2, 1, 8, 8) * 80, torch.tensor([1, 2]))
    assert H.alpha.item() == 1 and len(calls) == 1
    with pytest.raises(ValueError, match="set_alpha"):
        G.grow().grow()  # growing mid-fade would silently drop the fade path


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "adm_unet_reference.pt", weights_only=True)


def _sd(ref, name):
    p = f"{name}.state_dict."
    return {k[len(p):]: v for k, v in ref.items() if k.startswith(p)}


def test_grown_layout_is_official(ref):
    d = json.loads((FIX / "adm_unet_reference.json").read_text())
    base = Generator(UNet(UNetConfig(**{**d, "grow_channels": []})))
    base.load_state_dict(_sd(ref, "base"), strict=True)  # official names, no "unet." prefix
    G = base.grow(32)
    G.set_alpha(1.0)
    assert G.config == UNetConfig(**d)
    grown = _sd(ref, "grown")
    assert [(k, v.shape) for k, v in G.state_dict().items()] == [(k, v.shape) for k, v in grown.items()]
    for k, v in _sd(ref, "base").items():  # trunk and head copied
        assert torch.equal(G.state_dict()[k], v)
    G.load_state_dict(grown, strict=True)
    with torch.no_grad():
        out = G.unet(ref["x"], 250 * torch.log(ref["sigma"]), ref["y"])
        torch.testing.assert_close(out, ref["grown.out_flash"], atol=1e-5, rtol=0)
        # the fixture's last sample has σ = 80 = σ_max: G itself reproduces it from z = x·√(σ²+σ_d²)
        assert ref["sigma"][-1].item() == 80.0
        z = ref["x"][-1:] * math.sqrt(80.0**2 + 0.5**2)
        torch.testing.assert_close(G(z, ref["y"][-1:]), ref["grown.out_flash"][-1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("activate_from", [None, 0, 2, 4])
def test_freezing_policy_gradients(activate_from):
    G = _tiny().grow()
    _randomise(G, seed=1)
    G.set_alpha(0.5)
    names = G.set_trainable(activate_from)
    assert names == [n for n, p in G.unet.named_parameters() if p.requires_grad]
    frozen_prefix = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    for n in G.state_dict():
        blk = int(n.split(".")[1]) if n.startswith("output_blocks.") else None
        frozen = activate_from is not None and (n.startswith(frozen_prefix) or (blk is not None and blk < activate_from))
        assert (n in names) == (not frozen), n
    G(torch.randn(4, 1, 8, 8) * 80, torch.arange(4)).square().mean().backward()
    for n, p in G.unet.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert G.last_layer_weight.requires_grad
    with pytest.raises(ValueError, match="outside"):
        G.set_trainable(5)  # tiny has 4 trunk output blocks


@pytest.mark.parametrize("grow", [None, 64])  # same width (shared head) / new width (frozen old head)
def test_checkpoint_round_trip(tmp_path, grow):
    G = _tiny().grow(grow)
    _randomise(G, seed=2)
    G.set_alpha(0.3)
    assert all(not k.startswith("unet.") and k != "alpha" for k in G.state_dict())
    path = save_checkpoint(G.to_checkpoint(), tmp_path / "g.pt")
    H = Generator.from_checkpoint(path, expected=G.config)
    assert (H.alpha.item(), H.fade, H.config, H.sigma_max, H.c_noise) == (pytest.approx(0.3), True, G.config, 80.0, "adm")
    z, y = torch.randn(2, 1, 8, 8) * 80, torch.tensor([3, 5])
    with torch.no_grad():
        torch.testing.assert_close(H(z, y), G(z, y), atol=0, rtol=0)
        # resume in place into a freshly grown generator
        K = _tiny().grow(grow).load_checkpoint(path)
        torch.testing.assert_close(K(z, y), G(z, y), atol=0, rtol=0)
    G.set_alpha(1.0)  # fade finished: plain official state dict, fade flag kept
    H = Generator.from_checkpoint(G.to_checkpoint())
    assert H.alpha.item() == 1 and H.fade and list(H.state_dict()) == list(UNet(G.config).state_dict())


def test_checkpoint_mismatch_errors():
    G16 = _tiny().grow(fade=False)
    G32 = G16.grow()
    with pytest.raises(ValueError, match=r"checkpoint is a 32×32 generator .* grow_channels \[32, 32\], expected a 16×16"):
        G16.load_checkpoint(G32.to_checkpoint())
    with pytest.raises(ValueError, match="expected a 16×16"):
        Generator.from_checkpoint(G32.to_checkpoint(), expected=G16.config)
    with pytest.raises(ValueError, match="not a generator checkpoint"):
        Generator.from_checkpoint({"state_dict": {}})
    bad = G16.to_checkpoint()
    bad["state_dict"] = {k: v for k, v in bad["state_dict"].items() if not k.startswith("out.")}
    with pytest.raises(ValueError, match="does not match its unet_config"):
        Generator.from_checkpoint(bad)


def test_conv_updown_unconditional_growth_twice_is_function_preserving():
    """Issue 9 §7: conv up/down, no scale-shift norm, unconditional, two doublings: at α = 0 each grown G equals the
    nearest up-sampling of the previous one, the saved layout has the official Upsample blocks and reloads exactly."""
    cfg = replace(PRESETS["tiny"], resblock_updown=False, use_scale_shift_norm=False, num_classes=None)
    torch.manual_seed(0)
    G8 = Generator(UNet(cfg))
    for p in G8.parameters():  # a non-trivial function (zero-init layers broken)
        torch.nn.init.normal_(p, std=0.05)
    z = 80 * torch.randn(3, 1, 8, 8)
    G16 = G8.grow(fade=True)
    torch.testing.assert_close(G16(z), F.interpolate(G8(z), scale_factor=2, mode="nearest"), rtol=0, atol=0)
    for p in G16.parameters():
        p.data.add_(0.01 * torch.randn_like(p))  # "trained" a little
    G16.set_alpha(1.0)
    G32 = G16.grow(fade=True)
    torch.testing.assert_close(G32(z), F.interpolate(G16(z), scale_factor=2, mode="nearest"), rtol=0, atol=0)
    n = G8.unet.num_trunk_output_blocks
    assert {f"output_blocks.{n}.0.conv.weight", f"output_blocks.{n + 3}.0.conv.weight"} <= set(G32.state_dict())
    G32.set_alpha(1.0)
    again = Generator.from_checkpoint(G32.to_checkpoint())
    torch.testing.assert_close(again(z), G32(z), rtol=0, atol=0)
    assert G32.last_layer_weight is G32.unet.output_blocks[-1][0].out_layers[3].weight


def test_guidance_embedding_starts_as_the_unguided_generator():
    """G(z, y, ω) (PaGoDA's guided one-step G): the ω embedding starts at zero, so for every ω the generator is the
    teacher copy / its growth (function-preserving); after a change of its last layer ω matters; plain G refuses ω."""
    torch.manual_seed(0)
    teacher = Denoiser(UNet(PRESETS["tiny"]))
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.05)
    G, Gw = Generator.from_teacher(teacher), Generator.from_teacher(teacher, guidance=True)
    z, y, w = 80 * torch.randn(4, 1, 8, 8), torch.arange(4), torch.tensor([1.0, 1.5, 3.0, 4.0])
    assert torch.equal(Gw(z, y, w), G(z, y)) and torch.equal(Gw(z, y), G(z, y))
    G16 = Gw.grow(fade=True)
    torch.testing.assert_close(G16(z, y, w), F.interpolate(G(z, y), scale_factor=2, mode="nearest"), rtol=0, atol=0)
    torch.nn.init.normal_(Gw.unet.guidance_embed[2].weight, std=0.1)
    assert not torch.allclose(Gw(z, y, torch.full((4,), 3.0)), Gw(z, y, torch.ones(4)))
    again = Generator.from_checkpoint(Gw.to_checkpoint())
    assert torch.equal(again(z, y, w), Gw(z, y, w))
    with pytest.raises(ValueError, match="no guidance embedding"):
        G(z, y, w)
