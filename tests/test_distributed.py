"""Distributed training on CPU (gloo) through torch's elastic launcher: collectives and the latent cache
encoded by two ranks, the equivalence 2 ranks x batch B == 1 rank x batch 2B (the same learnt function, and a
broken gradient average caught), rank-0-only outputs,
(slow) 20 clean launches in a row and torchrun; the dry run's plan for N ranks."""
from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from typer.testing import CliRunner

from helpers import learnt_gap, read_cache, tensors, tiny_assets

from pagoda import dist
from pagoda.cli import app
from pagoda.grow import PRESETS as GROW_PRESETS
from pagoda.io import load_checkpoint
from pagoda.launch import launch_train, resolve_workers
from pagoda.teacher import Denoiser
from pagoda.train import TrainConfig, train
from pagoda.unet import PRESETS, UNet


def test_resolve_workers_and_split():
    assert resolve_workers(0, 3) == (3, "cpu") and resolve_workers(0) == (1, "cpu")
    with pytest.raises(ValueError, match="--procs 2 is for CPU processes"):
        resolve_workers(1, 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--gpus 8 but this machine has 0 CUDA device\(s\)"):
            resolve_workers(8)
    for n in range(0, 23):
        for w in (1, 2, 3, 8):
            parts = [dist.split(n, dist.DistInfo(rank=r, world_size=w)) for r in range(w)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


COLLECTIVES = r"""
import json, os, sys, torch
from pagoda import dist
info = dist.init("cpu")
r, w = info.rank, info.world_size
assert w == 2 and info.long_group is not None
t = torch.full((r + 1, 3), float(r))                          # rank 0: 1 row of 0, rank 1: 2 rows of 1
g = dist.gather_cat(t, info)
assert g.tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3], g
x = torch.tensor([float(r), 10.0 * r])
dist.all_reduce_mean_([x], info)
assert x.tolist() == [0.5, 5.0], x
b = torch.tensor([r + 7.0])
dist.broadcast_([b], info)
assert b.item() == 7.0
mine = list(dist.split(5, info))
share = dist.gather_cat(torch.tensor(mine), info)
assert share.tolist() == [0, 1, 2, 3, 4], share
# the latent cache: shard i is encoded by rank i % 2, every rank then reads all of them
from pagoda.encoder import Encoder, LatentStore, build_latent_cache
from pagoda.teacher import Denoiser
from pagoda.unet import PRESETS, UNet
torch.manual_seed(0)
teacher = Denoiser(UNet(PRESETS["tiny"])).eval()
g = torch.Generator().manual_seed(1)
data = [(torch.rand(1, 8, 8, generator=g) * 2 - 1, i % 10) for i in range(5)]
build_latent_cache(Encoder(teacher, 8, steps=3), data, os.path.join(sys.argv[1], "lat"), shard_size=2, rank=r,
                   world_size=w)
dist.barrier(info)
done = sorted(f for f in os.listdir(os.path.join(sys.argv[1], "lat")) if f.startswith("shard"))
assert len(done) == 3 and LatentStore(os.path.join(sys.argv[1], "lat")).shape == (5, 2, 1, 8, 8)
open(os.path.join(sys.argv[1], f"rank{r}.json"), "w").write(json.dumps({"rank": r, "mine": mine}))
dist.shutdown(info)
"""


def test_collectives_under_two_gloo_processes(tmp_path):
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=f"t-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    elastic_launch(config, sys.executable)("-c", COLLECTIVES, str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got == [{"rank": 0, "mine": [0, 1, 2]}, {"rank": 1, "mine": [3, 4]}]
    # the cache encoded by two ranks equals the one encoded by one process
    from pagoda.encoder import Encoder, build_latent_cache
    torch.manual_seed(0)
    teacher = Denoiser(UNet(PRESETS["tiny"])).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(1, 8, 8, generator=g) * 2 - 1, i % 10) for i in range(5)]
    build_latent_cache(Encoder(teacher, 8, steps=3), data, tmp_path / "lat1", shard_size=2)
    two, one = read_cache(tmp_path / "lat"), read_cache(tmp_path / "lat1")
    torch.testing.assert_close(two[1], one[1], rtol=1e-3, atol=1e-3)  # fp16 storage
    assert torch.equal(two[2], one[2]) and torch.equal(two[3], one[3])


