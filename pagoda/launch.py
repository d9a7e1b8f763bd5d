"""Start `pagoda train` (or `pagoda eval`) on several processes with torch.distributed's elastic launcher
(what torchrun runs).

One node, N GPUs (NCCL), either of:

    pagoda train --gpus 8 --res 128 --data /data/imagenet --teacher edm_imagenet64_ema.pt --preset imagenet64
    torchrun --standalone --nproc-per-node 8 -m pagoda.cli train --res 128 --data /data/imagenet \
             --teacher edm_imagenet64_ema.pt --preset imagenet64

Several nodes (run the same line on every node; HOST = node 0's address; --out on a shared file system):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id pagoda128 \
             -m pagoda.cli train --res 128 --data /data/imagenet --teacher edm_imagenet64_ema.pt --preset imagenet64

CPU processes (gloo), for testing:

    pagoda train --gpus 0 --procs 2 --res 16 --out runs/cpu2

Evaluation the same way: each rank scores a contiguous share of the samples, rank 0 gathers the features:

    pagoda eval --checkpoint runs/demo --all-stages --n 50000 --gpus 8
    torchrun --standalone --nproc-per-node 8 -m pagoda.cli eval --checkpoint runs/demo --n 50000

Every rank computes its slice of the same global batch (pagoda/stage.py), so N ranks x B = 1 rank x N·B.
A rank that fails makes the launcher stop the others and exit non-zero, naming the rank and its error.
Resume after any failure with the same command (`--resume` is the default).
"""
from __future__ import annotations

import os
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from pagoda import dist
from pagoda.report import write_report
from pagoda.train import TrainConfig, train


class LaunchError(RuntimeError):
    """A worker failed: the message names the rank and its first error line."""


def resolve_workers(gpus: int, procs: int | None = None) -> tuple[int, str]:
    """(number of local workers, device) for `--gpus N` / `--gpus 0 --procs P`; one-line error otherwise."""
    if gpus < 0 or (procs is not None and procs < 1):
        raise ValueError(f"--gpus {gpus} --procs {procs}: pass --gpus N >= 1, or --gpus 0 --procs P >= 1 (CPU)")
    if gpus == 0:
        return procs or 1, "cpu"
    if procs is not None:
        raise ValueError(f"--procs {procs} is for CPU processes: pass --gpus 0 --procs {procs}, or --gpus {gpus} alone")
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > found:
        names = f" ({', '.join(sorted({torch.cuda.get_device_name(i) for i in range(found)}))})" if found else ""
        raise ValueError(f"--gpus {gpus} but this machine has {found} CUDA device(s){names}: pass --gpus {found or 0}"
                         f"{'' if found else ' --procs N for CPU processes'}, or --dry-run to only plan for {gpus}")
    return gpus, "cuda"


def check_out_dir(out: str | os.PathLike) -> None:
    """Create the run directory and write a probe file in it; a one-line error if that is impossible."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pagoda-write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror or e}: {e.filename or out}): pass a directory "
                         f"you can create and write to") from None


def run_worker(cfg: TrainConfig, progress: bool = True) -> Path:
    """One process of a run (alone, or a rank under torchrun/launch_train): join, train, report, shut down cleanly."""
    check_out_dir(cfg.out)
    info = dist.init(cfg.device)
    out = train(cfg, progress, info)  # the models are dropped when train() returns
    if info.is_main:  # the run report (RUN/report.html, report.md): a failure there only warns
        try:
            write_report(out)
        except Exception as e:  # noqa: BLE001 - training is done and saved; never fail it over the report
            warnings.warn(f"run report not written ({type(e).__name__}: {e}); retry with `pagoda report {out}`",
                          stacklevel=2)
    dist.shutdown(info)  # gc, barrier, destroy_process_group: never at exit with live gloo state
    return out


@record  # writes the exception into torchelastic's error file, so the launcher can name it
def _worker(fn: Callable, args: tuple, kwargs: dict):
    with dist.thread_policy():  # the command's thread policy, in each worker (dist.worker_threads fixes its count)
        return fn(*args, **kwargs)


def _first_line(failure) -> str:
    msg = failure.message
    if isinstance(msg, dict):
        msg = msg.get("message", "")
    lines = str(msg).strip().splitlines()
    return lines[0] if lines else f"exit code {failure.exitcode}"


def launch(fn: Callable, args: tuple, kwargs: dict, gpus: int, procs: int | None = None):
    """fn(*args, **kwargs) on N local workers via elastic_launch (fn joins the group itself, from the
    environment the launcher sets); returns rank 0's result. `device=` is set in kwargs from --gpus/--procs."""
    nproc, device = resolve_workers(gpus, procs)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"pagoda-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    try:
        with dist.worker_threads(nproc, device):  # the workers share the cores (pagoda/dist.py)
            return elastic_launch(config, _worker)(fn, args, {**kwargs, "device": device})[0]
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"killed by signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise LaunchError(f"worker rank {rank} of {nproc} failed ({how}): {_first_line(failure)}; the other workers "
                          f"were stopped; fix the cause and rerun the same command (training resumes)") from None


def _train_worker(cfg: TrainConfig, progress: bool, device: str) -> str:
    return str(run_worker(replace(cfg, device=device), progress))


def launch_train(cfg: TrainConfig, gpus: int, procs: int | None = None, progress: bool = True) -> Path:
    """`pagoda train --gpus N` (or `--gpus 0 --procs P`): N local workers via elastic_launch, then return."""
    resolve_workers(gpus, procs)  # a bad --gpus fails before the run directory is touched
    check_out_dir(cfg.out)  # fail here, before any worker starts
    return Path(launch(_train_worker, (cfg, progress), {}, gpus, procs))
