"""`pagoda eval` (pagoda.report's evaluation half) on a tiny real run, through Typer's runner.

FID needs Inception (≈ 1-3 images/s and a 2048² sqrtm of a minute on 2 cores), so the default tests swap
`pagoda.metrics.load_inception` for a cheap 16-d stand-in with clean-fid's interface; everything else (the
sampler, the clean-fid resize to 299², the reference at the model's resolution, eval.json) is the real thing.
The real-Inception version at n = 100 is marked `slow`.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from typer.testing import CliRunner

from helpers import StandInInception, build_tiny_run, quick_classifier

from pagoda import metrics as M
from pagoda.cli import app
from pagoda.data import load_fashion_mnist
from pagoda.images import downsample, resample
from pagoda.inference import make_sampler
from pagoda.solvers import solver_steps
from pagoda.decoder import load_model
from pagoda.rundir import RunDir, model_file
from pagoda.solvers import METHODS, karras_sigmas, nfe as count_nfe

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture
def inception(tmp_path, monkeypatch) -> StandInInception:
    """The stand-in Inception and a private FID-statistics cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = StandInInception()
    monkeypatch.setattr(M, "load_inception", lambda *a, **k: model)
    return model


@pytest.fixture
def run(tiny_run, tmp_path, inception) -> Path:
    """A private copy of the tiny run (tests write eval.json into it)."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "eval.json").unlink(missing_ok=True)
    return run


def rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]


def test_eval_generator_run_dir(run, inception):
    args = ["eval", "--checkpoint", str(run), "--n", "100", "--ref-n", "100", "--batch", "32", "--no-progress", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    [row] = rows(run / "eval.json")
    assert row["kind"] == "generator" and row["resolution"] == 16 and row["nfe"] == 1 and row["n"] == 100
    assert row["ref"] == "fashion-mnist:train@16" and row["ref_n"] == 100 and row["mode"] == "clean"
    assert math.isfinite(row["fid"]) and row["fid"] > 0 and row["kid"] is not None
    assert row["checkpoint"] == str((run / "stage-16" / "generator.pt").resolve())
    assert set(inception.shapes) == {(3, 299, 299)}  # every image went through clean-fid's resize to 299²
    assert "FID" in res.output and "eval.json" in res.output
    again = runner.invoke(app, args)  # same seed: same samples, same number; the row is replaced, not added
    assert again.exit_code == 0 and [r["fid"] for r in rows(run / "eval.json")] == [row["fid"]]
    other = runner.invoke(app, args + ["--seed", "1", "--out", str(run / "seed1.json")])
    assert other.exit_code == 0 and rows(run / "seed1.json")[0]["fid"] != row["fid"]


def test_eval_teacher_and_resize_share_the_code(run):
    base = ["--n", "40", "--ref-n", "40", "--no-progress", "--device", "cpu"]
    teacher = str(run / "teacher" / "teacher.pt")
    assert runner.invoke(app, ["eval", "--checkpoint", teacher, "--solver", "dpmpp_2m", "--nfe", "4", *base]).exit_code == 0
    res = runner.invoke(app, ["eval", "--checkpoint", teacher, "--solver", "heun", "--nfe", "5", "--resize", "32", *base])
    assert res.exit_code == 0, res.output
    t4, t5 = rows(run / "eval.json")  # a checkpoint inside a run writes the run's eval.json
    assert (t4["kind"], t4["resolution"], t4["solver"], t4["nfe"], t4["ref"]) == ("teacher", 8, "dpmpp_2m", 4, "fashion-mnist:train@8")
    assert (t5["resolution"], t5["nfe"], t5["ref"]) == (32, 5, "fashion-mnist:train@32") and "bicubic 32px" in t5["model"]


def test_eval_all_stages(run):
    res = runner.invoke(app, ["eval", "--checkpoint", str(run), "--all-stages", "--nfe", "3", "--n", "20", "--ref-n", "20",
                              "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = [(r["kind"], r["resolution"]) for r in rows(run / "eval.json")]
    assert got == [("teacher", 8), ("generator", 8), ("generator", 16)]


def test_eval_accuracy_uses_the_cached_classifier_and_teacher_guidance(run, monkeypatch):
    from pagoda import classifier as C
    clf = quick_classifier(16)
    C.save_classifier(clf, RunDir(run).classifier / C.classifier_file(16), 0.84)
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    base = ["--n", "40", "--ref-n", "40", "--batch", "16", "--no-progress", "--device", "cpu", "--accuracy"]
    res = runner.invoke(app, ["eval", "--checkpoint", str(run), *base])
    assert res.exit_code == 0, res.output
    [row] = rows(run / "eval.json")
    _, G = load_model(model_file(run), "cpu")
    x = make_sampler("generator", G)(0, 40)
    assert row["accuracy"] == pytest.approx(clf.accuracy(x, torch.arange(40) % 10)) and "accuracy" in res.output
    teacher = str(run / "teacher" / "teacher.pt")
    for w in ("1", "3"):
        res = runner.invoke(app, ["eval", "--checkpoint", teacher, "--nfe", "3", "--resize", "16", "--guidance", w, *base])
        assert res.exit_code == 0, res.output
    t1, t3 = rows(run / "eval.json")[1:]
    assert (t1["guidance"], t3["guidance"]) == (1.0, 3.0) and "ω=3" in t3["model"] and t1["fid"] != t3["fid"]
    res = runner.invoke(app, ["eval", "--checkpoint", str(run), "--guidance", "2", *base])
    assert res.exit_code != 0 and "no guidance embedding" in res.output


@pytest.mark.parametrize("args, message", [
    (["--solver", "heun", "--nfe", "10"], "heun cannot take 10 NFE"),
    (["--solver", "rk4"], "unknown method"),
])
def test_eval_bad_teacher_options_one_line(tiny_run, args, message):
    res = runner.invoke(app, ["eval", "--checkpoint", str(tiny_run / "teacher" / "teacher.pt"), "--n", "4", "--no-progress", *args])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_eval_missing_checkpoint_one_line(tmp_path):
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--n", "4", "--no-progress"])
    assert res.exit_code == 2 and "does not exist" in res.output, res.output
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path), "--n", "4", "--no-progress"])
    assert res.exit_code == 2 and "no finished stage" in res.output, res.output


# The pieces under the command ---------------------------------------------------------------------

EVAL_RANK = r"""
import sys
sys.path.insert(0, sys.argv[1])
from helpers import StandInInception
from typer.testing import CliRunner
from pagoda import metrics as M
from pagoda.cli import app
M.load_inception = lambda *a, **k: StandInInception()
res = CliRunner().invoke(app, ["eval", "--checkpoint", sys.argv[2], "--all-stages", "--nfe", "3", "--n", "13",
                               "--ref-n", "11", "--batch", "4", "--no-progress", "--out", sys.argv[3]])
