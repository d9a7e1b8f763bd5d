"""Exact resume: a run SIGKILLed mid-stage (and a teacher SIGKILLed mid-training) and then resumed ends with
bit-identical weights, optimiser states and EMA to an uninterrupted run (counter-based RNG per step)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import tiny_assets, tensors

from pagoda import grow
from pagoda.cli import app
from pagoda.io import load_checkpoint
from pagoda.train import TeacherConfig, train_teacher

ROOT = Path(__file__).resolve().parents[1]
# 6 steps per stage, fade-in over 4: a kill at stage-16 step 3 (checkpoints every 2) loses step 2 and
# resumes at step 2 mid-fade (α = 0.5).
RESUME_PRESET = replace(grow.PRESETS["tiny"], name="tiny6", steps=(6,), fade_steps=(0, 4))


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = dict(tensors(load_checkpoint(a))), dict(tensors(load_checkpoint(b)))
    assert ta.keys() == tb.keys() and ta, a
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"{a.name}: {len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture
def one_thread():
    """The killed run is a subprocess with OMP_NUM_THREADS=1: compute in-process with the same thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _killed(script_args: list[str], fault: str) -> None:
    """Run `python -c ...` with the SIGKILL test hook armed; it must die by SIGKILL."""
    env = {**os.environ, "PAGODA_TEST_FAULT": fault, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", *script_args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert p.returncode == -9, p.stdout + p.stderr[-3000:]


CLI_WITH_PRESET = r"""
import sys
from dataclasses import replace
from pagoda import grow
grow.PRESETS["tiny6"] = replace(grow.PRESETS["tiny"], name="tiny6", steps=(6,), fade_steps=(0, 4))
from pagoda.cli import main
sys.argv = ["pagoda", *sys.argv[1:]]
main()
"""


def test_sigkill_mid_stage_then_resume_is_bit_identical(tmp_path, monkeypatch, one_thread):
    teacher, data = tiny_assets(tmp_path)
    monkeypatch.setitem(grow.PRESETS, "tiny6", RESUME_PRESET)
    args = ["train", "--res", "16", "--preset", "tiny6", "--data", str(data), "--teacher", str(teacher),
            "--encode-images", "0", "--encode-steps", "2", "--ckpt-every", "2", "--no-progress"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert CliRunner().invoke(app, args + ["--out", str(ref)]).exit_code == 0  # uninterrupted
    # killed at stage-16 step 3: stage-08 done, stage-16 checkpoint at step 2, step 2's update lost
    _killed([CLI_WITH_PRESET, *args, "--out", str(run)], "0:stage-16:3:kill")
    assert not (run / "stage-16" / "generator.pt").exists()
    assert load_checkpoint(run / "stage-16" / "checkpoint.pt")["step"] == 2
    res = CliRunner().invoke(app, args + ["--out", str(run), "--resume"])
    assert res.exit_code == 0, res.output
    for f in ["stage-08/generator.pt", "stage-16/checkpoint.pt", "stage-16/generator.pt"]:
        assert_bit_identical(ref / f, run / f)


TEACHER_RUN = r"""
import sys
from pagoda.train import TeacherConfig, train_teacher
train_teacher(TeacherConfig(data=sys.argv[1], unet="tiny", steps=6, batch=8, ckpt_every=2, grid_every=100,
                            sample_steps=2), sys.argv[2], progress=False, device="cpu")
"""


def test_sigkill_mid_teacher_then_resume_is_bit_identical(tmp_path, one_thread):
    _, data = tiny_assets(tmp_path)
    cfg = TeacherConfig(data=str(data), unet="tiny", steps=6, batch=8, ckpt_every=2, grid_every=100, sample_steps=2)
    train_teacher(cfg, tmp_path / "ref", progress=False, device="cpu")
    _killed([TEACHER_RUN, str(data), str(tmp_path / "run")], "0:teacher:3:kill")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    train_teacher(cfg, tmp_path / "run", progress=False, device="cpu")
    for f in ["checkpoint.pt", "teacher.pt"]:
        assert_bit_identical(tmp_path / "ref" / f, tmp_path / "run" / f)
