"""How a process shares the machine: torch.distributed plumbing (process group from torchrun's environment,
gradient averaging, clean exit) and the CPU thread policy.

Single process (no RANK/WORLD_SIZE in the environment) is world size 1 and every call is a no-op.
Under torchrun (or `pagoda train --gpus N`, which starts the same elastic launcher, see pagoda/launch.py):

    torchrun --standalone --nproc-per-node 8 -m pagoda.cli train --res 128 ...          # one node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
             --rdzv-id pagoda-run -m pagoda.cli train --res 128 ...                      # two nodes

Timeouts: per-step collectives use the process-group timeout (PAGODA_DIST_TIMEOUT seconds, default
1800); phase barriers (rank 0 trains the teacher, ranks finish encoding) use a separate gloo group with
PAGODA_DIST_LONG_TIMEOUT (default 4 h). A rank that dies is noticed by the elastic agent, which stops the
others; a hung collective raises after the timeout. Either way the job exits non-zero.

CPU threads (`ThreadPolicy`): torch's OpenMP threads meet at a barrier after every op. When another process
holds a core, one of our threads is descheduled and the others wait at the barrier for it (spinning first):
with a 4-thread job beside it, a 2-thread stage-08 ran 3-4x slower here (60x on another machine). So the
`pagoda` commands use as many threads as the cores other processes leave free, re-measured every 5 s from
/proc/stat (`thread_policy()` around a command; the loops call `update_threads()`): 2.0x slower beside the same
job (bench/shared_machine.py). The OpenMP wait policy stays libgomp's default: PASSIVE (threads sleep at once)
cost 15 % alone and did not help once the count adapts. `--threads N`, PAGODA_THREADS=N or OMP_NUM_THREADS=N
fixes the count (then a run is bit-reproducible whatever else runs); library calls outside a command keep
torch's own setting. Local CPU workers (`--gpus 0 --procs P`) share the cores as torchrun shares them:
`worker_threads(P)` gives each ⌊cpus / P⌋ threads unless the count is fixed.
"""
from __future__ import annotations

import gc
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

TIMEOUT_S = 1800.0  # default process-group timeout (PAGODA_DIST_TIMEOUT overrides)
LONG_TIMEOUT_S = 4 * 3600.0  # default timeout of phase barriers (PAGODA_DIST_LONG_TIMEOUT overrides)
FAULT_ENV = "PAGODA_TEST_FAULT"  # test hook, see fault_hook()


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, its device (and the gloo group for long barriers)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    long_group: object = None  # gloo group with a long timeout, for barriers between phases

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' = this rank's CUDA device when available, else CPU; 'cpu' / 'cuda' force it."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a number of seconds: set e.g. {env}={int(default)}") from None
    if value <= 0:
        raise ValueError(f"{env}={raw} must be positive: set e.g. {env}={int(default)}")
    return value


def init(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    long_group = None
    if world > 1:
        timeout = _seconds("PAGODA_DIST_TIMEOUT", TIMEOUT_S)
        long_timeout = max(timeout, _seconds("PAGODA_DIST_LONG_TIMEOUT", LONG_TIMEOUT_S))
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        long_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=long_timeout))
    return DistInfo(rank, world, local, dev, long_group)


def all_reduce_mean_(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """In-place mean over ranks (one flat buffer: one collective however many tensors)."""
    if not info.enabled or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params, info: DistInfo) -> None:
    """Average .grad of `params` across ranks, as DDP's reducer does (missing grads count as zeros)."""
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([p.grad for p in params], info)


def broadcast_(tensors: list[torch.Tensor], info: DistInfo, src: int = 0) -> None:
    """Copy rank src's tensors to every rank (initial weights)."""
    if info.enabled:
        for t in tensors:
            dist.broadcast(t, src)


def split(n: int, info: DistInfo) -> range:
    """This rank's contiguous share of range(n) (sizes differ by at most one): evaluation work split."""
    per, extra = divmod(n, info.world_size)
    start = info.rank * per + min(info.rank, extra)
    return range(start, start + per + (info.rank < extra))


def gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0, in rank order (lengths may differ), on every rank."""
    if not info.enabled:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def gather_array(a: np.ndarray, info: DistInfo) -> np.ndarray:
    """gather_cat for a NumPy array (sent through this rank's device: NCCL takes CUDA tensors only)."""
    if not info.enabled:
        return a
    return gather_cat(torch.from_numpy(np.ascontiguousarray(a)).to(info.device), info).cpu().numpy()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank src's (picklable) obj on every rank: one decision or result for all (e.g. "is it cached?")."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=info.device)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank between phases (long timeout: rank 0 may train a teacher meanwhile)."""
    if info.enabled:
        dist.barrier(group=info.long_group)


def shutdown(info: DistInfo) -> None:
    """Free what is collectable, barrier, destroy the group: gloo can abort at exit otherwise. Call after
    dropping the models (only on success: after a failure the other ranks are gone, a barrier would wait)."""
    gc.collect()
    if info.enabled and dist.is_initialized():
        dist.barrier(group=info.long_group)
        if info.long_group is not None:
            dist.destroy_process_group(info.long_group)
        dist.destroy_process_group()


def fault_hook(info: DistInfo, where: str, step: int) -> None:
    """Test hook: PAGODA_TEST_FAULT='RANK:WHERE:STEP:raise|kill' makes that rank raise, or SIGKILL itself,
    when `where` (a stage directory name like 'stage-08', or 'teacher') reaches `step`. Unset = no-op."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, at, k, action = spec.split(":")
    if int(rank) == info.rank and at == where and int(k) == step:
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{FAULT_ENV}: rank {info.rank} raised at {where} step {step} (test fault)")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _busy_seconds() -> float | None:
    """Machine-wide busy CPU seconds since boot (/proc/stat), None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ThreadPolicy:
    """Intra-op threads = the CPUs other processes leave free, re-measured every `every` seconds by `update()`.

    others = (machine busy CPU time − this process's CPU time) / wall time, over the last interval; threads =
    clamp(cpus − ⌊others + 1/4⌋, 1, cpus). A fixed count (PAGODA_THREADS, OMP_NUM_THREADS or `fixed`) disables it.
    """

    def __init__(self, fixed: int | None = None, every: float = 5.0):
        env = os.environ.get("PAGODA_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if fixed is None and env:
            try:
                fixed = int(env)
            except ValueError:
                raise ValueError(f"PAGODA_THREADS/OMP_NUM_THREADS={env!r} is not a number of threads: set e.g. 2") from None
        if fixed is not None and fixed < 1:
            raise ValueError(f"--threads {fixed}: pass a number of threads >= 1")
        self.cpus, self.fixed, self.every = available_cpus(), fixed, every
        self.threads = fixed or self.cpus
        self._mark = self._sample()
        torch.set_num_threads(self.threads)

    def _sample(self) -> tuple[float, float | None, float]:
        return time.monotonic(), _busy_seconds(), time.process_time()

    def update(self) -> int:
        """Re-measure the others' load when `every` seconds have passed and set torch's thread count; returns it."""
        now = time.monotonic()
        if self.fixed is not None or now - self._mark[0] < self.every:
            return self.threads
        (t0, busy0, own0), (t1, busy1, own1) = self._mark, self._sample()
        self._mark = (t1, busy1, own1)
        if busy0 is None or busy1 is None:
            return self.threads
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)
        taken = math.floor(others + 0.25)  # a core counts as taken once others use 3/4 of it: short kernel work
        threads = int(min(self.cpus, max(1, self.cpus - taken)))  # (a checkpoint's page flush) changes nothing
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)
        return threads


@contextmanager
def worker_threads(workers: int, device: str):
    """While local workers are started: on CPU each gets ⌊available_cpus() / workers⌋ threads through OMP_NUM_THREADS
    (as torchrun; inherited by spawn, read by their ThreadPolicy) unless it is set; the environment is restored."""
    preset = os.environ.get("OMP_NUM_THREADS")
    if device == "cpu" and preset is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, available_cpus() // workers))
    try:
        yield
    finally:
        if preset is None:
            os.environ.pop("OMP_NUM_THREADS", None)


_POLICY: ThreadPolicy | None = None  # installed by thread_policy() for the duration of a command


@contextmanager
def thread_policy(fixed: int | None = None):
    """Run a command under a ThreadPolicy (adaptive, or `fixed` threads, also for the workers it spawns: they read
    PAGODA_THREADS); torch's previous count and the environment are restored afterwards."""
    global _POLICY
    before, outer, env = torch.get_num_threads(), _POLICY, os.environ.get("PAGODA_THREADS")
    if fixed is not None:
        os.environ["PAGODA_THREADS"] = str(fixed)
    try:
        _POLICY = ThreadPolicy(fixed)
        yield _POLICY
    finally:
        _POLICY = outer
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("PAGODA_THREADS", None)
        else:
            os.environ["PAGODA_THREADS"] = env


def update_threads() -> int:
    """Let the installed ThreadPolicy re-measure the machine (no-op outside a command); returns torch's thread count."""
    return _POLICY.update() if _POLICY is not None else torch.get_num_threads()
