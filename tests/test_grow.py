"""Growth schedule: stage lists per preset, official ImageNet values, bad resolutions, dict round trip."""
import json
from dataclasses import asdict, replace

import pytest
from hypothesis import given, settings, strategies as st

from pagoda.grow import PRESETS, StageConfig, check_width, doublings, get_preset, grow_widths, plan_stages
from pagoda.rundir import stage_dir_name
from pagoda.train import TEACHER_PRESETS, TrainConfig, run_stages
from pagoda.unet import PRESETS as UNET_PRESETS
from pagoda.unet import UNet


def test_stage_dir_name():
    assert [stage_dir_name(r) for r in (8, 16, 64, 128, 512)] == ["stage-08", "stage-16", "stage-64", "stage-128", "stage-512"]


def test_demo_8_to_32():
    stages = plan_stages(8, 32, "demo")
    assert [s.name for s in stages] == ["stage-08", "stage-16", "stage-32"]
    assert [s.resolution for s in stages] == [8, 16, 32]
    assert [s.grow for s in stages] == [False, True, True]
    s2, *s3 = stages
    assert (s2.lam, s2.activate_from, s2.fade_steps, s2.fade) == (0.2, None, 0, False)
    assert all(s.lam == 1.0 and s.fade and s.activate_from == PRESETS["demo"].activate_from for s in s3)
    # activate_from fits the demo teacher's trunk
    assert PRESETS["demo"].activate_from <= UNet(UNET_PRESETS["demo8"]).num_trunk_output_blocks
    assert PRESETS["tiny"].activate_from <= UNet(UNET_PRESETS["tiny"]).num_trunk_output_blocks


def test_imagenet64_official_values():
    stages = plan_stages(64, 512, "imagenet64")
    assert [s.name for s in stages] == ["stage-64", "stage-128", "stage-256", "stage-512"]
    assert [s.batch for s in stages] == [96, 256, 360, 512]
    assert [s.lam for s in stages] == [0.2, 1.0, 1.0, 1.0]
    assert [s.activate_from for s in stages] == [None, 9, 9, 9]
    assert [s.grow_channels for s in stages] == [None] * 4  # constant: every doubling at the trunk's top width, 192
    assert [s.split_g_step for s in stages] == [False, False, True, True]
    assert [s.rec_disc_weight for s in stages] == [0.0, 0.0, 0.0, 0.5]
    for s in stages:
        assert (s.lr_G, s.lr_D, s.ema, s.optimizer, s.d_steps_per_g, s.steps) == (8e-6, 2e-3, 0.999, "radam", 1, 600_000)
    demo = plan_stages(8, 32, "demo")  # Adam in every stage (RAdam's warm-up is too slow for a few hundred steps)
    assert [s.optimizer for s in demo] == ["adam", "adam", "adam"]
    assert [s.d_continue for s in demo] == [False, True, True]  # each growth stage continues the previous D
    assert [s.ema for s in demo] == [0.995, 0.99, 0.99]  # stage-08 averages over longer than the growth stages
    assert [s.lr_G for s in demo] == [2e-4, 4e-4, 4e-4]  # the grown blocks train faster
    mixed = replace(PRESETS["tiny"], grow_optimizer="adam")  # the growth stages' own optimizer
    assert [s.optimizer for s in plan_stages(8, 32, mixed)] == ["radam", "adam", "adam"]
    own_ema = replace(PRESETS["tiny"], ema=0.995, grow_ema=0.99)  # the growth stages' own EMA decay
    assert [s.ema for s in plan_stages(8, 32, own_ema)] == [0.995, 0.99, 0.99]
    assert [s.ema for s in plan_stages(8, 32, replace(own_ema, grow_ema=None))] == [0.995] * 3
    own_lr = replace(PRESETS["tiny"], lr_G=1e-4, grow_lr_G=3e-4)  # the growth stages' own lr_G
    assert [s.lr_G for s in plan_stages(8, 32, own_lr)] == [1e-4, 3e-4, 3e-4]
    assert [s.lr_G for s in plan_stages(8, 32, replace(own_lr, grow_lr_G=None))] == [1e-4] * 3


def test_growth_stages_distance_and_anchor():
    """grow_distance and anchor apply to the growth stages only; --distance still replaces every stage's."""
    p = replace(PRESETS["tiny"], distance="multiscale", grow_distance="lite0+4*multiscale", anchor=2.0)
    assert [(s.distance, s.anchor) for s in plan_stages(8, 32, p)] == [
        ("multiscale", 0.0), ("lite0+4*multiscale", 2.0), ("lite0+4*multiscale", 2.0)]
    assert [s.distance for s in plan_stages(8, 16, p, distance="l2")] == ["l2", "l2"]
    with pytest.raises(ValueError, match="anchor=1.0: must be >= 0, and 0 in a stage that does not grow"):
        replace(plan_stages(8, 8, "tiny")[0], anchor=1.0)


