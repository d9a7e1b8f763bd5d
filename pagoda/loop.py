"""What every training loop shares: counter-based randomness, EMA, finite checks, the progress bar, and the
scaffold that drives a loop (metrics.jsonl, checkpoint cadence, timing.json).

Every random draw of step k comes from a generator seeded by (seed, keys..., k), so data order, noise and
augmentation are a pure function of the step: `--resume` after a kill continues bit-identically, and a global
batch is the same whether one rank computes it or several split it.

    for stats in run_loop(step_fn, save_fn, LoopSpec("stage-16 (16px)", total=250, batch=64), start, out_dir):
        ...                                  # step_fn() trains one step and returns its numbers
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pagoda.dist import update_threads
from pagoda.io import save_json
from pagoda.rundir import METRICS_FILE, TIMING_FILE  # written by run_loop into a loop's directory


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, bad state); the message names the step and what to do."""


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *keys): counter-based randomness, so resume is exact."""
    s = seed
    for k in keys:
        s = (s * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


class EMA:
    """Exponential moving average of a module's floating-point state (θ_ema ← d θ_ema + (1−d) θ)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int | None = None) -> None:
        """One EMA step; with `step`, the decay warms up as min(d, (1+step)/(10+step)) (short runs)."""
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.state_dict().values(), module.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1 - d)
            else:
                e.copy_(p)


def check_finite(step: int, **losses: float) -> None:
    """Stop with a one-line error naming the step and the loss when a loss is NaN/inf."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        name, val = next(iter(bad.items()))
        raise TrainingError(f"loss {name} = {val} at step {step}: training diverged; the last good checkpoint is kept "
                            f"(lower the learning rate, then rerun with --resume)")


def index_labels(i: int, b: int, num_classes: int | None, class_: int | None = None) -> torch.Tensor | None:
    """Labels of images i … i+b−1: `class_` for all, else i mod C (None for an unconditional model). Every grid
    and export labels its images so: a C-wide grid shows one class per column, an export's image i has class i mod C."""
    if not num_classes:
        return None
    return torch.full((b,), class_) if class_ is not None else (i + torch.arange(b)) % num_classes


LINE_EVERY = 10.0  # seconds between two progress lines when stdout is not a terminal


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LineProgress:
    """rich.Progress's add_task/update for a log file: one full plain line per task at its first update, every
    `every` seconds, and at its end: name, step/total, the task's numbers, elapsed time and ETA."""

    def __init__(self, every: float = LINE_EVERY, stream: TextIO | None = None):
        self.every, self.stream, self.tasks = every, stream, []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: int | None = None, completed: int = 0, info: str = "") -> int:
        now = time.monotonic()
        self.tasks.append(dict(name=description, total=total, done=completed, first=completed, info=info, t0=now,
                               last=None))
        return len(self.tasks) - 1

    def update(self, task: int, completed: int | None = None, total: int | None = None, info: str | None = None) -> None:
        t, now = self.tasks[task], time.monotonic()
        t.update({k: v for k, v in dict(done=completed, total=total, info=info).items() if v is not None})
        end = t["total"] is not None and t["done"] >= t["total"]
        if t["last"] is not None and now - t["last"] < self.every and not end:
            return
        t["last"], elapsed = now, now - t["t0"]
        rate = (t["done"] - t["first"]) / max(elapsed, 1e-9)
        eta = _duration((t["total"] - t["done"]) / rate) if t["total"] is not None and rate > 0 else "?"
        parts = [t["name"], f"step {t['done']}/{'?' if t['total'] is None else t['total']}", t["info"],
                 f"elapsed {_duration(elapsed)}", f"ETA {eta}"]
        print("  ".join(p for p in parts if p), file=self.stream or sys.stdout, flush=True)


def progress_bar(enabled: bool, every: float = LINE_EVERY) -> Progress | LineProgress:
    """A rich progress bar on a terminal, plain lines (LineProgress) when stdout is a file or a pipe, or nothing."""
    if enabled and not sys.stdout.isatty():
        return LineProgress(every)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)


@dataclass(frozen=True)
class LoopSpec:
    """How run_loop drives a loop: its name on the bar, length, batch (for images/s) and cadences."""

    name: str  # progress-bar label
    total: int  # the loop ends when the step count reaches this
    batch: int  # images per step (global batch), for the images/s figure
    ckpt_every: int  # save_fn() every N steps and at the end
    every: int = 0  # on_every(step) every N steps (0 = never), e.g. sample grids
    at_end: bool = False  # also call on_every at the last step


def run_loop(step_fn: Callable[[], dict[str, float]], save_fn: Callable[[], None], spec: LoopSpec, start: int,
             out: Path | None, progress: bool = True, on_every: Callable[[int], None] | None = None) -> None:
    """Call step_fn until the step count reaches spec.total: one line of out/metrics.jsonl per step
    ({"step", **stats, "img_per_s", "threads"}), save_fn() on the checkpoint cadence, out/timing.json at the end.
    out = None (ranks other than 0) trains the same steps silently."""
    log = (Path(out) / METRICS_FILE).open("a") if out is not None else None
    t0, c0, seen, step = time.perf_counter(), time.process_time(), 0, start
    with progress_bar(progress and out is not None) as bar:
        task = bar.add_task(spec.name, total=spec.total, completed=step, info="")
        while step < spec.total:
            stats = step_fn()
            step, seen = step + 1, seen + spec.batch
            ips = seen / (time.perf_counter() - t0)
            bar.update(task, completed=step, info="  ".join(f"{k} {v:.4g}" for k, v in stats.items()) + f"  {ips:.0f} img/s")
            if log:
                log.write(json.dumps({"step": step, **stats, "img_per_s": ips, "threads": update_threads()}) + "\n")
            else:
                update_threads()
            if step % spec.ckpt_every == 0 or step == spec.total:
                if log:
                    log.flush()
                save_fn()
            if on_every and ((spec.every and step % spec.every == 0) or (spec.at_end and step == spec.total)):
                on_every(step)
    if log:
        log.close()
        path = Path(out) / TIMING_FILE
        # a resumed loop adds its session to the timing of the sessions before it (a killed session, which wrote
        # no timing, is not counted: "steps" says how many steps the seconds are of)
        prev = json.loads(path.read_text()) if start > 0 and path.is_file() else {}
        dt = prev.get("seconds", 0.0) + time.perf_counter() - t0
        steps = prev.get("steps", 0) + spec.total - start
        save_json({"seconds": dt, "cpu_seconds": prev.get("cpu_seconds", 0.0) + time.process_time() - c0,
                   "steps": steps, "img_per_s": steps * spec.batch / max(dt, 1e-9)}, path)