assert res.exit_code == 0, res.output
"""


def test_eval_split_over_two_ranks_equals_one_process(tiny_run, tmp_path, monkeypatch, inception):
    """Two gloo ranks (torchrun's environment, the CLI's torchrun path): each scores its share of the 13 samples and
    of the uncached 11-image reference, rank 0 gathers in order and alone writes eval.json and the reference cache:
    the same rows and the same cached statistics as one process."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=f"e-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    elastic_launch(config, sys.executable)("-c", EVAL_RANK, str(Path(__file__).parent), str(tiny_run), str(tmp_path / "two.json"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache1"))
    res = runner.invoke(app, ["eval", "--checkpoint", str(tiny_run), "--all-stages", "--nfe", "3", "--n", "13", "--ref-n",
                              "11", "--batch", "4", "--no-progress", "--out", str(tmp_path / "one.json")])
    assert res.exit_code == 0, res.output
    two, one = rows(tmp_path / "two.json"), rows(tmp_path / "one.json")
    assert [r["ranks"] for r in two] == [2, 2, 2] and [r["ranks"] for r in one] == [1, 1, 1]
    for a, b in zip(two, one):
        assert (a["model"], a["n"], a["ref_n"]) == (b["model"], 13, 11)
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-4) and a["kid"] == pytest.approx(b["kid"], rel=1e-3, abs=1e-6)
    [c2, c1] = [sorted((tmp_path / c / "pagoda" / "fid-stats").glob("*.npz")) for c in ("cache2", "cache1")]
    assert [p.name for p in c2] == [p.name for p in c1] and len(c1) == 2  # references at 8 and 16 px, cached once
    for p2, p1 in zip(c2, c1):
        a, b = M.ReferenceStats.load(p2), M.ReferenceStats.load(p1)
        np.testing.assert_allclose(a.mu, b.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-3, atol=1e-3)  # float16 on disk


def test_eval_procs_failure_names_the_rank_one_line(tmp_path):
    res = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "missing"), "--gpus", "0", "--procs", "2",
                              "--no-progress"])
    err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]  # (the launcher also logs to stderr)
    assert res.exit_code == 2 and len(err) == 1, res.output
    assert "worker rank" in err[0] and "failed" in err[0] and "does not exist" in err[0], err[0]


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(METHODS), nfe=st.integers(1, 100))
def test_solver_steps_gives_exactly_the_nfe_or_refuses(method, nfe):
    if method == "heun" and nfe % 2 == 0 or nfe < (3 if method == "heun" else 2):
        with pytest.raises(ValueError, match="NFE"):
            solver_steps(method, nfe)
    else:
        steps = solver_steps(method, nfe)
        assert count_nfe(method, torch.cat([karras_sigmas(steps), torch.zeros(1)])) == nfe


