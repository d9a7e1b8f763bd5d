"""Faults and bad input: dying ranks, NaN losses, torn checkpoint writes, unsafe pickles, and bad files or
options given to the CLI one by one (each a one-line error with exit code 2, nothing written earlier lost)."""
from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import tiny_assets

import pagoda.io as pio
from pagoda.cli import app
from pagoda.decoder import Generator
from pagoda.encoder import CacheInfo
from pagoda.io import CheckpointError, load_checkpoint, save_checkpoint, save_json
from pagoda.draws import Pairs
from pagoda.stage import StageTrainer
from pagoda.loop import TrainingError
from pagoda.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def one_line_error(result, *needles: str) -> str:
    """Exit code 2 and a single 'error: ...' line that contains every needle."""
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ---- dying ranks ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.mark.parametrize("action", ["raise", "kill"])
def test_a_failing_rank_stops_the_whole_job(tmp_path, assets, action):
    """Rank 1 raises (or SIGKILLs itself) at step 1: the job exits non-zero in bounded time, naming rank 1."""
    teacher, data = assets
    env = {**os.environ, "PAGODA_TEST_FAULT": f"1:stage-08:1:{action}", "OMP_NUM_THREADS": "1",
           "PAGODA_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "pagoda.cli", "train", "--gpus", "0", "--procs", "2", "--res", "8", "--preset", "tiny",
           "--data", str(data), "--teacher", str(teacher), "--out", str(tmp_path / "run"), "--encode-images", "0",
           "--encode-steps", "2", "--no-progress"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert p.returncode == 2, p.stdout + p.stderr
    assert time.monotonic() - t0 < 300
    err = [ln for ln in p.stdout.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "worker rank 1 of 2 failed" in err[0], p.stdout + p.stderr[-3000:]
    assert ("test fault" in err[0]) if action == "raise" else ("killed by signal 9" in err[0]), err[0]
    assert not (tmp_path / "run" / "stage-08" / "generator.pt").exists()


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path, assets, monkeypatch):
    teacher, data = assets
    real = StageTrainer.next_batches

    def poisoned(self):  # NaN target images from step 2 on (checkpoint written at step 2)
        g_batches, d_batches = real(self)
        return [Pairs(p.x * float("nan") if self.step >= 2 else p.x, p.z, p.y) for p in g_batches], d_batches
    monkeypatch.setattr(StageTrainer, "next_batches", poisoned)
    cfg = TrainConfig(out=str(tmp_path / "run"), data=str(data), res=8, teacher=str(teacher), preset="tiny",
                      encode_images=0, encode_steps=2, ckpt_every=2, device="cpu")
    with pytest.raises(TrainingError, match=r"loss rec = nan at step 2: training diverged; the last good checkpoint is kept"):
        train(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "run" / "stage-08" / "checkpoint.pt")
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in ck["G"].values())
    assert not (tmp_path / "run" / "stage-08" / "generator.pt").exists()


# ---- checkpoints -----------------------------------------------------------------------------------

