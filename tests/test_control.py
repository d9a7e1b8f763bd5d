"""Exports for external evaluators (pagoda sample / teacher sample --outdir / --npz) and the inverse problems of
pagoda/control.py (superres, edit, interpolate, inpaint), on the tiny 8 → 16 px run of tests/helpers.py."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pagoda.control as control
from pagoda.control import blur_fill, hole_psnr, inpaint_images, slerp
from pagoda.data import load_fashion_mnist
from pagoda.images import load_image, load_mask, resample, tensor_to_pil, to_uint8
from pagoda.dist import DistInfo
from pagoda.encoder import Encoder, LatentPairs, psnr
from pagoda.grow import PRESETS, plan_stages
from pagoda.inference import NpzExport, encode_images, load_models, make_sampler
from pagoda.stage import RunSpec, StageTrainer
from pagoda.decoder import load_generator
from pagoda.rundir import model_file
from pagoda.train import TrainConfig, train

from helpers import build_tiny_run, invoke, ok, one_line_error

def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Two Fashion-MNIST test images as 32×32 grey PNGs."""
    x, _ = load_fashion_mnist("test")
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / f"test{i}.png" for i in (0, 1)]
    for i, p in enumerate(paths):
        tensor_to_pil(x[i]).save(p)
    return paths


# ---- export --------------------------------------------------------------------------------------

SAMPLERS = {"generator": ("sample",), "teacher": ("teacher", "sample", "--steps", 3, "--guidance", 2)}
LINE = re.compile(r"^wrote (\d+) images to .* \((\d+) new, [\d.]+ images/s, (\d+) NFE per image\)$", re.M)


def export(kind: str, run: Path, out: Path, n: int, *extra) -> tuple[int, int]:
    """Export n images of `kind` to out/ and out.npz; returns (new images, NFE) from the summary line."""
    checkpoint = run if kind == "generator" else run / "teacher" / "teacher.pt"
    text = ok(invoke(*SAMPLERS[kind], "--checkpoint", checkpoint, "--n", n, "--outdir", out,
                     "--npz", out.with_suffix(".npz"), "--batch", 4, "--no-progress", *extra))
    m = LINE.search(text)
    assert m and int(m[1]) == n, text
    return int(m[2]), int(m[3])


def npz(out: Path) -> dict[str, np.ndarray]:
    with np.load(out.with_suffix(".npz")) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("kind, res, nfe", [("generator", 16, 1), ("teacher", 8, 5)])