def test_sampler_is_seeded_cycles_labels_and_calls_the_teacher_nfe_times(tiny_run):
    kind, D = load_model(model_file(tiny_run / "teacher" / "teacher.pt"))
    assert kind == "teacher"
    calls, labels = [], []

    class Counting(torch.nn.Module):
        unet, sigma_min, sigma_max = D.unet, D.sigma_min, D.sigma_max

        def forward(self, x, sigma, y):
            calls.append(len(x))
            labels.append(y)
            return D(x, sigma, y)

    gen = make_sampler("teacher", Counting(), "dpmpp_2m", 3, seed=7)
    a = torch.cat([gen(0, 6), gen(6, 7)])
    assert calls == [64, 64, 64]  # 3 NFE on the aligned call of images 0 … 63, which serves both batches
    assert torch.equal(labels[0], torch.arange(64) % 10)  # classes cycle
    gen(64, 1)
    assert calls[3:] == [64, 64, 64] and torch.equal(labels[3], (64 + torch.arange(64)) % 10)  # the next call
    again = make_sampler("teacher", D, "dpmpp_2m", 3, seed=7)
    assert torch.equal(torch.cat([again(0, 6), again(6, 7)]), a) and a.abs().max() <= 1
    assert not torch.equal(make_sampler("teacher", D, "dpmpp_2m", 3, seed=8)(0, 6), a[:6])
    path = model_file(tiny_run)
    kind, G = load_model(path)
    assert kind == "generator" and G.resolution == 16 and path.parent.name == "stage-16"
    assert make_sampler("generator", G, resize=32)(0, 3).shape == (3, 1, 32, 32)
    # image i depends on (seed, i) only: any cut into batches (or ranks) gives the same bytes
    g = make_sampler("generator", G, seed=3)
    assert torch.equal(torch.cat([g(0, 2), g(2, 5), g(7, 1)]), make_sampler("generator", G, seed=3)(0, 8))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.sampled_from([4, 8, 16, 32]))
def test_resample_up_is_bicubic_in_range_and_down_is_adm(seed, size):
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    y = resample(x, size)
    assert y.shape == (2, 1, size, size) and y.abs().max() <= 1
    if size < 16:
        assert torch.equal(y, downsample(x, size))
    elif size == 16:
        assert y is x
    else:
        assert torch.allclose(y, F.interpolate(x, size=size, mode="bicubic").clamp(-1, 1))


@pytest.mark.slow
def test_eval_real_inception_n100(tiny_run, tmp_path, monkeypatch):
    """The real network: a 16 px generator after 3 steps is far from Fashion-MNIST, real test images are close."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", "--checkpoint", str(tiny_run), "--n", "100", "--ref-n", "100", "--no-progress",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    [row] = rows(out)
    test = downsample(load_fashion_mnist("test")[0][:100], 16)
    real = M.evaluate(lambda i, b: test[i:i + b], "fashion-mnist", n=100, batch=64, max_ref_images=100)
    print("tiny G16 FID", row["fid"], "real test FID", real["fid"])
    assert real["fid"] < row["fid"]
