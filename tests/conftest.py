"""Shared test setup: deterministic, CPU, small thread count."""
import os

import pytest
import torch

# 2 threads on CI's 2 cores; PAGODA_TEST_THREADS=1 when the machine is shared (oversubscription is ~100x slower).
# CLI commands run in-process get the same fixed count (no adaptive thread policy: tests compare bit-exactly).
THREADS = os.environ.get("PAGODA_TEST_THREADS", "2")
torch.set_num_threads(int(THREADS))
os.environ.setdefault("PAGODA_THREADS", THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """A tiny random T5 encoder + tokenizer folder for `t5:PATH` (helpers.write_tiny_t5); skipped without transformers."""
    pytest.importorskip("transformers")
    from helpers import write_tiny_t5
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


# --------------------------------------------------------------------------------------------------
# A trained toy pipeline, built once per session (tests/test_pipeline.py, tests/test_cli.py):
# teacher 8×8 on real Fashion-MNIST → latent cache → stage-08 (decoder) → stage-16 (one doubling).
# ≈ 60 s CPU with 1 thread: the teacher ≈ 40 s, the two stages ≈ 15 s, encoding ≈ 3 s.

def toy_configs():
    """(TeacherConfig, GrowPreset) of the toy run: small enough for CI, trained enough to measure.

    Teacher: the `tiny` UNet, 200 Adam steps of batch 32 (lr 6e-3 so the 200-step warm-up reaches a useful
    rate, EMA 0.95 so the saved weights are the trained ones): its Heun samples are class-shaped clothes.
    Stages: Adam (RAdam's rectification makes a 40-step run an SGD run), L_rec only for the first 10 steps
    of each stage, then L_rec + λ·w·L_adv; the doubling fades in over 10 of its 20 steps.
    """
    from dataclasses import replace

    from pagoda.grow import PRESETS
    from pagoda.train import TEACHER_PRESETS
    teacher = replace(TEACHER_PRESETS["tiny"], steps=200, batch=32, lr=6e-3, ema=0.95, grid_every=200,
                      ckpt_every=200, sample_steps=6)
    grow = replace(PRESETS["tiny"], name="toy", steps=(40, 20), batch=(8,), lr_G=2e-3, lr_D=1e-3,
                   fade_steps=(0, 10), optimizer="adam", adv_start=(10,), encode_images=64, encode_steps=10)
    return teacher, grow


class ToyRun:
    """A finished toy run directory and what built it (read-only for tests: copy it before changing it)."""

    def __init__(self, path, teacher_cfg, train_cfg, seconds: float):
        self.path, self.teacher_cfg, self.train_cfg, self.seconds = path, teacher_cfg, train_cfg, seconds

    @property
    def teacher(self):
        return self.path / "teacher" / "teacher.pt"


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> ToyRun:
    """Train the toy pipeline once per session into a temporary run directory."""
    import time

    from pagoda.train import TrainConfig, train, train_teacher
    out = tmp_path_factory.mktemp("toy") / "run"
    teacher_cfg, grow = toy_configs()
    t0 = time.perf_counter()
    train_teacher(teacher_cfg, out / "teacher", progress=False, device="cpu")  # train() then finds RUN/teacher
    cfg = TrainConfig(out=str(out), res=16, preset=grow, device="cpu", ckpt_every=1000)
    train(cfg, progress=False)
    return ToyRun(out, teacher_cfg, cfg, time.perf_counter() - t0)
