"""`pagoda eval`: FID/KID of a generator or a teacher, as the paper measures them, into RUN/eval.json.

    pagoda eval --checkpoint runs/demo --n 10000                        # last stage vs Fashion-MNIST train
    pagoda eval --checkpoint runs/demo --all-stages --n 500 --ref-n 500 # teacher + every stage (CPU-sized)
    pagoda eval --checkpoint runs/demo/teacher/teacher.pt --solver dpmpp_2m --nfe 10

Generators and teachers are measured by the same code: z ~ N(0, σ_max² I) at the teacher resolution in
seeded batches, class labels cycling 0..C−1, images scored by `metrics.evaluate` (clean-fid's resize to
299²) against the reference at the images' own resolution (Fashion-MNIST downsampled the ADM way).
Results are merged into RUN/eval.json, whose rows the report's FID table shows.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from rich.table import Table

from pagoda import dist
from pagoda.data import downsample
from pagoda.dist import DistInfo, pick_device
from pagoda.io import CheckpointError, save_json
from pagoda.loop import progress_bar, step_generator
from pagoda.metrics import evaluate
from pagoda.rundir import GENERATOR_FILE, RunDir, open_model, resolve_teacher_path, run_of
from pagoda.solvers import karras_sigmas, nfe as count_nfe, sample

TaskProgressFn = Callable[[str, int, int], None]  # (task, done, total), as metrics.evaluate reports


# Models and samplers -----------------------------------------------------------------------------

def solver_steps(method: str, nfe: int) -> int:
    """Karras grid points (a final σ = 0 appended) on which `method` makes exactly `nfe` denoiser calls."""
    steps = (nfe + 1) // 2 if method == "heun" else nfe  # Heun: 2(n−1) − 1 calls; Euler, DPM-Solver++: n − 1
    if steps < 2 or count_nfe(method, torch.cat([karras_sigmas(steps), torch.zeros(1)])) != nfe:
        raise ValueError(f"{method} cannot take {nfe} NFE; fix: heun takes odd NFE >= 3 (e.g. 35, 79), "
                         f"euler and dpmpp_2m any NFE >= 2")
    return steps


def resample(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Images to size×size: bicubic up-sampling (clamped to [−1, 1]) or ADM down-sampling; None = unchanged."""
    if size is None or size == x.shape[-1]:
        return x
    if size < x.shape[-1]:
        return downsample(x, size)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def make_sampler(kind: str, model: torch.nn.Module, solver: str = "heun", nfe: int = 35, resize: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu") -> Callable[[int, int], torch.Tensor]:
    """generate(i, b) -> images i … i+b−1 (CPU, [−1, 1]); image i has z ~ N(0, σ_max² I) seeded by (seed, i) and
    label i mod C, so the sequence does not depend on how it is cut into batches or split across ranks."""
    cfg = model.unet.config
    R, C, ncls = cfg.resolution, cfg.in_channels, cfg.num_classes
    steps = solver_steps(solver, nfe) if kind == "teacher" else 0
    sigma_max = model.sigma_max  # the generator's or the teacher's

    @torch.no_grad()
    def generate(i: int, b: int) -> torch.Tensor:
        z = torch.stack([torch.randn(C, R, R, generator=step_generator(seed, 5, k)) for k in range(i, i + b)])
        z = (sigma_max * z).to(device)
        y = None if ncls is None else ((i + torch.arange(b)) % ncls).to(device)
        x = model(z, y) if kind == "generator" else sample(model, z, steps, solver, y, model.sigma_min, sigma_max)
        return resample(x.float().clamp(-1, 1), resize).cpu()

    return generate


def describe(kind: str, model: torch.nn.Module, solver: str, nfe: int, resize: int | None) -> str:
    """A row name: 'G 16px, 1 NFE', 'teacher 8px, heun 35 NFE → bicubic 32px'."""
    res = model.resolution
    name = f"G {res}px, 1 NFE" if kind == "generator" else f"teacher {res}px, {solver} {nfe} NFE"
    if resize and resize != res:
        name += f" → {'bicubic' if resize > res else 'ADM'} {resize}px"
    return name


def evaluate_checkpoint(checkpoint: str | Path, n: int = 10_000, ref: str = "fashion-mnist", split: str = "train",
                        ref_n: int | None = None, solver: str = "heun", nfe: int = 35, resize: int | None = None,
                        batch: int = 64, seed: int = 0, device: str = "auto", cache_dir: Path | None = None,
                        progress: TaskProgressFn | None = None, info: DistInfo | None = None,
                        precision_recall: bool = False) -> dict:
    """FID/KID (and precision/recall) of n samples of a generator (checkpoint or run dir) or a teacher (with
    solver/nfe), as metrics.evaluate (split across the ranks of `info`, each on its own device)."""
    dev = info.device if info is not None and info.enabled else pick_device(device)
    kind, model, path = open_model(checkpoint, dev)
    generate = make_sampler(kind, model, solver, nfe, resize, seed, dev)
    name = describe(kind, model, solver, nfe, resize)
    prog = None if progress is None else (lambda task, done, total: progress(f"{name}: {task}", done, total))
    out = evaluate(generate, ref, n, batch, split, dev, max_ref_images=ref_n, cache_dir=cache_dir, progress=prog,
                   info=info, with_precision_recall=precision_recall)
    res = resize or model.resolution
    return {"model": name, "kind": kind, "checkpoint": str(path.resolve()),
            "resolution": res, "solver": solver if kind == "teacher" else None,
            "nfe": nfe if kind == "teacher" else 1, "seed": seed, "split": split, **out}


def evaluate_run(run_dir: str | Path, teacher: bool = True, **kw) -> list[dict]:
    """The run's teacher (if found; kw solver/nfe) and every finished stage, each scored by evaluate_checkpoint(**kw)."""
    stages = RunDir(run_dir).finished()
    if not stages:
        raise CheckpointError(f"{run_dir} holds no finished stage (no stage-*/{GENERATOR_FILE}): train it first")
    models = [s / GENERATOR_FILE for s in stages]
    if teacher:
        try:
            models.insert(0, resolve_teacher_path(run_dir))
        except CheckpointError:
            pass  # a run without a teacher file: the generator rows alone
    return [evaluate_checkpoint(m, **kw) for m in models]


def record_results(results: list[dict], path: str | Path) -> Path:
    """Merge results into an eval.json ({"results": [...]}): a row with the same model, checkpoint, n, ref is replaced."""
    path = Path(path)
    key = lambda r: (r.get("checkpoint"), r.get("model"), r.get("n"), r.get("ref"), r.get("mode"))  # noqa: E731
    rows = json.loads(path.read_text()).get("results", []) if path.is_file() else []
    new = {key(r) for r in results}
    return save_json({"results": [r for r in rows if key(r) not in new] + list(results)}, path)


def run_eval(checkpoint: str | Path, all_stages: bool = False, out: str | Path | None = None, progress: bool = True,
             device: str = "auto", **kw) -> tuple[list[dict], Path]:
    """`pagoda eval` in one process or as one rank (torchrun / launch): score, rank 0 merges the rows into `out`
    (default RUN/eval.json, else ./eval.json); returns (rows, that path) on every rank."""
    info = dist.init(device)
    with eval_progress(progress and info.is_main) as bar:
        kw.update(progress=bar if info.is_main else None, info=info, device=device)
        results = evaluate_run(checkpoint, **kw) if all_stages else [evaluate_checkpoint(checkpoint, **kw)]
    run = run_of(checkpoint)
    path = Path(out) if out else run.eval if run else Path("eval.json")
    if info.is_main:
        record_results(results, path)
    dist.shutdown(info)
    return results, path


@contextmanager
def eval_progress(enabled: bool = True) -> Iterator[TaskProgressFn]:
    """A rich progress bar (one line per task) fed by metrics.evaluate's (task, done, total) callback."""
    with progress_bar(enabled) as bar:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total, info="")
            bar.update(tasks[task], completed=done, total=total)

        yield update


def results_table(results: list[dict], title: str = "FID / KID") -> Table:
    """A rich Table of evaluation rows."""
    t = Table(title=title)
    pr = any("precision" in r for r in results)
    for col in ("model", "n", "FID", "KID ×10³", *(("precision", "recall") if pr else ()), "reference", "seconds"):
        t.add_column(col, justify="left" if col in ("model", "reference") else "right")
    for r in results:
        kid = "–" if r.get("kid") is None else f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f}"
        prs = [f"{r[k]:.3f}" if k in r else "–" for k in ("precision", "recall")] if pr else []
        t.add_row(r["model"], str(r["n"]), f"{r['fid']:.2f}", kid, *prs, f"{r['ref']} (n={r['ref_n']})",
                  f"{r['seconds']:.0f}")
    return t
