"""End to end on real Fashion-MNIST: teacher 8×8 → latent cache → stage-08 → stage-16.

The run is trained once per session by `tests/conftest.py::toy_run` (≈ 1 min with 1 thread); these tests
read it, and copy it before anything that writes. Bounds are measured values minus a margin (numbers
measured on the toy run are quoted next to each assertion).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace

import pytest
import torch

from pagoda.data import load_fashion_mnist
from pagoda.images import downsample
from pagoda.decoder import Generator
from pagoda.encoder import Encoder, psnr
from pagoda.grow import PRESETS
from pagoda.teacher import load_teacher
from pagoda.train import train

from helpers import read_cache


def _generators(run):
    return [Generator.from_checkpoint(run.path / f"stage-{r:02d}" / "generator.pt").eval() for r in (8, 16)]


def _test_images(n: int = 16):
    """n Fashion-MNIST *test-split* images spread over the split (never seen in training), with labels."""
    x, y = load_fashion_mnist("test")
    idx = torch.arange(n) * (len(y) // n)
    return x[idx], y[idx]


def _copy(run, tmp_path):
    """A copy of the toy run (modification times kept) that a test may write into."""
    dst = tmp_path / "run"
    shutil.copytree(run.path, dst)
    return dst


def test_run_directory_has_every_stage(toy_run):
    run = toy_run.path
    cfg = json.loads((run / "config.json").read_text())
    stages = [(s["name"], s["resolution"], s["grow"]) for s in cfg["stages"]]
    assert stages == [("stage-08", 8, False), ("stage-16", 16, True)]
    assert (run / "teacher" / "teacher.pt").is_file()
    info, z, labels, idx = read_cache(run / "latents")
    assert (info.num_images, info.steps, info.resolution) == (64, 10, 8)
    assert z.shape == (64, 2, 1, 8, 8) and torch.isfinite(z).all()  # [image, flip] per data-set image
    assert torch.equal(idx, torch.arange(64)) and labels.shape == (64,)
    G8, G16 = _generators(toy_run)
    assert (G8.resolution, G8.base_resolution, G16.resolution, G16.base_resolution) == (8, 8, 16, 8)
    assert float(G16.alpha) == 1.0  # the saved generator has finished its fade-in


def test_stage_logs_follow_the_schedule(toy_run):
    logs = {r: [json.loads(line) for line in (toy_run.path / f"stage-{r:02d}" / "metrics.jsonl").open()]
            for r in (8, 16)}
    assert [len(logs[8]), len(logs[16])] == [40, 20]
    for log in logs.values():
        assert all(torch.isfinite(torch.tensor([s["rec"], s["adv"], s["w"], s["d"]])).all() for s in log)
        # L_rec only for adv_start = 10 steps, then L_rec + λ·w·L_adv with w in the clip range [0.01, 10]
        assert all(s["w"] == 0 and s["d"] == 0 for s in log[:10])
        assert all(0.01 <= s["w"] <= 10 and s["d"] > 0 for s in log[10:])
    # fade-in: α = step / 10 over the first 10 growth steps, then 1; stage 2 does not fade
    assert [s["alpha"] for s in logs[16]] == pytest.approx([min(1.0, k / 10) for k in range(20)])
    assert all(s["alpha"] == 1.0 for s in logs[8])
    # the decoder learns: L_rec fell from 0.75 to ~0.12 over 40 steps (measured)
    first, last = logs[8][0]["rec"], sum(s["rec"] for s in logs[8][-5:]) / 5
    assert last < 0.4 * first


def test_stage_logs_show_the_held_out_margin(toy_run):
    """Every stage logs L_D and the held-out margin D(real) − D(fake) (every 10 steps and at the end)."""
    for r, steps in ((8, 40), (16, 20)):
        log = [json.loads(line) for line in (toy_run.path / f"stage-{r:02d}" / "metrics.jsonl").open()]
        probed = [s["step"] for s in log if "margin" in s]
        assert probed == [k for k in range(10, steps + 1, 10)] and all(math.isfinite(s["margin"]) for s in log if "margin" in s)
        assert all(math.isfinite(s["d"]) for s in log)


def test_demo_recipe_growth_stage_l_rec_falls_while_d_learns(toy_run, tmp_path):
    """The toy's stage-16 retrained with the demo preset's discriminator and distance (projected D on frozen
    Lite0 features, Lite0 distance): L_rec over the last quarter is below the first quarter (it does not rise
    while the adversarial term trains, as it did with the from-scratch multi-scale D), L_D leaves its start and
    the held-out margin is positive at the end."""
    demo = PRESETS["demo"]
    for sub in ("teacher", "latents", "stage-08"):
        shutil.copytree(toy_run.path / sub, tmp_path / sub)
    grow = replace(toy_run.train_cfg.preset, discriminator=demo.discriminator, d_input=demo.d_input,
                   distance=demo.distance, lr_D=1e-2)
    train(replace(toy_run.train_cfg, out=str(tmp_path), preset=grow), progress=False)
    log = [json.loads(line) for line in (tmp_path / "stage-16" / "metrics.jsonl").open()]
    q = len(log) // 4
    first, last = (sum(s["rec"] for s in part) / q for part in (log[:q], log[-q:]))
    assert last < first, (first, last)
    adv = [s["d"] for s in log if s["d"] > 0]  # the D steps (after adv_start)
    assert sum(adv[-3:]) < sum(adv[:3]) and log[-1]["margin"] > 0.5, (adv, log[-1]["margin"])


def test_resolution_consistency(toy_run):
    """downsample(G_16(z)) stays close to G_8(z): growth starts exact (α = 0) and L_rec keeps the same x's."""
    G8, G16 = _generators(toy_run)
    z = G8.sigma_max * torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(100) % 10
    with torch.no_grad():
        lo = G8(z, y)
        hi = downsample(G16(z, y), 8)  # 2×2 means
        at_growth = downsample(G8.grow(fade=True)(z, y), 8)
    # At growth (α = 0) the grown generator is exactly up(G_8): 2×2 means give G_8 back (≥ 120 dB measured).
    assert psnr(at_growth, lo).min() > 100
    same, other = psnr(hi, lo), psnr(hi, lo.roll(10, 0))  # roll 10: another z of the same class
    # After 20 growth steps (10 of fade-in, 10 with the adversarial term), measured with 1 / 2 threads:
    # mean 24.9 / 23.5 dB, min 20.9 / 19.7 dB; G_16 of *another* z of the same class scores 14.8 / 15.0 dB.
    assert same.mean() > 21 and same.min() > 16
    assert same.mean() > other.mean() + 6


