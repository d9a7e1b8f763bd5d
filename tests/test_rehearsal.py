"""The README's ImageNet command, rehearsed end to end with real files (issue 20, item 6).

A teacher saved exactly as the public `edm_imagenet64_ema.pt` is stored (a raw ADM state dict, seeded random
weights), a folder of real JPEGs in class sub-folders (skimage.data photos, cropped to various sizes and aspect
ratios), then the real command with a step and batch cap:

    pagoda train --res 128 --data DIR --teacher edm_imagenet64_ema.pt --preset imagenet64 --max-steps 2 --max-batch 2 --workers 0

latent cache → stage-64 → growth to 128, killed (SIGKILL) after the first step of stage-128 and resumed, then
`pagoda sample` and `pagoda invert photo.jpg` on the result. The `slow` test runs it at true size (296 M
parameters) on the CPU; the same rehearsal with the `tiny` UNet and preset runs in the default suite.

    PAGODA_TEST_THREADS=1 pytest tests/test_rehearsal.py -m slow -s    # true size: time and peak RSS in README
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import read_cache

from pagoda.cli import app
from pagoda.decoder import Generator
from pagoda.io import load_checkpoint
from pagoda.teacher import load_teacher
from pagoda.unet import PRESETS, UNet

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT.parent / "shared" / "fixtures"  # shared/ lies beside the checkout
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
          "camera", "coins")  # bundled with scikit-image (no download); camera and coins are grey
CLASSES = ("n01440764", "n02102040", "n02979186", "n03000684")  # ImageNet-style synset folder names
ENCODE_IMAGES, STEPS, BATCH = 4, 2, 2  # the rehearsal's latent cache, steps and global batch per stage
runner = CliRunner()


def public_teacher(path: Path, preset: str) -> Path:
    """A UNet of `preset` with seeded random weights (zero-initialised layers too), saved as the public checkpoint
    is: torch.save of the raw state dict, no wrapper, no kind."""
    torch.manual_seed(0)
    unet = UNet(PRESETS[preset])
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.01)
    torch.save(unet.state_dict(), path)
    return path


def jpeg_folder(root: Path, per_class: int = 8) -> Path:
    """len(CLASSES) × per_class JPEGs: random crops of the photos, aspect 1:2 … 2:1, long side 48 … 400 px."""
    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            photo = photos[(c * per_class + i) % len(photos)]
            h, w = photo.shape[:2]
            ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            img = Image.fromarray(photo[top:top + ch, left:left + cw])
            aspect, side = rng.uniform(0.5, 2.0), int(rng.integers(48, 401))
            size = (side, max(8, int(side / aspect))) if aspect >= 1 else (max(8, int(side * aspect)), side)
            img.resize(size, Image.BICUBIC).save(root / cls / f"{cls}_{i:04d}.JPEG", quality=90)
    return root


def train_cmd(run: Path, teacher: Path, data: Path, res: int, preset: str, procs: int) -> list[str]:
    """The README's ImageNet command with the rehearsal's caps (a checkpoint after every step, no loader process)."""
    cmd = [sys.executable, "-m", "pagoda.cli", "train", "--res", str(res), "--data", str(data), "--teacher", str(teacher),
           "--preset", preset, "--out", str(run), "--max-steps", str(STEPS), "--max-batch", str(BATCH),
           "--encode-images", str(ENCODE_IMAGES), "--encode-steps", "2", "--ckpt-every", "1", "--workers", "0",
           "--no-progress"]  # --workers 0: a forked loader process would hold gigabytes of the parent's pages
    return cmd + (["--gpus", "0", "--procs", str(procs)] if procs > 1 else [])


def steps_logged(stage: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]


def rehearse(tmp: Path, unet: str, preset: str, procs: int = 1) -> dict:
    """Teacher file and JPEG folder → train, SIGKILL, resume → sample → invert; checks each product. Returns
    seconds and the peak RSS (GiB) of the largest single process (the training's, or this one's for sample/invert)."""
    t0 = time.perf_counter()
    t_res = PRESETS[unet].resolution
    res = 2 * t_res
    teacher = public_teacher(tmp / "edm_imagenet64_ema.pt", unet)
    raw = torch.load(teacher, weights_only=True)
    assert "kind" not in raw and all(torch.is_tensor(v) for v in raw.values())
    if unet == "imagenet64" and FIX.is_dir():  # key for key, shape for shape the public file's table
        rows = [ln.split("\t") for ln in (FIX / "adm_imagenet64_state_dict.tsv").read_text().strip().splitlines()]
        assert [(k, str(tuple(v.shape))) for k, v in raw.items()] == [(k, s) for k, s in rows]
    del raw
    data = jpeg_folder(tmp / "imagenet")
    run, s_lo, s_hi = tmp / "run", tmp / "run" / f"stage-{t_res:02d}", tmp / "run" / f"stage-{res:02d}"
    cmd = train_cmd(run, teacher, data, res, preset, procs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGODA_DIST_TIMEOUT": "3600"}

    # 1. killed (SIGKILL, rank 0) at the start of stage-RES step 1: its checkpoint of step 1 is on disk
    p = subprocess.run(cmd, env={**env, "PAGODA_TEST_FAULT": f"0:{s_hi.name}:1:kill"}, cwd=ROOT, capture_output=True,
                       text=True)
    out = p.stdout + p.stderr[-3000:]
    assert (p.returncode == -signal.SIGKILL) if procs == 1 else (p.returncode == 2 and "killed by signal 9" in out), out
    assert (s_lo / "generator.pt").is_file() and not (s_hi / "generator.pt").exists()
    assert load_checkpoint(s_hi / "checkpoint.pt")["step"] == 1 and steps_logged(s_hi) == [1]
    info, z, labels, _ = read_cache(run / "latents")
    assert info.num_images == ENCODE_IMAGES and z.shape == (ENCODE_IMAGES, 2, 3 if unet == "imagenet64" else 1,
                                                              t_res, t_res)
    assert torch.isfinite(z).all() and set(labels.tolist()) <= set(range(len(CLASSES)))
    finished = (s_lo / "generator.pt").stat().st_mtime_ns

    # 2. resumed: stage-RES goes on at step 1 (nothing redone), to the cap
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and "run finished" in p.stdout, p.stdout + p.stderr[-3000:]
    assert (s_lo / "generator.pt").stat().st_mtime_ns == finished and steps_logged(s_lo) == [1, 2]
    assert steps_logged(s_hi) == [1, 2] and load_checkpoint(s_hi / "checkpoint.pt")["step"] == STEPS
    config = json.loads((run / "config.json").read_text())
    assert [(s["resolution"], s["steps"], s["batch"]) for s in config["stages"]] == [(t_res, STEPS, BATCH),
                                                                                    (res, STEPS, BATCH)]
    G = Generator.from_checkpoint(s_hi / "generator.pt")
    T = load_teacher(teacher)
    assert G.resolution == res and G.base_resolution == T.resolution == t_res
    assert sum(p.numel() for p in G.parameters()) > sum(p.numel() for p in T.parameters())
    del G, T
    train_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20

    # 3. sample and invert the run (its teacher: the --teacher file recorded in config.json)
    r = runner.invoke(app, ["sample", "--checkpoint", str(run), "--n", "2", "--batch", "2", "--out", str(tmp / "s.png")])
    assert r.exit_code == 0, r.output
    scale, ncls = max(1, 64 // res), PRESETS[unet].num_classes
    grid = Image.open(tmp / "s.png")
    assert grid.height == res * scale and grid.width == res * scale * (ncls if ncls <= 16 else 2)
    photo = tmp / "photo.jpg"
    photo.write_bytes(next((data / CLASSES[1]).iterdir()).read_bytes())
    r = runner.invoke(app, ["invert", str(photo), "--checkpoint", str(run), "--class", "1", "--out", str(tmp / "inv")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp / "inv" / "photo_reconstruction.png").size == (res, res)
    psnr = json.loads((tmp / "inv" / "photo_psnr.json").read_text())
    assert psnr["full_res"] == res and psnr["teacher_res"] == t_res and psnr["label"] == 1
    assert all(math.isfinite(psnr[k]) and 0 < psnr[k] < 100 for k in ("psnr_full_res", "psnr_teacher_res"))
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": time.perf_counter() - t0, "train_rss_gib": train_rss, "sample_invert_rss_gib": self_rss}


@pytest.mark.parametrize("procs", [1, 2])  # ≈ 20 s and 40 s (2 shared cores)
def test_rehearsal_tiny(tmp_path, procs):
    """The rehearsal with the `tiny` UNet (8 px teacher, grey) and preset: the whole path in seconds, one process and two."""
    rehearse(tmp_path, "tiny", "tiny", procs)


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


TRUE_SIZE_GIB = 16  # peak RSS of one true-size training process is ≈ 14 GiB (README); each rank holds a full copy


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_rehearsal_imagenet64_true_size(tmp_path, procs):
    """The README's ImageNet command at true size (296 M parameters) on the CPU, one process and two (gloo)."""
    if _available_gib() < procs * TRUE_SIZE_GIB:
        pytest.skip(f"{procs} true-size process(es) need ≈ {procs * TRUE_SIZE_GIB} GiB free, "
                    f"this machine has {_available_gib():.0f}")
    result = rehearse(tmp_path, "imagenet64", "imagenet64", procs)
    print(f"\nrehearsal, {procs} process(es): {result['seconds'] / 60:.1f} min, peak RSS "
          f"{result['train_rss_gib']:.1f} GiB (training), {result['sample_invert_rss_gib']:.1f} GiB (sample + invert)")
