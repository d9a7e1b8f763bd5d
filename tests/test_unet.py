"""UNet: numerically the public ADM architecture (fixtures from the official code) and its checkpoint layout."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pagoda.unet import PRESETS, UNet, UNetConfig, Upsample

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures"  # shared/ lies beside the checkout


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "adm_unet_reference.pt", weights_only=True)


def _cfg(grown: bool) -> UNetConfig:
    d = json.loads((FIX / "adm_unet_reference.json").read_text())
    return UNetConfig(**d) if grown else UNetConfig(**{**d, "grow_channels": []})


def _sd(ref, name):
    p = f"{name}.state_dict."
    return {k[len(p):]: v for k, v in ref.items() if k.startswith(p)}


@pytest.mark.parametrize("name", ["base", "grown"])
@pytest.mark.parametrize("layout", ["flash", "legacy"])
def test_reference_outputs(ref, name, layout):
    net = UNet(replace(_cfg(name == "grown"), qkv_layout=layout))
    net.load_state_dict(_sd(ref, name), strict=True)
    with torch.no_grad():
        out = net(ref["x"], 250 * torch.log(ref["sigma"]), ref["y"])
    torch.testing.assert_close(out, ref[f"{name}.out_{layout}"], atol=1e-5, rtol=0)
    if layout == "legacy":  # the two layouts really differ: the test can tell them apart
        assert (out - ref[f"{name}.out_flash"]).abs().max() > 1e-4


def test_imagenet64_state_dict_matches_public_checkpoint():
    rows = [line.split("\t") for line in (FIX / "adm_imagenet64_state_dict.tsv").read_text().strip().splitlines()]
    with torch.device("meta"):
        net = UNet(PRESETS["imagenet64"])
    sd = net.state_dict()
    assert [(k, str(tuple(v.shape))) for k, v in sd.items()] == [(n, s) for n, s in rows]
    assert sum(p.numel() for p in net.parameters()) == 295_899_267


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6), transpose=st.booleans())
def test_upsample_is_nearest_interpolation_bit_for_bit(n, c, h, w, transpose):
    x = torch.randn(n, c, w, h).transpose(2, 3) if transpose else torch.randn(n, c, h, w)  # strided input too
    assert torch.equal(Upsample(c, False)(x), torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="multiples of 32"):
        UNetConfig(model_channels=48)
    with pytest.raises(ValueError, match=r"grow_channels \[32, 0\] must all be >= 1"):
        UNetConfig(grow_channels=(32, 0))
    assert UNet(UNetConfig(grow_channels=(48,))).out[0].num_groups == 16  # gcd(32, 48): thin growth blocks
    with pytest.raises(ValueError, match="qkv_layout"):
        UNetConfig(qkv_layout="nope")
    net = UNet(PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"expects \(B, 1, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8), torch.zeros(2), None)
    with pytest.raises(ValueError, match="class labels"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.tensor([0, 10]))


def test_config_roundtrip():
    c = PRESETS["imagenet64"].grown(192).grown()
    assert c.output_resolution == 256
    assert UNetConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({**c.to_dict(), "bogus": 1})


@settings(max_examples=6, deadline=None)
@given(grow=st.lists(st.sampled_from([32, 64]), max_size=2), updown=st.booleans(), batch=st.integers(1, 3))
def test_shapes_and_onehot_labels(grow, updown, batch):
    cfg = replace(PRESETS["tiny"], grow_channels=tuple(grow), resblock_updown=updown)
    net = UNet(cfg)
    for p in net.parameters():  # break zero-init so outputs depend on every input
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(batch, 1, 8, 8), torch.randn(batch)
    y = torch.randint(0, 10, (batch,))
    out = net(x, t, y)
    assert out.shape == (batch, 1, cfg.output_resolution, cfg.output_resolution)
    onehot = torch.nn.functional.one_hot(y, 10).float()
    torch.testing.assert_close(net(x, t, onehot), out, atol=1e-5, rtol=1e-5)
    # an all-zero label row is the unconditional model: differs from the labelled one
    assert not torch.allclose(net(x, t, torch.zeros_like(onehot)), out)


def test_growth_up_block_is_the_official_one_for_conv_updown():
    """resblock_updown=False: each doubling starts with ADM's Upsample (nearest ×2, 3×3 conv to the growth width),
    state-dict names output_blocks.N.0.conv.*; with resblock_updown=True it is a ResBlock(up=True)."""
    cfg = replace(PRESETS["tiny"], resblock_updown=False, use_scale_shift_norm=False, num_classes=None,
                  grow_channels=(64, 32))
    sd = UNet(cfg).state_dict()
    n = UNet(replace(cfg, grow_channels=())).num_trunk_output_blocks
    first, second = n, n + 1 + cfg.grow_res_blocks  # the two up-sampling blocks
    assert sd[f"output_blocks.{first}.0.conv.weight"].shape == (64, 32, 3, 3)
    assert sd[f"output_blocks.{second}.0.conv.weight"].shape == (32, 64, 3, 3)
    assert not any(k.startswith(f"output_blocks.{first}.0.in_layers") for k in sd)
    res = UNet(replace(cfg, resblock_updown=True)).state_dict()
    assert f"output_blocks.{first}.0.in_layers.2.weight" in res and f"output_blocks.{first}.0.conv.weight" not in res