def test_a_writer_dying_mid_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"w": torch.arange(10.0)}, tmp_path / "ck.pt")
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt  # as abrupt as Python gets
    monkeypatch.setattr(pio.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(10.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # the temp file is gone


KILLED_WRITER = r"""
import sys, time
from pathlib import Path
from pagoda.io import atomic_write_bytes
def write(f):
    f.write(b"\0" * (1 << 20))        # half of a checkpoint is on disk ...
    f.flush()
    Path(sys.argv[2]).touch()          # ... tell the test, then wait to be killed
    time.sleep(60)
atomic_write_bytes(sys.argv[1], write)
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint({"w": torch.arange(5.0)}, tmp_path / "ck.pt")
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(ready)], cwd=ROOT)
    try:
        t0 = time.monotonic()
        while not ready.exists():
            assert p.poll() is None and time.monotonic() - t0 < 120, "writer never started"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(5.0))
    assert len(list(tmp_path.glob(".ck.pt.*.tmp"))) == 1  # the torn temp file, never renamed over ck.pt


class _Touch:
    """Unpickling this would create a marker file (harmless stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Touch(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(evil)
    assert not marker.exists()
    res = runner.invoke(app, ["train", "--teacher", str(evil), "--out", str(tmp_path / "run"), "--no-progress"])
    one_line_error(res, str(evil), "refused for safety")
    assert not marker.exists()


# ---- bad input, one by one ---------------------------------------------------------------------------

def _png_header(w: int, h: int) -> bytes:
    """A 100-byte PNG that claims w x h pixels (IHDR, a token IDAT, IEND): only decoding would need the memory."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _bad_image(folder: Path, kind: str) -> Path:
    """A good image and one bad one (corrupt | truncated | empty | huge) in `folder`; returns the bad one."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.png"
    Image.fromarray(np.full((12, 12), 128, np.uint8), "L").save(good)
    raw = good.read_bytes()
    content = {"corrupt": raw[:16] + bytes(range(64)) + raw[80:], "truncated": raw[: len(raw) // 2], "empty": b"",
               "huge": _png_header(20000, 20000)}[kind]
    bad = folder / f"{kind}.png"
    bad.write_bytes(content)
    return bad


def _odd_images(folder: Path) -> dict[str, Path]:
    """Valid but unusual images: accepted (alpha over white, 16-bit scaled, upsampled, center-cropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    imgs = {"rgba": Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8), "RGBA"),
            "16bit": Image.fromarray(rng.integers(0, 65536, (10, 10), dtype=np.uint16)),
            "1x1": Image.fromarray(np.full((1, 1), 200, np.uint8), "L"),
            "nonsquare": Image.fromarray(rng.integers(0, 256, (9, 30, 3), dtype=np.uint8), "RGB")}
    out = {}
    for name, img in imgs.items():
        img.save(out.setdefault(name, folder / f"{name}.png"))
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, assets):
    """A run directory with a teacher and an (untrained) stage-08 generator: enough for invert and --out checks."""
    run = tmp_path_factory.mktemp("run")
    teacher, _ = assets
    (run / "teacher").mkdir()
    (run / "teacher" / "teacher.pt").write_bytes(Path(teacher).read_bytes())
    from pagoda.teacher import load_teacher
    save_checkpoint(Generator.from_teacher(load_teacher(teacher)).to_checkpoint(), run / "stage-08" / "generator.pt")
    # the run's latent cache was made by another teacher, and its config.json says so
    info = CacheInfo(16, 1024, 8, 1, 2, "heun", 0.002, 80.0, "float16", "another teacher")
    save_json(asdict(info), run / "latents" / "index.json")
    save_json({"train": {"teacher": "another.pt"}}, run / "config.json")
    return run


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "huge"])
def test_bad_image_in_data_dir_is_one_line_and_loses_nothing(tmp_path, assets, finished_run, kind):
    teacher, _ = assets
    bad = _bad_image(tmp_path / "data" / "c0", kind)
    before = snapshot(finished_run)
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "data"), "--teacher", str(teacher), "--res", "8",
                              "--preset", "tiny", "--out", str(finished_run), "--no-progress"])
    line = one_line_error(res, str(bad), "fix:")
    if kind == "huge":
        assert "refused before decoding" in line
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "huge"])
def test_bad_image_to_invert_is_one_line(tmp_path, finished_run, kind):
    bad = _bad_image(tmp_path / "imgs", kind)
    res = runner.invoke(app, ["invert", str(bad), "--checkpoint", str(finished_run), "--out", str(tmp_path / "inv")])
    line = one_line_error(res, str(bad), "fix:")
    assert ("refused before decoding" in line) == (kind == "huge")
    assert not (tmp_path / "inv").exists()


def test_odd_but_valid_images_are_accepted_by_invert_and_encode(tmp_path, assets, finished_run):
    teacher, _ = assets
    odd = _odd_images(tmp_path / "data" / "c0")
    for name, path in odd.items():
        res = runner.invoke(app, ["invert", str(path), "--checkpoint", str(finished_run), "--class", "0",
                                  "--out", str(tmp_path / "inv")])
        assert res.exit_code == 0, (name, res.output)
        assert Image.open(tmp_path / "inv" / f"{path.stem}_reconstruction.png").size == (8, 8)
    res = runner.invoke(app, ["encode", "--teacher", str(teacher), "--data", str(tmp_path / "data"),
                              "--out", str(tmp_path / "lat"), "--steps", "2"])
    assert res.exit_code == 0, res.output
    z = load_checkpoint(tmp_path / "lat" / "shard-00000.pt")["z"]
    assert z.shape == (4, 2, 1, 8, 8) and torch.isfinite(z.float()).all()


def test_bad_options_are_one_line_and_lose_nothing(tmp_path, assets, finished_run):
    teacher, data = assets
    before = snapshot(finished_run)
    base = ["train", "--teacher", str(teacher), "--data", str(data), "--preset", "tiny", "--no-progress"]
    # --res not teacher_res * 2^k
    one_line_error(runner.invoke(app, base + ["--res", "12", "--out", str(finished_run)]), "--res 12", "8·2^k", "16")
    # a checkpoint of another architecture / resolution as the teacher (a grown 16 px generator)
    gen = tmp_path / "gen16.pt"
    G = Generator.from_checkpoint(finished_run / "stage-08" / "generator.pt").grow(32, fade=False)
    save_checkpoint(G.to_checkpoint(), gen)
    one_line_error(runner.invoke(app, ["train", "--teacher", str(gen), "--data", str(data), "--res", "16", "--out",
                                       str(finished_run), "--no-progress"]), str(gen), "teacher")
    # the run's latent cache belongs to another teacher: refused before config.json is rewritten
    one_line_error(runner.invoke(app, base + ["--res", "8", "--encode-steps", "2", "--encode-images", "16",
                                              "--out", str(finished_run)]), "latent cache of another config", "teacher")
    # a missing data directory
    one_line_error(runner.invoke(app, base[:3] + ["--data", str(tmp_path / "nope"), "--res", "8", "--out",
                                                  str(finished_run)]), str(tmp_path / "nope"), "fix:")
    # an output directory that cannot be created: its parent is a regular file (root ignores chmod, not this)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(runner.invoke(app, base + ["--res", "8", "--out", str(blocker / "run")]), "cannot be written",
                   str(blocker / "run"))
    # more GPUs than this machine has
    if not torch.cuda.is_available():
        one_line_error(runner.invoke(app, base + ["--res", "8", "--gpus", "8", "--out", str(finished_run)]),
                       "--gpus 8 but this machine has 0 CUDA device(s)")
    assert snapshot(finished_run) == before
    assert blocker.read_text() == "x"