# What must hold on any machine. 2 ranks x batch 2 and 1 rank x batch 4 are the same computation up to the order
# of float sums (convolutions over 2 vs 4 samples, gloo adding two half-batch gradients), so their weights are not
# bitwise equal, and kernels differ by CPU: emulating an AVX2 machine (ONEDNN_MAX_CPU_ISA=AVX2,
# MKL_ENABLE_INSTRUCTIONS=AVX2, ATEN_CPU_CAPABILITY=avx2) moves the tiny run's stage-16 G by 3.6e-4 of what
# training changed, and gradients perturbed by 1e-3 relative noise by 3.4e-4 (bench/two_ranks.py; docs/benchmarks.md "Two ranks").
# An element-wise check of every tensor (the old rtol 1e-4) fails on such machines on small Adam moments. What the
# equivalence promises is the same *training*: the function each stage learnt, G(z), agrees to 1 % of the change
# that the stage made, while a broken gradient average misses by 10-20 %.
LEARNT_TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The tiny 8 -> 16 run on one process, one thread (the reference of the two-rank tests)."""
    root = tmp_path_factory.mktemp("ranks")
    teacher, data = tiny_assets(root)
    base = TrainConfig(data=str(data), res=16, teacher=str(teacher), preset="tiny", encode_images=0, encode_steps=4,
                       ckpt_every=2, device="cpu")
    assert base.augment  # the equivalence covers DiffAugment
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(replace(base, out=str(root / "one")), progress=False)
    torch.set_num_threads(threads)
    return root, base


def launch_two(base: TrainConfig, out: Path, monkeypatch) -> Path:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores
    assert launch_train(replace(base, out=str(out)), gpus=0, procs=2, progress=False) == out
    return out


def test_two_ranks_learn_what_one_rank_learns(one_rank_run, monkeypatch, tmp_path):
    """3 steps per stage with 2 ranks x batch 2 learn the function of 1 rank x batch 4 (DiffAugment on)."""
    root, base = one_rank_run
    one, two = root / "one", launch_two(base, tmp_path / "two", monkeypatch)
    # the latent cache: the same entries, encoded in other batches (fp16 storage)
    a, b = dict(tensors(load_checkpoint(one / "latents/shard-00000.pt"))), dict(tensors(load_checkpoint(two / "latents/shard-00000.pt")))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3, msg=lambda m: f"latents{k}: {m}")
    gap = learnt_gap(one, two, Path(base.teacher))
    assert max(gap.values()) < LEARNT_TOLERANCE, gap
    # rank 0 alone wrote the logs and grids: one line per step, not one per rank
    for s in ("stage-08", "stage-16"):
        lines = (two / s / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
        assert (two / s / "grid-final.png").is_file()
    assert not list(two.rglob("*.tmp"))


def test_the_check_catches_a_broken_gradient_average(one_rank_run, monkeypatch, tmp_path):
    """The same launch with each rank keeping its own half-batch gradient (no all-reduce) fails learnt_gap."""
    root, base = one_rank_run
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import pagoda.dist\npagoda.dist.average_gradients = lambda params, info: None\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    gap = learnt_gap(root / "one", launch_two(base, tmp_path / "broken", monkeypatch), Path(base.teacher))
    assert min(gap.values()) > 3 * LEARNT_TOLERANCE, gap  # measured: 0.10 / 0.19


@pytest.mark.slow
def test_twenty_launches_shut_down_cleanly(tmp_path):
    """Every launch exits 0 (a gloo rank that aborts at exit would make launch_train raise)."""
    teacher, data = tiny_assets(tmp_path)
    for i in range(20):
        cfg = TrainConfig(out=str(tmp_path / f"run{i}"), data=str(data), res=8, teacher=str(teacher), preset="tiny",
                          encode_images=0, encode_steps=2, device="cpu")
        launch_train(cfg, gpus=0, procs=2, progress=False)
        assert (tmp_path / f"run{i}" / "stage-08" / "generator.pt").is_file(), i


@pytest.mark.slow
def test_torchrun_runs_the_same_entry_point(tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m pagoda.cli train ...` equals one process (and launch_train)."""
    import subprocess
    teacher, data = tiny_assets(tmp_path)
    args = ["train", "--res", "8", "--preset", "tiny", "--data", str(data), "--teacher", str(teacher),
            "--encode-images", "0", "--encode-steps", "2", "--device", "cpu", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pagoda.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(torchrun + args + ["--out", str(tmp_path / "tr")], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    train(TrainConfig(out=str(tmp_path / "one"), data=str(data), res=8, teacher=str(teacher), preset="tiny",
                      encode_images=0, encode_steps=2, device="cpu"), progress=False)
    gap = learnt_gap(tmp_path / "one", tmp_path / "tr", teacher)
    assert gap["stage-08"] < LEARNT_TOLERANCE, gap


# ---- the dry run: a plan for N ranks without launching them ----------------------------------------

def test_saved_bytes_counts_autograd_saved_tensors_once_without_parameters():
    from pagoda.plan import saved_bytes
    lin, x = torch.nn.Linear(5, 3), torch.randn(4, 5)
    # addmm saves x (for ∇W; W itself is a parameter, excluded), relu saves its 4x3 output
    assert saved_bytes(lambda: lin(x).relu().sum(), [lin]) == 4 * (4 * 5 + 4 * 3)
    a, b = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    assert saved_bytes(lambda: (a * b).sum(), []) == 4 * 20  # only b is needed for ∇a
    y = a * b
    assert saved_bytes(lambda: y.exp() + y.exp(), []) == 4 * 20 * 2  # two exps, two outputs


def test_dry_run_plans_for_ranks_it_does_not_have(tmp_path):
    from pagoda.decoder import Generator
    from pagoda.grow import plan_stages
    from pagoda.plan import _meta_stage, dry_run
    cfg = TrainConfig(out=str(tmp_path / "never"), res=16, preset="tiny", teacher_preset="tiny")
    plan = dry_run(cfg, ranks=2, width=32, steps=0)  # the two real steps per stage: through the CLI below
    one = dry_run(cfg, ranks=1, width=32, steps=0)
    assert [s["name"] for s in plan["stages"]] == ["stage-08", "stage-16"]
    assert [(s["global_batch"], s["per_rank_batch"], s["micro_batch"]) for s in plan["stages"]] == [(4, 2, 2)] * 2
    # parameter counts: the real modules
    G8 = Generator(UNet(PRESETS["tiny"]))
    G16 = G8.grow(fade=False)
    G16.set_trainable(2)
    assert plan["stages"][0]["G_params"] == plan["stages"][0]["G_trainable"] == sum(p.numel() for p in G8.parameters())
    assert plan["stages"][1]["G_params"] == sum(p.numel() for p in G16.parameters())
    assert plan["stages"][1]["G_trainable"] == sum(p.numel() for p in G16.parameters() if p.requires_grad)
    # activations grow by a fixed amount per sample of the micro-batch (B >= 2; B = 1 saves a little less)
    assert [s["micro_batch"] for s in one["stages"]] == [4, 4]
    for k, stage in enumerate(plan_stages(8, 16, "tiny")):
        cfg_k = PRESETS["tiny"] if k == 0 else PRESETS["tiny"].grown()
        f2, f3, f4 = (_meta_stage(cfg, stage, cfg_k, m, "features")["activation_bytes"] for m in (2, 3, 4))
        assert f2 == plan["stages"][k]["activation_bytes"] and f4 == one["stages"][k]["activation_bytes"]
        assert 0 < f2 < f3 < f4 and f4 - f3 == f3 - f2
    # latent cache: the tiny preset encodes 64 images, x2 flips, 1x8x8, fp16
    assert plan["latent_cache_bytes"] == 64 * 2 * 1 * 8 * 8 * 2
    assert not (tmp_path / "never").exists()  # a plan writes nothing
    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--teacher-preset", "tiny", "--res", "16", "--gpus", "8",
                                   "--dry-run", "--out", str(tmp_path / "never")])
    assert res.exit_code == 0, res.output
    assert "plan for 8 rank(s)" in res.output and "not divisible by ranks 8" in res.output
    assert res.output.count("s/step") == 2 and res.output.count("finite True") == 2
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_dry_run_imagenet64_counts_at_true_size():
    from pagoda.plan import dry_run
    plan = dry_run(TrainConfig(preset="imagenet64", res=512), ranks=8, steps=0)
    with torch.device("meta"):
        adm = sum(p.numel() for p in UNet(PRESETS["imagenet64"]).parameters())
    assert plan["stages"][0]["G_params"] == plan["teacher"]["params"] == adm
    assert [(s["global_batch"], s["micro_batch"]) for s in plan["stages"]] == [(96, 12), (256, 32), (360, 45), (512, 64)]
    assert plan["latent_cache_bytes_all"] == 1_281_167 * 2 * 3 * 64 * 64 * 2