def test_export_prefix_is_the_same_bytes(tiny_run, tmp_path, kind, res, nfe):
    assert export(kind, tiny_run, tmp_path / "a", 10) == (10, nfe)
    export(kind, tiny_run, tmp_path / "b", 20)
    a, b = npz(tmp_path / "a"), npz(tmp_path / "b")
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (10, res, res, 1)  # NHWC, grey: C = 1
    assert a["arr_1"].dtype == np.int64 and a["arr_1"].tolist() == list(range(10))  # label i mod 10
    assert np.array_equal(a["arr_0"], b["arr_0"][:10]) and np.array_equal(b["arr_1"], np.arange(20) % 10)
    for i in range(10):  # the PNGs hold the same pixels as the .npz, and n = 10 / 20 share their bytes
        assert (tmp_path / "a" / f"{i:06d}.png").read_bytes() == (tmp_path / "b" / f"{i:06d}.png").read_bytes()
        assert np.array_equal(pixels(tmp_path / "a" / f"{i:06d}.png"), a["arr_0"][i, ..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.npz", "b", "b.npz"]  # FILE.parts/ removed
    assert len(set(map(bytes, b["arr_0"]))) == 20  # distinct images


def test_export_resumes_with_the_same_bytes(tiny_run, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    export("generator", tiny_run, fresh, 10)
    out = tmp_path / "out"
    # killed after two of three blocks (npz side), then one PNG deleted, one PNG and one part torn: resumed
    writes = []
    real = NpzExport.write

    def crash_on_third(self, i, images, todo):  # the .npz side is killed after two blocks
        if len(writes) == 2:
            raise RuntimeError("killed")
        writes.append(i)
        real(self, i, images, todo)

    monkeypatch.setattr(NpzExport, "write", crash_on_third)
    one_line_error(invoke("sample", "--checkpoint", tiny_run, "--n", 10, "--outdir", out, "--npz",
                          out.with_suffix(".npz"), "--batch", 4, "--no-progress"), "killed")
    monkeypatch.undo()
    parts = tmp_path / "out.npz.parts"
    assert sorted(p.name for p in parts.glob("block-*")) == ["block-000000000.npz", "block-000000004.npz"]
    assert not out.with_suffix(".npz").exists()
    assert sorted(int(p.stem) for p in out.glob("*.png")) == list(range(10))  # the PNG side finished
    (out / "000002.png").unlink()
    (out / "000005.png").write_bytes((out / "000005.png").read_bytes()[:30])  # torn
    (parts / "block-000000004.npz").write_bytes(b"torn")
    new, _ = export("generator", tiny_run, out, 10)
    assert new == 7  # 0002 and 0005 (PNG), 4-7 and 8-9 (npz): images 2, 4, 5, 6, 7, 8, 9
    for i in range(10):
        assert (out / f"{i:06d}.png").read_bytes() == (fresh / f"{i:06d}.png").read_bytes()
    assert all(np.array_equal(npz(out)[k], npz(fresh)[k]) for k in ("arr_0", "arr_1"))
    assert not parts.exists()


def test_export_refuses_other_settings_and_foreign_folders(tiny_run, tmp_path):
    out = tmp_path / "out"
    export("generator", tiny_run, out, 4)
    base = ("sample", "--checkpoint", tiny_run, "--n", 4, "--no-progress", "--outdir", out)
    one_line_error(invoke(*base, "--seed", 1), "another config", "seed: 0 vs 1")
    # another --batch resumes: image i's bytes depend on (seed, i) only
    first = (out / "000001.png").read_bytes()
    (out / "000001.png").unlink()
    ok(invoke(*base, "--batch", 3))
    assert (out / "000001.png").read_bytes() == first
    one_line_error(invoke(*base, "--checkpoint", tiny_run / "stage-08"), "model")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    Image.new("L", (4, 4)).save(foreign / "1.png")
    one_line_error(invoke("sample", "--checkpoint", tiny_run, "--outdir", foreign), "did not write")
    one_line_error(invoke("sample", "--checkpoint", tiny_run, "--npz", tmp_path / "x.npz", "--class", 10), "--class 10")


def test_export_rgb_class_and_other_batch(tiny_run, tmp_path):
    export("generator", tiny_run, tmp_path / "a", 10)
    export("generator", tiny_run, tmp_path / "rgb", 10, "--rgb", "--class", 3)
    rgb, a = npz(tmp_path / "rgb"), npz(tmp_path / "a")
    assert rgb["arr_0"].shape == (10, 16, 16, 3) and (rgb["arr_0"] == rgb["arr_0"][..., :1]).all()
    assert rgb["arr_1"].tolist() == [3] * 10
    with Image.open(tmp_path / "rgb" / "000000.png") as im:
        assert im.mode == "RGB"
    assert np.array_equal(rgb["arr_0"][3, ..., :1], a["arr_0"][3])  # image 3 has class 3 either way
    # another --batch, or a share of the images as a rank takes it: the same bytes
    ok(invoke("sample", "--checkpoint", tiny_run, "--n", 10, "--npz", tmp_path / "c.npz", "--batch", 3, "--no-progress"))
    c = npz(tmp_path / "c")
    assert np.array_equal(c["arr_0"], a["arr_0"]) and np.array_equal(c["arr_1"], a["arr_1"])
    generate = make_sampler("generator", load_generator(model_file(tiny_run)))
    whole, share = generate(0, 70), torch.cat([generate(5, 62), generate(67, 3)])  # across a 64-image call
    assert torch.equal(share, whole[5:]) and np.array_equal(to_uint8(whole[:10]), a["arr_0"])
    # the default grid shows the same images: one row of 10 classes, 16 px ×4
    ok(invoke("sample", "--checkpoint", tiny_run, "--n", 10, "--out", tmp_path / "grid.png"))
    grid = pixels(tmp_path / "grid.png")[::4, ::4].reshape(16, 10, 16).transpose(1, 0, 2)
    assert np.abs(grid.astype(int) - a["arr_0"][..., 0]).max() <= 1


# ---- the ω-conditioned one-step generator (--guidance-max) ----------------------------------------

@pytest.fixture(scope="module")
def guided_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's teacher and latent cache, its stages retrained with --guidance-max 3."""
    run = tmp_path_factory.mktemp("guided")
    for sub in ("teacher", "latents"):
        shutil.copytree(tiny_run / sub, run / sub)
    train(TrainConfig(out=str(run), res=16, teacher_preset="tiny", preset="tiny", encode_images=16, encode_steps=4,
                      guidance_max=3.0, ckpt_every=100), progress=False)
    return run


def test_guided_generator_learns_omega_and_samples_in_one_call(guided_run, tiny_run, tmp_path):
    pool = torch.load(guided_run / "teacher-samples.pt", weights_only=True)
    assert pool["meta"]["guidance_max"] == 3.0 and 1 <= pool["omega"].min() and pool["omega"].max() <= 3
    G, _ = load_models(str(guided_run))
    assert G.resolution == 16 and G.unet.config.guidance_embed
    z, y = G.sigma_max * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(4) % 2
    with torch.no_grad():
        assert torch.equal(G(z, y, torch.ones(4)), G(z, y))  # ω = 1 is the unguided call
        # the zero-initialised ω embedding has been trained (by RAdam's first, un-rectified steps only: a tiny change)
        assert not torch.equal(G(z, y, torch.full((4,), 3.0)), G(z, y))
    assert G.unet.guidance_embed[2].weight.abs().max() > 0
    ok(invoke("sample", "--checkpoint", guided_run, "--n", 4, "--guidance", 2, "--out", tmp_path / "g.png"))
    assert pixels(tmp_path / "g.png").size
    export("generator", guided_run, tmp_path / "w2", 4, "--guidance", 2)
    assert json.loads((tmp_path / "w2" / "export.json").read_text())["guidance"] == 2.0
    one_line_error(invoke("sample", "--checkpoint", tiny_run, "--n", 4, "--guidance", 2, "--out", tmp_path / "x.png"),
                   "no guidance embedding", "--guidance-max")


# ---- super-resolution, class transfer, interpolation ----------------------------------------------

def test_growth_stage_with_an_anchor_trains_without_distillation(guided_run, tmp_path):
    """L_dstl (β = 3 with --guidance-max) runs in stage-08 and in growth stages without an anchor; a growth stage
    with an anchor keeps ↓G(z', y', ω') on the ω-conditioned stage-08 G instead, so it has no L_dstl and never
    solves the teacher ODE (docs/ablations.md, Guidance: with both, G32 FID at ω = 1 was 132 instead of ≈ 82)."""
    G8, teacher = load_models(str(guided_run / "stage-08"))
    shutil.copytree(guided_run / "stage-08", tmp_path / "stage-08")
    data = SimpleNamespace(images=torch.rand(8, 1, 16, 16) * 2 - 1, in_memory=True,
                           batch=lambda i: (data.images[i], data.labels[i]), labels=torch.arange(8) % 10)
    pairs = LatentPairs(80 * torch.randn(8, 2, 1, 8, 8), torch.arange(8), torch.arange(8) % 10, data)
    cfg = TrainConfig(guidance_max=3.0, augment="")
    trainers = {}
    for a in (0.0, 2.0):
        stage = plan_stages(8, 16, replace(PRESETS["tiny"], batch=(4,), anchor=a))[1]
        trainers[a] = StageTrainer(RunSpec.of(cfg), stage, 1, teacher, G8, pairs, tmp_path / "stage-16", DistInfo())
    assert trainers[0.0].beta == 3.0 and trainers[0.0].teacher_samples is not None
    assert trainers[2.0].beta == 0.0 and trainers[2.0].teacher_samples is None and trainers[2.0].G_base is not None
    stats = trainers[2.0].train_step()
    assert stats["rec"] > 0 and "dstl" not in stats and not (tmp_path / "teacher-samples.pt").exists()
    logged = trainers[0.0].train_step()  # L_dstl logged on its own, not inside L_rec
    assert logged["dstl"] > 0 and logged["rec"] > 0 and (tmp_path / "teacher-samples.pt").is_file()


def test_superres_encodes_once_and_reports_bicubic(tiny_run, images, tmp_path, monkeypatch):
    low, ref = tmp_path / "low.png", images[0]
    Image.open(ref).resize((11, 9)).save(low)  # any size and aspect
    calls = []
    real = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, x, y=None: calls.append(len(x)) or real(self, x, y))
    text = ok(invoke("superres", low, "--reference", ref, "--checkpoint", tiny_run, "--out", tmp_path / "sr"))
    assert calls == [10]  # one encode: the image under each of the 10 classes, in one batch
    r = json.loads((tmp_path / "sr" / "low_superres.json").read_text())
    assert f"PSNR {r['psnr']:.2f} dB vs bicubic {r['psnr_bicubic']:.2f} dB" in text
    x_lo, x_ref = load_image(low, 8, 1)[None], load_image(ref, 16, 1)[None]
    assert r["psnr_bicubic"] == pytest.approx(float(psnr(resample(x_lo, 16), x_ref)[0]), abs=1e-4)
    sr = torch.from_numpy(pixels(r["output"])).float()[None, None] / 127.5 - 1
    assert sr.shape == (1, 1, 16, 16) and abs(float(psnr(sr, x_ref)[0]) - r["psnr"]) < 0.3
    with Image.open(r["side_by_side"]) as im:
        assert im.size == (4 * 128, 128)  # low | bicubic | G | reference, ×8
    calls.clear()
    ok(invoke("superres", low, "--class", 4, "--checkpoint", tiny_run, "--out", tmp_path / "sr4"))
    assert calls == [1] and json.loads((tmp_path / "sr4" / "low_superres.json").read_text())["label"] == 4


def test_edit_to_its_own_class_is_the_reconstruction(tiny_run, images, tmp_path):
    ok(invoke("invert", images[0], "--checkpoint", tiny_run, "--out", tmp_path / "inv"))
    label = json.loads((tmp_path / "inv" / "test0_psnr.json").read_text())["label"]
    rec = (tmp_path / "inv" / "test0_reconstruction.png").read_bytes()
    ok(invoke("edit", images[0], "--to-class", label, "--checkpoint", tiny_run, "--out", tmp_path))
    assert (tmp_path / f"test0_to{label}.png").read_bytes() == rec
    other = (label + 1) % 10
    text = ok(invoke("edit", images[0], "--to-class", other, "--checkpoint", tiny_run, "--out", tmp_path))
    assert text.startswith(f"class {label} -> {other}")
    assert (tmp_path / f"test0_to{other}.png").read_bytes() != rec
    one_line_error(invoke("edit", images[0], "--to-class", 10, "--checkpoint", tiny_run), "--class 10")


def test_slerp_ends_exactly_and_keeps_the_norm():
    a, b = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80
    b = b * a.norm() / b.norm()
    t = torch.linspace(0, 1, 7)
    z = slerp(a, b, t)
    assert torch.equal(z[0], a) and torch.equal(z[-1], b)
    torch.testing.assert_close(z.flatten(1).norm(dim=1), a.norm().expand(7), rtol=1e-5, atol=0)
    torch.testing.assert_close(slerp(a, a, t), a.expand(7, -1, -1, -1))  # θ = 0: the straight line


def test_interpolate_end_frames_are_the_reconstructions(tiny_run, images, tmp_path, monkeypatch):
    real = encode_images

    def classes_0_and_1(G, D, x, class_=None, steps=40, prompt=None):  # force two different classes: the soft-label path
        z = torch.cat([real(G, D, x[k:k + 1], k, steps)[0] for k in range(2)])
        return z, torch.tensor([0, 1])

    monkeypatch.setattr(control, "encode_images", classes_0_and_1)
    text = ok(invoke("interpolate", *images, "--steps", 5, "--checkpoint", tiny_run, "--out", tmp_path))
    assert text.startswith("classes 0 -> 1  5 frames")
    strip = pixels(tmp_path / "test0_test1_interpolation.png")
    assert strip.shape == (16, 5 * 16)
    frames = [strip[:, 16 * k:16 * (k + 1)] for k in range(5)]
    G, D = load_models(str(tiny_run))
    x = torch.cat([load_image(p, 16, 1)[None] for p in images])
    z, y = classes_0_and_1(G, D, x)
    with torch.no_grad():
        rec = [to_uint8(G(z[k:k + 1], y[k:k + 1]).clamp(-1, 1))[0, ..., 0] for k in range(2)]
    assert np.array_equal(frames[0], rec[0]) and np.array_equal(frames[-1], rec[1])
    assert not np.array_equal(frames[2], rec[0]) and not np.array_equal(frames[2], rec[1])
    one_line_error(invoke("interpolate", images[0], tmp_path / "nope.png", "--checkpoint", tiny_run), "nope.png")


# ---- inpainting ----------------------------------------------------------------------------------

def test_blur_fill_keeps_known_pixels_and_stays_in_their_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    m = (torch.rand(3, 1, 16, 16, generator=g) > 0.6).float()
    m[0, :, 4:12, 4:12] = 0  # a big hole
    f = blur_fill(x, m)
    assert torch.equal(f * m, x * m)
    known = [x[i][m[i] > 0] for i in range(3)]
    assert all(f[i].min() >= known[i].min() - 1e-6 and f[i].max() <= known[i].max() + 1e-6 for i in range(3))
    assert torch.allclose(blur_fill(torch.full_like(x, 0.3), m), torch.full_like(x, 0.3))
    assert hole_psnr(f, x, m).shape == (3,)


def test_inpaint_keeps_known_pixels_exactly(tiny_run, images, tmp_path):
    mask = tmp_path / "mask.png"
    a = np.full((30, 50), 255, np.uint8)
    a[8:20, 18:30] = 0  # a hole in the centre of the 30×30 centre square
    Image.fromarray(a).convert("RGBA").save(mask)
    m = load_mask(mask, 16)
    assert m.shape == (1, 16, 16) and 0 < m.mean() < 1 and m[0, 0, 0] == 1 and m[0, 7, 7] == 0
    text = ok(invoke("inpaint", images[0], "--mask", mask, "--iters", 3, "--checkpoint", tiny_run, "--out", tmp_path))
    r = json.loads((tmp_path / "test0_inpainted.json").read_text())
    assert text.startswith(f"class {r['label']}  hole {100 * r['hole_fraction']:.0f}%")
    out, x = pixels(r["output"]), to_uint8(load_image(images[0], 16, 1))[..., 0]
    known = m[0].numpy() > 0
    assert np.array_equal(out[known], x[known]) and not np.array_equal(out[~known], x[~known])
    # the API on a batch: known pixels exact (not rounded), for any number of Adam steps
    G, D = load_models(str(tiny_run))
    xb = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    filled, y = inpaint_images(G, D, xb, m[None], class_=2, iters=2, steps=4)
    assert torch.equal(filled * m, xb * m) and y.tolist() == [2, 2]
    white = tmp_path / "white.png"
    Image.new("L", (5, 5), 255).save(white)
    one_line_error(invoke("inpaint", images[0], "--mask", white, "--checkpoint", tiny_run), "all white")
    one_line_error(invoke("inpaint", images[0], "--mask", tmp_path / "none.png", "--checkpoint", tiny_run), "none.png")
