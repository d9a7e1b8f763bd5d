"""How far 2 ranks x batch 2 lands from 1 rank x batch 4, against what float summation order and a broken
gradient average do (the criterion of tests/test_distributed.py: tests/helpers.learnt_gap).

    python bench/two_ranks.py --out results/two-ranks        # ≈ 5 min alone on 2 cores
    python bench/two_ranks.py --variants two,broken          # a subset (the reference `one` always runs)

Trains the tests' tiny 8 -> 16 run (3 steps per stage, DiffAugment on) once per variant, each in its own process
on one thread:
    one           1 rank x batch 4, the reference
    one-2threads  the same on 2 threads (another summation order inside every kernel)
    two           2 ranks x batch 2 (gloo)
    avx2, two-avx2  1 and 2 ranks with AVX2 kernels only (oneDNN, MKL, ATen), as on a machine without AVX-512
    noise-1e-7, noise-1e-5, noise-1e-3  1 rank, every gradient times (1 + δ·N(0, 1)) before each optimiser step
    broken        2 ranks that never average their gradients
and prints, per stage, ||G_v(z) − G_one(z)|| / ||G_one(z) − G_start(z)||: the part of what the stage learnt on
which the variant disagrees.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from common import environment, parser, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import learnt_gap, tiny_assets  # noqa: E402  (the tests' tiny run and criterion)

from pagoda import dist  # noqa: E402
from pagoda.launch import launch_train  # noqa: E402
from pagoda.train import TrainConfig, train  # noqa: E402

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
VARIANTS = {  # name: (ranks, environment, gradient noise δ)
    "one": (1, {}, 0.0), "one-2threads": (1, {"OMP_NUM_THREADS": "2"}, 0.0), "two": (2, {}, 0.0),
    "avx2": (1, AVX2, 0.0), "two-avx2": (2, AVX2, 0.0),
    "noise-1e-7": (1, {}, 1e-7), "noise-1e-5": (1, {}, 1e-5), "noise-1e-3": (1, {}, 1e-3), "broken": (2, {}, 0.0),
}
NO_AVERAGE = "import pagoda.dist\npagoda.dist.average_gradients = lambda params, info: None\n"


def config(root: Path, name: str) -> TrainConfig:
    return TrainConfig(out=str(root / name), data=str(root / "data"), res=16, teacher=str(root / "teacher.pt"),
                       preset="tiny", encode_images=0, encode_steps=4, ckpt_every=2, device="cpu")


def train_variant(root: Path, name: str) -> None:
    """One variant, in this process (the environment was set by the parent)."""
    ranks, _, delta = VARIANTS[name]
    if delta:
        g = torch.Generator().manual_seed(0)

        def noisy(params, info):  # a 1-rank run: the average is a no-op, the noise stands in for another sum order
            for p in params:
                if p.requires_grad and p.grad is not None:
                    p.grad.mul_(1 + delta * torch.randn(p.grad.shape, generator=g))
        dist.average_gradients = noisy
    if ranks == 1:
        train(config(root, name), progress=False)
    else:
        launch_train(config(root, name), gpus=0, procs=ranks, progress=False)


def main() -> None:
    p = parser(__doc__, "two-ranks", run=False)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (default: all)")
    p.add_argument("--variant", help="(internal) train one variant into --out")
    args = p.parse_args()
    root = Path(args.out)
    if args.variant:
        return train_variant(root, args.variant)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "teacher.pt").is_file():
        tiny_assets(root)
    hook = root / "no-average"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(NO_AVERAGE)
    rows = []
    for name in ["one", *(v for v in args.variants.split(",") if v != "one")]:
        ranks, env, delta = VARIANTS[name]
        if not (root / name / "stage-16" / "generator.pt").is_file():
            extra = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))} \
                if name == "broken" else {}
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PAGODA_THREADS": env.get("OMP_NUM_THREADS", "1"), **env, **extra}
            subprocess.run([sys.executable, __file__, "--out", str(root), "--variant", name], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        gap = learnt_gap(root / "one", root / name, root / "teacher.pt")
        rows.append({"variant": name, "ranks": ranks, "delta": delta, **gap})
        print(f"{name:14s} " + "  ".join(f"{s} {v:.2e}" for s, v in gap.items()), flush=True)
    write_results(root, "two-ranks", {"rows": rows, "environment": environment(torch.device("cpu"))})


if __name__ == "__main__":
    main()