@pytest.mark.parametrize("preset", list(GROW_PRESETS))
def test_dry_run_steps_every_preset(preset):
    """Every preset (its first stage and one doubling, width 32): the true-size G step on the meta device, with the
    labels its (conditional, projected) discriminator needs, for 1 and 8 ranks, and one real step of each stage
    on random data (a growth stage reads the generator its previous stage left, e.g. the demo's anchor)."""
    from pagoda.plan import dry_run, teacher_config
    cfg = TrainConfig(preset=preset)
    cfg = TrainConfig(preset=preset, res=2 * teacher_config(cfg)[0].resolution)
    for ranks, steps in ((1, 0), (8, 1)):
        plan = dry_run(cfg, ranks=ranks, width=32, steps=steps)
        assert len(plan["stages"]) == 2
        assert all(s["activation_bytes"] > 0 for s in plan["stages"] if s["micro_batch"]), plan["stages"]
    assert [sorted(r) for r in plan["reduced"]["stages"]] == [["batch", "d", "finite", "rec", "seconds_per_step"]] * 2
    assert all(r["finite"] for r in plan["reduced"]["stages"])


def test_dry_run_cli_with_cpu_processes(tmp_path):
    res = CliRunner().invoke(app, ["train", "--res", "16", "--gpus", "0", "--procs", "2", "--dry-run",
                                   "--out", str(tmp_path / "never")])
    assert res.exit_code == 0, res.output
    assert "plan for 2 rank(s)" in res.output and res.output.count("finite True") == 2
    assert not (tmp_path / "never").exists()