def test_bad_resolution_and_preset():
    with pytest.raises(ValueError, match=r"^--res 100 is not 8·2\^k: use one of 8, 16, 32, 64, \.\.\.$"):
        plan_stages(8, 100, "demo")
    with pytest.raises(ValueError, match="--res 4 is not 8"):
        plan_stages(8, 4, "demo")
    with pytest.raises(ValueError, match="unknown growth preset 'nope'"):
        plan_stages(8, 16, "nope")
    with pytest.raises(ValueError, match="fade_steps"):
        replace(plan_stages(8, 8, "tiny")[0], fade_steps=3)


@settings(max_examples=20, deadline=None)
@given(teacher=st.sampled_from([8, 16, 32, 64]), k=st.integers(0, 4), preset=st.sampled_from(sorted(PRESETS)))
def test_plan_and_dict_round_trip(teacher, k, preset):
    stages = plan_stages(teacher, teacher * 2**k, preset, top_width=64)
    assert len(stages) == k + 1 and doublings(teacher, teacher * 2**k) == k
    assert [s.resolution for s in stages] == [teacher * 2**i for i in range(k + 1)]
    p = get_preset(preset)
    assert [s.steps for s in stages] == [p.steps[min(i, len(p.steps) - 1)] for i in range(k + 1)]
    assert [StageConfig.from_dict(d) for d in json.loads(json.dumps([asdict(s) for s in stages]))] == stages
    for s in stages:
        assert s.alpha(0) == (0.0 if s.fade else 1.0) and s.alpha(10**9) == 1.0


def test_fade_ramp_and_unknown_fields():
    stages = [s if not s.grow else replace(s, fade_steps=4) for s in plan_stages(8, 16, "tiny")]
    assert stages[1].alpha(2) == 0.5
    with pytest.raises(ValueError, match="unknown StageConfig fields"):
        StageConfig.from_dict({**asdict(stages[0]), "bogus": 1})
    with pytest.raises(ValueError, match="ema decay"):
        replace(stages[0], ema=1.5)


def test_width_schedules():
    """constant keeps the previous width; halve, B/R and explicit lists give a width per doubling (last repeats)."""
    assert grow_widths("constant", 64, 3, 192) == (None, None, None)
    assert grow_widths("halve", 64, 3, 192) == (96, 48, 24)  # ProGAN / StyleGAN
    assert grow_widths("256/R", 64, 3, 192) == (192, 192, 96)  # the official table's 192 at 128/256 px, 96 at 512
    assert grow_widths("128/R", 64, 3, 192) == (192, 96, 48) and grow_widths("64/R", 64, 3, 192) == (96, 48, 24)  # = halve
    assert grow_widths("192,192,96", 64, 3) == (192, 192, 96) and grow_widths("64,32", 8, 3) == (64, 32, 32)
    assert grow_widths("halve", 8, 2, 32) == (16, 8) and grow_widths("16/R", 8, 2, 32) == (32, 16)
    assert grow_widths("halve", 8, 6, 32)[-1] == 1  # never below one channel
    # the presets' schedules (docs/benchmarks.md §3b): grow_channels None = the previous width
    assert {n: p.grow_width for n, p in PRESETS.items()} == {"imagenet64": "constant", "demo": "16", "emoji": "constant",
                                                           "tiny": "constant"}
    assert [s.grow_channels for s in plan_stages(8, 64, "emoji", top_width=64)] == [None, None, None, None]
    assert [s.grow_channels for s in plan_stages(8, 32, "demo", top_width=32)] == [None, 16, 16]
    assert [s.grow_channels for s in plan_stages(64, 512, "imagenet64", width="256/R", top_width=192)] == [None, 192, 192, 96]
    with pytest.raises(ValueError, match="needs the teacher's top-level width"):
        plan_stages(8, 32, "demo", width="halve")
    for bad in ("wide", "0,32", "32,", "R/256", "0/R", "-32", ""):
        with pytest.raises(ValueError, match=r"is not a width schedule: use constant, halve, B/R"):
            check_width(bad)


def test_conventional_route_is_the_demo_recipe_at_32px():
    """`--teacher-preset demo32 --res 32` (bench/pipeline_cost.py): the demo teacher's recipe with two more levels,
    then one stage at the teacher resolution with the demo's stage-2 recipe, no growth."""
    assert replace(TEACHER_PRESETS["demo32"], unet="demo8", resolution=8) == TEACHER_PRESETS["demo"]
    u8, u32 = UNET_PRESETS["demo8"], UNET_PRESETS["demo32"]
    assert replace(u32, resolution=8, channel_mult=u8.channel_mult) == u8 and u32.channel_mult[-2:] == u8.channel_mult
    stage, = run_stages(TrainConfig(res=32, teacher_preset="demo32"), u32)
    assert (stage.resolution, stage.grow, stage.steps) == (32, False, 700)
    assert stage == replace(plan_stages(8, 32, "demo")[0], name="stage-32", resolution=32)