def test_anchor_keeps_grown_samples_on_the_base_generator(toy_run, tmp_path):
    """The toy's stage-16 retrained with the anchor d(↓G(z'), G_8(z')) on the adversarial fresh z': it is logged
    (only once the adversarial term is on) and the grown G's fresh samples stay closer to G_8's than without it
    (measured with 1 thread: mean PSNR(↓G_16(z), G_8(z)) 25.7 dB with the anchor, 24.2 dB without)."""
    for sub in ("teacher", "latents", "stage-08"):
        shutil.copytree(toy_run.path / sub, tmp_path / sub)
    train(replace(toy_run.train_cfg, out=str(tmp_path), preset=replace(toy_run.train_cfg.preset, anchor=20.0)),
          progress=False)
    log = [json.loads(line) for line in (tmp_path / "stage-16" / "metrics.jsonl").open()]
    assert ["anchor" in s for s in log] == [False] * 10 + [True] * 10 and all(s["anchor"] >= 0 for s in log[10:])
    G8, G16 = _generators(toy_run)
    G16a = Generator.from_checkpoint(tmp_path / "stage-16" / "generator.pt").eval()
    z = G8.sigma_max * torch.randn(100, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(100) % 10
    with torch.no_grad():
        lo, free, anchored = G8(z, y), downsample(G16(z, y), 8), downsample(G16a(z, y), 8)
    assert psnr(anchored, lo).mean() > psnr(free, lo).mean() + 0.5, (psnr(anchored, lo).mean(), psnr(free, lo).mean())


def test_generators_reconstruct_held_out_images(toy_run):
    """G(E(x)) on test-split images; measured (1 / 2 threads): G_8 24.4 / 24.3 dB at 8 px, G_16 16.6 / 16.4 dB
    at 16 px and 21.4 / 20.6 dB at 8 px."""
    G8, G16 = _generators(toy_run)
    D = load_teacher(toy_run.teacher)
    x, y = _test_images()
    x8, x16 = downsample(x, 8), downsample(x, 16)
    z = Encoder(D, 8, steps=10).encode(x8, y)  # the cache's encoder settings
    with torch.no_grad():
        rec8, rec16 = G8(z, y), G16(z, y)
    assert psnr(rec8, x8).mean() > 21
    assert psnr(rec16, x16).mean() > 14 and psnr(downsample(rec16, 8), x8).mean() > 18
    # each reconstruction is of its own image: PSNR to the neighbouring test image is 11.7 / 10.3 dB (measured)
    assert psnr(rec8, x8).mean() > psnr(rec8, x8.roll(1, 0)).mean() + 6
    assert psnr(rec16, x16).mean() > psnr(rec16, x16.roll(1, 0)).mean() + 4


def test_encoder_inverts_real_images(toy_run):
    """encode → decode on the trained teacher, test-split images, paper's Heun Karras grid of 10/20/40 points."""
    D = load_teacher(toy_run.teacher)
    x, y = _test_images()
    x8 = downsample(x, 8)
    got = []
    for steps in (10, 20, 40):
        enc = Encoder(D, 8, steps=steps)
        z = enc.encode(x8, y)
        assert z.std() > 20  # z lives at scale σ_max = 80, not at data scale
        got.append(psnr(enc.decode(z, y), x8))
    mean = [float(p.mean()) for p in got]
    # measured: 40.0 / 59.3 / 77.3 dB mean (min 35.9 / 55.1 / 73.6): Heun's round-trip error shrinks
    # ~9x per doubling of the grid. Bounds: measured mean − 4 dB, and never worse with more steps.
    assert mean[0] > 36 and mean[1] > 55 and mean[2] > 73
    assert min(float(p.min()) for p in got) > 31
    assert mean[1] > mean[0] - 1 and mean[2] > mean[1] - 1


def test_rerun_skips_finished_stages(toy_run, tmp_path):
    run = _copy(toy_run, tmp_path)
    done = [run / "teacher" / "teacher.pt", run / "latents" / "shard-00000.pt", run / "latents" / "index.json",
            *(run / f"stage-{r:02d}" / name for r in (8, 16) for name in ("generator.pt", "checkpoint.pt"))]
    before = {p: p.stat().st_mtime_ns for p in done}
    t0 = time.perf_counter()
    train(replace(toy_run.train_cfg, out=str(run)), progress=False)
    seconds = time.perf_counter() - t0
    assert {p: p.stat().st_mtime_ns for p in done} == before  # nothing retrained, re-encoded or rewritten
    assert sorted(p.name for p in run.glob("stage-*")) == ["stage-08", "stage-16"]
    # loads data, teacher, cache and generators only: ~2 s against ~60 s for the run (measured)
    assert seconds < 0.25 * toy_run.seconds


@pytest.mark.parametrize("res", [12, 24, 4])
def test_res_must_be_teacher_res_times_power_of_two(toy_run, tmp_path, res):
    run = _copy(toy_run, tmp_path)
    config = (run / "config.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"--res .* is not 8·2\^k"):
        train(replace(toy_run.train_cfg, out=str(run), res=res), progress=False)
    assert (run / "config.json").stat().st_mtime_ns == config  # refused before anything was written
    assert sorted(p.name for p in run.glob("stage-*")) == ["stage-08", "stage-16"]


def test_steps_per_stage_override_the_preset(toy_run, tmp_path):
    run = _copy(toy_run, tmp_path)
    n8 = len((run / "stage-08" / "metrics.jsonl").read_text().splitlines())
    config = (run / "config.json").stat().st_mtime_ns
    for bad in ("5", "5,6,7", "5,0", "5,x"):  # one count per stage (two here), each positive
        with pytest.raises(ValueError, match=rf"--steps '{bad}': give 2 positive step counts"):
            train(replace(toy_run.train_cfg, out=str(run), steps=bad), progress=False)
    assert (run / "config.json").stat().st_mtime_ns == config  # refused before anything was written
    shutil.rmtree(run / "stage-16")
    train(replace(toy_run.train_cfg, out=str(run), steps=f"{n8},{n8 + 2}"), progress=False)
    assert len((run / "stage-16" / "metrics.jsonl").read_text().splitlines()) == n8 + 2  # stage-08 reused as is
    assert json.loads((run / "config.json").read_text())["stages"][1]["steps"] == n8 + 2


def test_more_steps_continue_a_finished_stage(toy_run, tmp_path):
    """--steps past a finished stage's count continues it (the shorter generator kept beside it): the same G as that
    count from the start. Fewer steps keep a finished stage as trained (config.json records its count); lengthening
    one that a later stage grew from is refused before anything is written."""
    run = _copy(toy_run, tmp_path)
    n8 = len((run / "stage-08" / "metrics.jsonl").read_text().splitlines())
    n16 = len((run / "stage-16" / "metrics.jsonl").read_text().splitlines())
    config = (run / "config.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=rf"--steps asks {n8 + 2} steps of .*stage-08, finished at {n8}, and stage-16 "
                                         rf"grew from it; fix: pass --steps {n8},{n16} to keep the run as it is, delete"):
        train(replace(toy_run.train_cfg, out=str(run), steps=f"{n8 + 2},{n16}"), progress=False)
    assert (run / "config.json").stat().st_mtime_ns == config
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("stage-*/*.pt")}
    train(replace(toy_run.train_cfg, out=str(run), steps=f"{n8 - 1},{n16 - 1}"), progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.glob("stage-*/*.pt")} == stamps  # kept as trained
    assert [s["steps"] for s in json.loads((run / "config.json").read_text())["stages"]] == [n8, n16]
    old = (run / "stage-16" / "generator.pt").read_bytes()
    train(replace(toy_run.train_cfg, out=str(run), steps=f"{n8},{n16 + 3}"), progress=False)
    assert (run / "stage-16" / f"generator-{n16}.pt").read_bytes() == old
    assert len((run / "stage-16" / "metrics.jsonl").read_text().splitlines()) == n16 + 3
    assert json.loads((run / "config.json").read_text())["stages"][1]["steps"] == n16 + 3
    scratch = tmp_path / "scratch"
    shutil.copytree(run, scratch)
    shutil.rmtree(scratch / "stage-16")
    train(replace(toy_run.train_cfg, out=str(scratch), steps=f"{n8},{n16 + 3}"), progress=False)
    a, b = (torch.load(r / "stage-16" / "generator.pt", weights_only=False) for r in (run, scratch))
    assert all(torch.equal(b["state_dict"][key], value) for key, value in a["state_dict"].items())  # same threads


def test_method_doc_links_resolve():
    """docs/method.md maps each equation to `pagoda/file.py::name`: every such name exists."""
    import importlib
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "method.md").read_text()
    links = re.findall(r"`pagoda/(\w+)\.py::([\w.]+)`", text)
    assert len(links) > 50
    for module, name in links:
        obj = importlib.import_module(f"pagoda.{module}")
        for part in name.split("."):
            assert hasattr(obj, part), f"docs/method.md: pagoda/{module}.py::{name} does not exist"
            obj = getattr(obj, part)
