"""A training stage beside a busy process: how much slower it gets when the cores are shared, per thread policy.

    .venv/bin/python bench/shared_machine.py --run runs/demo --out results/shared_machine [--steps 30] [--busy-threads 4]

Each row runs K steps of the run's stage-08 (StageTrainer on the run's latent cache, a scratch folder, one
warm-up step) in a fresh process, alone and beside a busy process, and reports steps/s and the slowdown
(alone / shared). The busy process is a foreign torch job that pagoda does not control: the FID Inception
network (TorchScript) on random 299² batches with --busy-threads intra-op threads and libgomp's default wait
policy (OMP_WAIT_POLICY unset), started first and given a few seconds to warm up. Policies:

    all cores           threads = cores (torch's default), libgomp's default wait (spin, then sleep)
    all cores, passive  threads = cores, OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers at once)
    1 thread            1 thread
    pagoda              what the `pagoda` commands do: pagoda.dist.ThreadPolicy (threads = the cores others leave
                        free, re-measured every 5 s), libgomp's default wait

Time it on an otherwise idle machine. Writes OUT/shared_machine.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common import parser, print_table, write_results
from pagoda.dist import available_cpus

BUSY = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
net = torch.jit.load(sys.argv[1]).eval()
x = torch.rand(8, 3, 299, 299) * 255
with torch.no_grad():
    while True:
        net((x - 128) / 128)
"""

TRAIN = """
import json, sys, tempfile, time
from dataclasses import fields
import torch
from pagoda import dist
from pagoda.data import make_dataset
from pagoda.encoder import LatentPairs, LatentStore
from pagoda.grow import plan_stages
from pagoda.rundir import RunDir
from pagoda.stage import RunSpec, StageTrainer
from pagoda.teacher import load_teacher
from pagoda.train import TrainConfig
run, steps, policy = RunDir(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg_all = json.loads(run.config.read_text())
cfg = TrainConfig(**{k: v for k, v in cfg_all["train"].items() if k in {f.name for f in fields(TrainConfig)}})
teacher = load_teacher(run.teacher)
stage = plan_stages(teacher.resolution, cfg.res, cfg.preset if isinstance(cfg.preset, str) else "demo")[0]
pairs = LatentPairs.from_cache(LatentStore(run.latents), make_dataset(cfg.data, stage.resolution))
fixed = {"pagoda": None, "1 thread": 1}.get(policy, torch.get_num_threads())
with dist.thread_policy(fixed) as tp, tempfile.TemporaryDirectory() as tmp:
    tr = StageTrainer(RunSpec.of(cfg), stage, 0, teacher, None, pairs, RunDir(tmp).stage(stage.resolution),
                      dist.DistInfo())
    tr.train_step()  # warm-up
    threads, t0 = [], time.perf_counter()
    for _ in range(steps):
        tr.train_step()
        threads.append(dist.update_threads())
    dt = time.perf_counter() - t0
print(json.dumps({"steps_per_s": steps / dt, "threads": sorted(set(threads))}))
"""

POLICIES = {"all cores": {}, "all cores, passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "1 thread": {}, "pagoda": {}}  # env changes


def env_with(changes: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PAGODA_THREADS", "OMP_WAIT_POLICY")}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


def train_once(run: str, steps: int, policy: str, timeout: float) -> dict:
    out = subprocess.run([sys.executable, "-c", TRAIN, run, str(steps), policy], env=env_with(POLICIES[policy]),
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise SystemExit(f"error: the training process failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__, "shared_machine")
    p.add_argument("--steps", type=int, default=30, help="timed stage-08 steps per row")
    p.add_argument("--busy-threads", type=int, default=4, help="intra-op threads of the busy process")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--timeout", type=float, default=1200, help="seconds before a shared row gives up")
    a = p.parse_args()
    from pagoda.metrics import find_inception_weights
    weights = str(find_inception_weights())
    rows = []
    for policy in a.policies:
        alone = train_once(a.run, a.steps, policy, a.timeout)
        busy = subprocess.Popen([sys.executable, "-c", BUSY, weights, str(a.busy_threads)], env=env_with({}))
        try:
            time.sleep(5)  # the busy process loads and runs before training starts
            try:
                shared = train_once(a.run, a.steps, policy, a.timeout)
            except subprocess.TimeoutExpired:
                shared = {"steps_per_s": a.steps / a.timeout, "threads": ["timeout"]}
        finally:
            busy.kill()
            busy.wait()
        rows.append({"policy": policy, "alone_steps_per_s": alone["steps_per_s"], "alone_threads": alone["threads"],
                     "shared_steps_per_s": shared["steps_per_s"], "shared_threads": shared["threads"],
                     "slowdown": alone["steps_per_s"] / shared["steps_per_s"]})
        print(rows[-1], flush=True)
    print_table(f"stage-08 of {a.run}: {a.steps} steps alone and beside a {a.busy_threads}-thread Inception job "
                f"({available_cpus()} CPUs)", rows,
                [("policy", "policy", ""), ("alone_steps_per_s", "alone steps/s", ".2f"), ("alone_threads", "threads", ""),
                 ("shared_steps_per_s", "shared steps/s", ".3f"), ("shared_threads", "threads", ""),
                 ("slowdown", "× slower", ".1f")])
    write_results(a.out, "shared_machine", {"run": a.run, "steps": a.steps, "busy_threads": a.busy_threads,
                                             "cpus": available_cpus(), "rows": rows})


if __name__ == "__main__":
    main()