def test_split_g_step_takes_one_rec_and_one_adv_update_whatever_the_accumulation(tmp_path):
    """Official 256/512 px split G step: 2 optimiser steps per global batch for --accumulate 1, 2 and 4."""
    from dataclasses import replace
    from types import SimpleNamespace

    from pagoda.encoder import LatentPairs
    from pagoda.grow import plan_stages
    from pagoda.stage import RunSpec, StageTrainer
    torch.manual_seed(0)
    teacher = Denoiser(UNet(PRESETS["tiny"])).eval().requires_grad_(False)
    stage = replace(plan_stages(8, 8, "tiny")[0], split_g_step=True, batch=4)
    data = SimpleNamespace(images=torch.rand(8, 1, 8, 8) * 2 - 1, in_memory=True,
                           batch=lambda i: (data.images[i], None))
    pairs = LatentPairs(80 * torch.randn(8, 2, 1, 8, 8), torch.arange(8), torch.arange(8) % 10, data)
    for A in (1, 2, 4):
        tr = StageTrainer(RunSpec.of(TrainConfig(accumulate=A, augment="")), stage, 0, teacher, None, pairs, tmp_path / f"a{A}",
                          dist.DistInfo())
        tr.train_step()
        assert {int(s["step"]) for s in tr.opt_G.state.values()} == {2}, A


# ---- the CPU thread policy ---------------------------------------------------------------------------

def test_thread_policy_follows_the_cores_others_leave_free(monkeypatch):
    """threads = clamp(round(cpus − others' CPU seconds per second), 1, cpus), re-measured every `every` seconds."""
    clock, busy, own = [0.0], [0.0], [0.0]
    monkeypatch.delenv("PAGODA_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dist, "available_cpus", lambda: 4)
    monkeypatch.setattr(dist.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(dist.time, "process_time", lambda: own[0])
    monkeypatch.setattr(dist, "_busy_seconds", lambda: busy[0])
    before = torch.get_num_threads()
    with dist.thread_policy() as tp:
        assert tp.threads == 4 and torch.get_num_threads() == 4

        def tick(seconds: float, ours: float, others: float) -> int:
            clock[0] += seconds
            own[0] += ours
            busy[0] += ours + others
            return dist.update_threads()
        assert tick(1.0, 4.0, 3.0) == 4                            # not yet `every` (5 s) since the last look
        assert tick(5.0, 10.0, 15.0) == 1                          # others use 3 of 4 cores over the last 6 s
        assert torch.get_num_threads() == 1
        assert tick(5.0, 5.0, 0.2) == 4                            # they stopped
        assert tick(5.0, 10.0, 7.0) == 3                           # 1.4 cores busy elsewhere
        assert tick(5.0, 10.0, 3.5) == 4                           # 0.7 of a core: not taken yet
    assert torch.get_num_threads() == before and dist.update_threads() == before  # no policy outside a command


def test_thread_policy_fixed_by_option_or_environment(monkeypatch):
    monkeypatch.delenv("PAGODA_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with dist.thread_policy() as tp:
        assert tp.fixed == 3 and torch.get_num_threads() == 3 and tp.update() == 3
    with dist.thread_policy(1) as tp:  # the option wins, and reaches spawned workers through PAGODA_THREADS
        assert tp.threads == 1 and os.environ["PAGODA_THREADS"] == "1"
    assert "PAGODA_THREADS" not in os.environ
    monkeypatch.setenv("PAGODA_THREADS", "two")
    with pytest.raises(ValueError, match="not a number of threads"):
        with dist.thread_policy():
            pass


def test_local_cpu_workers_share_the_cores(monkeypatch):
    """`--gpus 0 --procs P`: each worker gets ⌊cpus / P⌋ threads (≥ 1) unless OMP_NUM_THREADS is set; restored after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dist, "available_cpus", lambda: 5)
    for workers, device, threads in [(2, "cpu", "2"), (8, "cpu", "1"), (2, "cuda", None)]:
        with dist.worker_threads(workers, device):
            assert os.environ.get("OMP_NUM_THREADS") == threads
        assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with dist.worker_threads(2, "cpu"):
        assert os.environ["OMP_NUM_THREADS"] == "3"
    assert os.environ["OMP_NUM_THREADS"] == "3"
