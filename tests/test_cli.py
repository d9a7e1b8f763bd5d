"""The `pagoda` command line through typer's CliRunner, on the toy run of tests/conftest.py::toy_run.

Every command writes what it says it wrote, prints parseable lines (paths never wrapped), shows examples
in --help, and answers bad input with exit code 2 and one line (never a traceback).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from typer.main import get_command

from pagoda.cli import app
from pagoda.data import load_fashion_mnist, make_dataset
from pagoda.images import downsample, load_image, tensor_to_pil
from pagoda.encoder import Encoder, psnr
from pagoda.teacher import load_teacher

from helpers import invoke, ok, one_line_error, read_cache

def png(path) -> np.ndarray:
    """A grayscale PNG as a float array in [-1, 1] (the writers' 8-bit mapping inverted)."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L", (im.format, im.mode)
        return np.asarray(im, dtype=np.float64) / 127.5 - 1


def tiles(grid: np.ndarray, res: int, scale: int, n: int) -> torch.Tensor:
    """The n res×res images of a one-row grid upscaled ×scale (nearest), as (n, 1, res, res)."""
    small = grid[::scale, ::scale]
    assert small.shape == (res, n * res)
    return torch.from_numpy(small.reshape(res, n, res).transpose(1, 0, 2).copy())[:, None]


@pytest.fixture(scope="module")
def fashion_pngs(tmp_path_factory):
    """Three Fashion-MNIST *test-split* images as 32×32 PNGs (28×28 padded, as pagoda reads the data set)."""
    x, y = load_fashion_mnist("test")
    folder = tmp_path_factory.mktemp("fashion")
    out = []
    for i in (0, 1, 2):
        path = folder / f"test{i}.png"
        tensor_to_pil(x[i]).save(path)
        out.append((path, int(y[i])))
    return out


# ---- help and errors -----------------------------------------------------------------------------

def _commands(group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


COMMANDS = list(_commands(get_command(app)))


def test_all_commands_are_listed():
    names = {" ".join(c) for c in COMMANDS}
    assert {"train", "sample", "invert", "encode", "teacher train", "teacher sample"} <= names


def test_export_and_control_commands_are_listed():
    assert {"superres", "edit", "interpolate", "inpaint"} <= {" ".join(c) for c in COMMANDS}
    for command in (["sample"], ["teacher", "sample"]):
        out = ok(invoke(*command, "--help"))
        assert all(flag in out for flag in ("--outdir", "--npz", "--batch", "--rgb")), out
        assert "grey images have C = 1" in re.sub(r"[│\s]+", " ", out), out  # help text rewrapped in a box


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_examples(command):
    out = ok(invoke(*command, "--help"))
    assert re.search(r"Examples?:", out), out
    assert re.search(r"^\s*pagoda " + re.escape(" ".join(command)) + r"\b", out, re.M), out


@pytest.mark.parametrize("args, message", [
    (["sample", "--bogus"], "No such option: --bogus"),
    (["sample", "--n", "0"], "--n"),
    (["sample", "--n", "many"], "--n"),
    (["encode", "--out", "x"], "--teacher"),  # a required option missing
    (["teacher", "train", "--steps", "0"], "--steps"),
    (["invert"], "Missing argument"),
    (["frobnicate"], "No such command"),
    (["train", "--grow-width", "wide"], "--grow-width 'wide' is not a width schedule: use constant, halve"),
])
def test_bad_flags_exit_2_without_traceback(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in result.output


def test_missing_and_wrong_files_give_one_line(toy_run, tmp_path):
    run, missing = toy_run.path, tmp_path / "missing"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG")
    one_line_error(invoke("sample", "--checkpoint", missing, "--out", tmp_path / "s.png"), str(missing))
    one_line_error(invoke("sample", "--checkpoint", tmp_path, "--out", tmp_path / "s.png"), "no finished stage")
    one_line_error(invoke("invert", missing / "photo.png", "--checkpoint", run), "photo.png", "not found")
    one_line_error(invoke("invert", not_an_image, "--checkpoint", run, "--out", tmp_path), "notes.png")
    one_line_error(invoke("invert", tmp_path, "--checkpoint", run), "directory")
    one_line_error(invoke("teacher", "sample", "--checkpoint", missing, "--out", tmp_path / "t.png"), str(missing))
    one_line_error(invoke("encode", "--teacher", missing, "--out", tmp_path / "lat"), str(missing))
    # a checkpoint of the wrong kind is named as such (a generator has its teacher's parameter names)
    one_line_error(invoke("sample", "--checkpoint", toy_run.teacher, "--out", tmp_path / "s.png"), "not a generator")
    gen8 = run / "stage-08" / "generator.pt"
    one_line_error(invoke("teacher", "sample", "--checkpoint", gen8, "--out", tmp_path / "t.png"), "not a teacher")
    one_line_error(invoke("invert", not_an_image, "--checkpoint", run, "--teacher", gen8), "not a teacher")
    # bad values
    one_line_error(invoke("sample", "--checkpoint", run, "--class", 12, "--out", tmp_path / "s.png"), "--class 12")
    one_line_error(invoke("teacher", "sample", "--checkpoint", toy_run.teacher, "--method", "rk4", "--n", 2,
                          "--out", tmp_path / "t.png"), "rk4")
    one_line_error(invoke("teacher", "train", "--preset", "huge", "--out", tmp_path / "t"), "huge")
    lat = tmp_path / "lat"
    one_line_error(invoke("encode", "--teacher", toy_run.teacher, "--out", lat, "--dtype", "float64"), "float64")
    assert not (lat / "index.json").exists()  # refused before the cache was started
    assert [p.name for p in tmp_path.iterdir()] == ["notes.png"]  # none of these wrote anything


# ---- every checkpoint option takes a run directory ---------------------------------------------------

def _checkpoint_options():
    """(command, option) for every option of the CLI that names a model file."""
    return sorted((" ".join(c), f"--{p.name}") for c in COMMANDS for p in _command(c).params
                  if p.name in ("checkpoint", "teacher"))


def _command(path):
    cmd = get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def test_every_checkpoint_option_takes_a_run_directory(toy_run, tmp_path, monkeypatch):
    """A run directory (or its teacher/ or a stage-XX/) wherever a checkpoint is asked for: teacher options read
    RUN/teacher/teacher.pt, generator options the last finished stage."""
    from pagoda import metrics as M
    from helpers import StandInInception
    monkeypatch.setattr(M, "load_inception", lambda *a, **k: StandInInception())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run, img = toy_run.path, tmp_path / "x.png"
    tensor_to_pil(load_fashion_mnist("test")[0][0]).save(img)
    out = lambda name: tmp_path / name  # noqa: E731
    runs = {  # (command, option): the command with a run directory for that option
        ("train", "--teacher"): ["train", "--teacher", run, "--preset", "tiny", "--res", 16, "--dry-run", "--out", out("t")],
        ("sample", "--checkpoint"): ["sample", "--checkpoint", run, "--n", 4, "--out", out("s.png")],
        ("invert", "--checkpoint"): ["invert", img, "--checkpoint", run, "--out", out("i1")],
        ("invert", "--teacher"): ["invert", img, "--checkpoint", run / "stage-16" / "generator.pt", "--teacher", run,
                                  "--out", out("i2")],
        ("superres", "--checkpoint"): ["superres", img, "--checkpoint", run, "--teacher", run / "teacher", "--out", out("r")],
        ("superres", "--teacher"): ["superres", img, "--checkpoint", run, "--teacher", run, "--out", out("r")],
        ("edit", "--checkpoint"): ["edit", img, "--to-class", 3, "--checkpoint", run, "--out", out("e")],
        ("edit", "--teacher"): ["edit", img, "--to-class", 3, "--teacher", run / "stage-08", "--checkpoint", run,
                                "--out", out("e")],
        ("interpolate", "--checkpoint"): ["interpolate", img, img, "--steps", 2, "--checkpoint", run, "--out", out("p")],
        ("interpolate", "--teacher"): ["interpolate", img, img, "--steps", 2, "--checkpoint", run, "--teacher", run,
                                       "--out", out("p")],
        ("inpaint", "--checkpoint"): ["inpaint", img, "--mask", img, "--iters", 1, "--checkpoint", run, "--out", out("f")],
        ("inpaint", "--teacher"): ["inpaint", img, "--mask", img, "--iters", 1, "--checkpoint", run, "--teacher", run,
                                   "--out", out("f")],
        ("encode", "--teacher"): ["encode", "--teacher", run, "--out", out("lat"), "--n", 2, "--steps", 4],
        ("teacher sample", "--checkpoint"): ["teacher", "sample", "--checkpoint", run, "--n", 4, "--steps", 4,
                                             "--out", out("t1.png")],
        ("eval", "--checkpoint"): ["eval", "--checkpoint", run, "--n", 4, "--ref-n", 4, "--no-progress",
                                   "--out", out("eval.json")],
        ("serve", "--checkpoint"): ["serve", "--checkpoint", run],
        ("serve", "--teacher"): ["serve", "--checkpoint", run / "stage-16", "--teacher", run],
    }
    import pagoda.serve  # the server would run until stopped: build its models (pagoda.serve.App) and return
    monkeypatch.setattr(pagoda.serve, "serve", lambda cfg, ready: pagoda.serve.App(cfg))
    assert sorted(runs) == _checkpoint_options()  # a new checkpoint option needs its row here
    for (command, option), args in runs.items():
        ok(invoke(*args))
    # the run directory gives the very file: the same teacher samples as RUN/teacher/teacher.pt
    ok(invoke("teacher", "sample", "--checkpoint", toy_run.teacher, "--n", 4, "--steps", 4, "--out", out("t2.png")))
    assert np.array_equal(png(out("t1.png")), png(out("t2.png")))
    one_line_error(invoke("teacher", "sample", "--checkpoint", tmp_path, "--n", 4), str(tmp_path), "holds no teacher")
    one_line_error(invoke("encode", "--teacher", tmp_path, "--out", out("lat2")), str(tmp_path), "holds no teacher")


# ---- defaults come from the config and the registries ---------------------------------------------

def test_train_defaults_are_train_config_defaults():
    """Every `pagoda train` option that is a TrainConfig field defaults to that field's default; the others are
    the command's own (launch, dry run, progress)."""
    from dataclasses import MISSING, fields

    from pagoda.train import TrainConfig
    own = {"gpus", "procs", "threads", "dry_run", "dry_run_width", "progress", "resume"}
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert MISSING not in defaults.values()
    params = {p.name: p for p in _command(["train"]).params if p.name != "help"}
    assert set(params) - set(defaults) == own
    for name in set(params) & set(defaults):
        assert params[name].default == defaults[name], name


def test_help_lists_come_from_the_registries():
    """Adding a preset, a distance, a discriminator or a solver shows in --help without touching the CLI."""
    from pagoda.discriminators import DISCRIMINATORS
    from pagoda.grow import PRESETS
    from pagoda.losses import DISTANCES
    from pagoda.solvers import METHODS
    from pagoda.train import TEACHER_PRESETS
    helps = {(" ".join(c), p.name): p.help or "" for c in COMMANDS for p in _command(c).params}
    expect = {("train", "preset"): PRESETS, ("train", "teacher_preset"): TEACHER_PRESETS,
              ("teacher train", "preset"): TEACHER_PRESETS, ("train", "distance"): DISTANCES,
              ("train", "discriminator"): DISCRIMINATORS, ("teacher sample", "method"): METHODS,
              ("eval", "solver"): METHODS, ("encode", "method"): METHODS}
    for key, names in expect.items():
        assert all(name in helps[key] for name in names), (key, helps[key])


# ---- sample --------------------------------------------------------------------------------------

def test_sample_grid(toy_run, tmp_path):
    run = toy_run.path
    out = ok(invoke("sample", "--checkpoint", run, "--n", 20, "--out", tmp_path / "a.png"))
    assert out.strip() == f"wrote {tmp_path / 'a.png'}"
    grid = png(tmp_path / "a.png")
    assert grid.shape == (2 * 64, 10 * 64)  # 16-px images ×4, one class per column, 2 rows
    # a run directory samples its last finished stage: the same pixels as its stage-16 generator
    ok(invoke("sample", "--checkpoint", run / "stage-16" / "generator.pt", "--n", 20, "--out", tmp_path / "b.png"))
    assert np.array_equal(png(tmp_path / "b.png"), grid)
    # 16-px content (4×4 blocks are constant, 8×8 blocks are not), and an earlier stage by its directory
    assert np.array_equal(np.repeat(np.repeat(grid[::4, ::4], 4, 0), 4, 1), grid)
    assert not np.array_equal(np.repeat(np.repeat(grid[::8, ::8], 8, 0), 8, 1), grid)
    ok(invoke("sample", "--checkpoint", run / "stage-08", "--n", 20, "--out", tmp_path / "c.png"))
    g8 = png(tmp_path / "c.png")
    assert g8.shape == grid.shape and np.array_equal(np.repeat(np.repeat(g8[::8, ::8], 8, 0), 8, 1), g8)
    # seeds: the same seed gives the same grid, another seed another one
    ok(invoke("sample", "--checkpoint", run, "--n", 20, "--seed", 1, "--out", tmp_path / "d.png"))
    assert not np.array_equal(png(tmp_path / "d.png"), grid)
    # one class: a square grid
    ok(invoke("sample", "--checkpoint", run, "--n", 16, "--class", 3, "--out", tmp_path / "e.png"))
    assert png(tmp_path / "e.png").shape == (4 * 64, 4 * 64)


# ---- invert --------------------------------------------------------------------------------------

LINE = re.compile(r"^class (\d+)  PSNR (-?[\d.]+) dB at 8px, (-?[\d.]+) dB at 16px$", re.M)


def _invert(image: Path, run: Path, out: Path, *extra) -> dict:
    text = ok(invoke("invert", image, "--checkpoint", run, "--out", out, *extra))
    m = LINE.search(text)
    assert m, text
    stem = image.stem
    rec, sbs = out / f"{stem}_reconstruction.png", out / f"{stem}_side_by_side.png"
    assert f"wrote {rec} and {sbs}" in text.splitlines()  # one unwrapped line
    saved = json.loads((out / f"{stem}_psnr.json").read_text())
    label, p_lo, p_hi = int(m[1]), float(m[2]), float(m[3])
    assert (saved["label"], saved["teacher_res"], saved["full_res"]) == (label, 8, 16)
    assert (round(saved["psnr_teacher_res"], 2), round(saved["psnr_full_res"], 2)) == (p_lo, p_hi)
    # the printed PSNRs are those of the written reconstruction (8-bit PNG: within 0.3 dB)
    x16 = load_image(image, 16, 1)[None]
    r16 = torch.from_numpy(png(rec)).float()[None, None]
    assert r16.shape == (1, 1, 16, 16)
    assert abs(float(psnr(r16, x16)) - p_hi) < 0.3
    assert abs(float(psnr(downsample(r16, 8), downsample(x16, 8))) - p_lo) < 0.3
    with Image.open(sbs) as im:
        assert im.size == (3 * 128, 128)  # input | teacher-res input | reconstruction, ×8
    return {"label": label, "lo": p_lo, "hi": p_hi}


def test_invert_fashion_mnist_test_images(toy_run, fashion_pngs, tmp_path):
    got = [_invert(path, toy_run.path, tmp_path) for path, _ in fashion_pngs]
    # measured on test images 0-2: 22.7 / 22.4 / 23.2 dB at 8 px, 18.0 / 16.8 / 15.7 dB at 16 px, where the
    # best flat image scores 12.6 / 7.8 / 9.4 dB at 16 px
    assert all(g["lo"] > 18 and g["hi"] > 13 for g in got), got
    # without --class the class that reconstructs best is used: forcing another one is not better
    path, _ = fashion_pngs[0]
    other = (got[0]["label"] + 1) % 10
    forced = _invert(path, toy_run.path, tmp_path / "forced", "--class", other)
    assert forced["label"] == other and forced["lo"] <= got[0]["lo"]


def test_invert_rgb_photo(toy_run, tmp_path):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)  # 512×512 RGB
    # through the run's stage-16 checkpoint file (its teacher is found in the run directory)
    got = _invert(photo, toy_run.path / "stage-16" / "generator.pt", tmp_path / "inv")
    # RGB → the model's 1 channel (checked in _invert: the reconstruction is an L-mode 16×16 PNG).
    # A photo is far outside 64 Fashion-MNIST images: 12.7 dB at 8 px, 11.1 dB at 16 px measured, about what
    # the best flat image scores (13.9 / 12.6 dB); what is checked is the RGB path and the printed numbers.
    assert 6 < got["lo"] < 40 and 6 < got["hi"] < 40


# ---- teacher -------------------------------------------------------------------------------------

def test_teacher_train_cli(tmp_path):
    out = tmp_path / "teacher"
    args = ("teacher", "train", "--preset", "tiny", "--steps", 3, "--batch", 8, "--out", out, "--no-progress",
            "--device", "cpu")
    text = ok(invoke(*args))
    assert text.strip() == f"teacher: {out / 'teacher.pt'}"
    assert (out / "grid-000003.png").is_file() and (out / "checkpoint.pt").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["teacher"]["steps"], cfg["teacher"]["batch"], cfg["teacher"]["unet"]) == (3, 8, "tiny")
    D = load_teacher(out / "teacher.pt")
    assert (D.resolution, D.channels, D.unet.config.num_classes) == (8, 1, 10)
    stamp = (out / "teacher.pt").stat().st_mtime_ns
    assert ok(invoke(*args)) == text  # finished: returned, not retrained
    assert (out / "teacher.pt").stat().st_mtime_ns == stamp


@pytest.fixture(scope="module")
def teacher_reference(toy_run, tmp_path_factory):
    """Teacher samples for n=10, seed 0 on a fine grid (Heun, 40 points): the ODE solution to compare with."""
    out = tmp_path_factory.mktemp("teacher_ref") / "ref.png"
    text = ok(invoke("teacher", "sample", "--checkpoint", toy_run.teacher, "--n", 10, "--steps", 40, "--out", out))
    assert text.strip() == f"wrote {out} (79 NFE per image)"
    return tiles(png(out), 8, 8, 10)


@pytest.mark.parametrize("method, nfe", [("euler", 10), ("heun", 19), ("dpmpp_2m", 10)])
def test_teacher_sample_methods(toy_run, teacher_reference, tmp_path, method, nfe):
    out = tmp_path / f"{method}.png"
    text = ok(invoke("teacher", "sample", "--checkpoint", toy_run.teacher, "--n", 10, "--steps", 10,
                     "--method", method, "--out", out))
    assert text.strip() == f"wrote {out} ({nfe} NFE per image)"  # 10 Karras points + a final 0
    grid = png(out)
    assert grid.shape == (64, 640)  # 10 classes in a row, 8-px images ×8
    x = tiles(grid, 8, 8, 10)
    same, other = psnr(x, teacher_reference), psnr(x, teacher_reference.roll(1, 0))
    # each solver solves the same ODE from the same z: measured 29.5 (euler), 32.1 (heun), 33.2 (dpmpp_2m) dB
    # to the fine solution, 12-15 dB to the fine solution of another z
    assert same.mean() > 26 and same.mean() > other.mean() + 8


# ---- encode --------------------------------------------------------------------------------------

def test_encode_cli(toy_run, tmp_path):
    out = tmp_path / "latents"
    args = ("encode", "--teacher", toy_run.teacher, "--out", out, "--n", 12, "--steps", 6, "--batch", 5)
    text = ok(invoke(*args))
    assert text.strip().splitlines()[-1] == f"latent cache {out}: 12 images x 2 (flip), 1 shards"
    info, z, labels, idx = read_cache(out)
    assert (info.num_images, info.steps, info.method, info.dtype) == (12, 6, "heun", "float16")
    assert z.shape == (12, 2, 1, 8, 8) and torch.equal(idx, torch.arange(12))
    # the cache holds E(x) and E(flip(x)) of the training split at the teacher resolution (fp16 storage)
    data = make_dataset("fashion-mnist", 8)
    x, y = data.images[:4], torch.as_tensor(data.labels[:4])
    assert torch.equal(labels[:4], y)
    enc = Encoder(load_teacher(toy_run.teacher), 8, steps=6)
    torch.testing.assert_close(z[:4, 0], enc.encode(x, y), atol=0.1, rtol=2e-3)
    torch.testing.assert_close(z[:4, 1], enc.encode(x.flip(-1), y), atol=0.1, rtol=2e-3)
    shard = out / "shard-00000.pt"
    stamp = shard.stat().st_mtime_ns
    ok(invoke(*args))  # resumable: a finished shard is not recomputed
    assert shard.stat().st_mtime_ns == stamp


# ---- train ---------------------------------------------------------------------------------------

def test_train_cli_resumes_and_skips(toy_run, tmp_path):
    out = tmp_path / "run"
    base = ("train", "--res", 16, "--teacher", toy_run.teacher, "--preset", "tiny", "--encode-images", 8,
            "--encode-steps", 4, "--device", "cpu", "--no-progress", "--out", out)
    text = ok(invoke(*base, "--max-stages", 1))
    assert f"run finished: {out}" in text
    assert (out / "stage-08" / "generator.pt").is_file() and not (out / "stage-16").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["teacher"] == str(toy_run.teacher) and len(cfg["stages"]) == 2
    stamp = (out / "stage-08" / "generator.pt").stat().st_mtime_ns
    ok(invoke(*base))  # resume: stage-08 is done and kept, stage-16 is trained
    assert (out / "stage-08" / "generator.pt").stat().st_mtime_ns == stamp
    assert (out / "stage-16" / "generator.pt").is_file()
    one_line_error(invoke(*base, "--no-resume"), "--no-resume", "nothing was deleted")
    one_line_error(invoke(*base[:-1], tmp_path / "bad", "--res", 24), "--res 24", "8·2^k")
    # the toy run (trained by the test fixture) is finished: the CLI skips every stage of it
    run = tmp_path / "toy"
    shutil.copytree(toy_run.path, run)
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("stage-*/*.pt")}
    preset = toy_run.train_cfg.preset
    ok(invoke("train", "--res", 16, "--preset", "tiny", "--encode-images", preset.encode_images, "--encode-steps",
              preset.encode_steps, "--device", "cpu", "--no-progress", "--out", run))
    assert {p: p.stat().st_mtime_ns for p in run.glob("stage-*/*.pt")} == stamps and len(stamps) == 4
