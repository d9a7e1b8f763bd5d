"""`pagoda eval`: FID/KID of a generator or a teacher, as the paper measures them, into RUN/eval.json.

    pagoda eval --checkpoint runs/demo --n 10000                        # last stage vs Fashion-MNIST train
    pagoda eval --checkpoint runs/demo --all-stages --n 500 --ref-n 500 # teacher + every stage (CPU-sized)
    pagoda eval --checkpoint runs/demo/teacher/teacher.pt --solver dpmpp_2m --nfe 10
    pagoda eval --checkpoint runs/emoji --ref emoji --n 2000           # a text run: its training captions in turn

Generators and teachers are measured by the same code: z ~ N(0, σ_max² I) at the teacher resolution in
seeded batches, class labels cycling 0..C−1, images scored by `metrics.evaluate` (clean-fid's resize to
299²) against the reference at the images' own resolution (Fashion-MNIST downsampled the ADM way).
Results are merged into RUN/eval.json, whose rows the report's FID table shows. With `accuracy` (`--accuracy`)
the same images also go through the run's Fashion-MNIST classifier (pagoda/classifier.py): the fraction put in
their conditioning class. A text model's image i has caption i mod N of its run's N training captions (a fixed
shuffle); its text alignment is bench/t2i_eval.py's.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich.table import Table

import numpy as np

from pagoda import dist
from pagoda.classifier import NUM_CLASSES, classifier_for
from pagoda.data import FASHION_MNIST_NAMES
from pagoda.decoder import load_model
from pagoda.dist import DistInfo, pick_device
from pagoda.inference import make_sampler
from pagoda.io import CheckpointError, save_json
from pagoda.loop import index_labels, progress_bar
from pagoda.metrics import evaluate
from pagoda.prompts import run_captions, shuffled
from pagoda.rundir import GENERATOR_FILE, RunDir, model_file, resolve_teacher_path, run_of, run_root

TaskProgressFn = Callable[[str, int, int], None]  # (task, done, total), as metrics.evaluate reports


# Models and samplers -----------------------------------------------------------------------------

def describe(kind: str, model: torch.nn.Module, solver: str, nfe: int, resize: int | None, guidance: float = 1.0) -> str:
    """A row name: 'G 16px, 1 NFE', 'teacher 8px, heun 35 NFE, ω=2 → bicubic 32px'."""
    res = model.resolution
    name = f"G {res}px, 1 NFE" if kind == "generator" else f"teacher {res}px, {solver} {nfe} NFE"
    if guidance != 1.0:
        name += f", ω={guidance:g}"
    if resize and resize != res:
        name += f" → {'bicubic' if resize > res else 'ADM'} {resize}px"
    return name


class ClassAccuracy:
    """metrics.evaluate's on_images hook: which samples the run's classifier puts in their class (index_labels)."""

    def __init__(self, model: torch.nn.Module, path: Path, resolution: int, info: DistInfo,
                 progress: Callable[[int, int], None] | None = None):
        cfg = model.unet.config
        if (cfg.num_classes, cfg.in_channels) != (NUM_CLASSES, 1):
            raise ValueError(f"--accuracy scores Fashion-MNIST models (10 classes, 1 channel), not this one "
                             f"({cfg.num_classes} classes, {cfg.in_channels} channels); fix: drop --accuracy")
        folder = run_root(path).classifier
        if info.is_main:
            classifier_for(folder, resolution, progress)  # trained and cached once, by rank 0
        dist.barrier(info)
        self.classifier = classifier_for(folder, resolution)  # on the CPU, where the samples arrive
        self.info, self.hits = info, [torch.zeros(0, dtype=torch.bool)]

    def __call__(self, i: int, images: torch.Tensor) -> None:
        self.hits.append(self.classifier.correct(images, index_labels(i, len(images), NUM_CLASSES)))

    def value(self) -> float:
        """The fraction over every rank's samples."""
        return float(dist.gather_array(torch.cat(self.hits).numpy().astype(np.int64), self.info).mean())


def text_prompts(model: torch.nn.Module, checkpoint: str | Path, ref: str, accuracy: bool = False) -> list[str] | None:
    """A text model's prompts: its run's training captions in a fixed shuffled order (image i has caption i mod N, so
    the first n cover every group); None for a class model. One-line errors for what a text model cannot be scored by."""
    if getattr(model, "text_encoder", None) is None:
        return None
    if accuracy:
        raise ValueError("--accuracy is the Fashion-MNIST class accuracy; a text run's alignment (subgroup accuracy, "
                         "retrieval) is bench/t2i_eval.py: drop --accuracy")
    if str(ref).lower() in FASHION_MNIST_NAMES:
        raise ValueError(f"a text model is scored against its own captioned data, not {ref}: pass --ref emoji")
    captions = run_captions(checkpoint)
    if not captions:
        raise ValueError(f"{checkpoint}: no run with captioned data around it (config.json) to take prompts from: "
                         f"pass the run directory or one of its stages")
    return shuffled(captions)


def _open_sampler(checkpoint: str | Path, solver: str, nfe: int, resize: int | None, seed: int, dev: torch.device,
                  guidance: float = 1.0, ref: str = "fashion-mnist", accuracy: bool = False,
                  run: str | Path | None = None) -> tuple[torch.nn.Module, Path, Callable[[int, int], torch.Tensor], dict]:
    """(model, file, generate, the row's head: model name, kind, checkpoint, resolution, solver, nfe, guidance, seed;
    a text model's rows also `prompts`); a text model's prompts come from `run` (default: the checkpoint's run)."""
    path = model_file(checkpoint)
    kind, model = load_model(path, dev)
    prompts = text_prompts(model, run or checkpoint, ref, accuracy)
    head = {"model": describe(kind, model, solver, nfe, resize, guidance), "kind": kind,
            "checkpoint": str(path.resolve()), "resolution": resize or model.resolution,
            "solver": solver if kind == "teacher" else None, "nfe": nfe if kind == "teacher" else 1,
            "guidance": guidance, "seed": seed, **({"prompts": f"{len(prompts)} training captions, cycled"} if prompts else {})}
    return model, path, make_sampler(kind, model, solver, nfe, resize, seed, dev, guidance=guidance, prompts=prompts), head


def _scorer(model: torch.nn.Module, path: Path, resolution: int, info: DistInfo, name: str,
            progress: TaskProgressFn | None) -> ClassAccuracy | None:
    """A ClassAccuracy for a class-conditional model (None for an unconditional one)."""
    if model.unet.config.num_classes is None:
        return None
    prog = None if progress is None else (lambda done, total: progress(f"{name}: classifier", done, total))
    return ClassAccuracy(model, path, resolution, info, prog)


def evaluate_checkpoint(checkpoint: str | Path, n: int = 10_000, ref: str = "fashion-mnist", split: str = "train",
                        ref_n: int | None = None, solver: str = "heun", nfe: int = 35, resize: int | None = None,
                        batch: int = 64, seed: int = 0, device: str = "auto", cache_dir: Path | None = None,
                        progress: TaskProgressFn | None = None, info: DistInfo | None = None,
                        precision_recall: bool = False, accuracy: bool = False, guidance: float = 1.0,
                        run: str | Path | None = None) -> dict:
    """FID/KID (and precision/recall; with `accuracy`, ClassAccuracy of the same images) of n samples of a generator
    (checkpoint or run dir) or a teacher (with solver/nfe), as metrics.evaluate (split across the ranks of `info`,
    each on its own device); a text model samples its run's training captions in turn (text_prompts)."""
    info = info or DistInfo()
    dev = info.device if info.enabled else pick_device(device)
    model, path, generate, head = _open_sampler(checkpoint, solver, nfe, resize, seed, dev, guidance, ref, accuracy, run)
    name = head["model"]
    scorer = _scorer(model, path, head["resolution"], info, name, progress) if accuracy else None
    prog = None if progress is None else (lambda task, done, total: progress(f"{name}: {task}", done, total))
    out = evaluate(generate, ref, n, batch, split, dev, max_ref_images=ref_n, cache_dir=cache_dir, progress=prog,
                   info=info, with_precision_recall=precision_recall, on_images=scorer)
    if scorer is not None:
        out["accuracy"] = scorer.value()
    return {**head, "split": split, **out}


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
    return [evaluate_checkpoint(m, run=run_dir, **kw) for m in models]


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
    pr, acc = any("precision" in r for r in results), any("accuracy" in r for r in results)
    for col in ("model", "n", "FID", "KID ×10³", *(("precision", "recall") if pr else ()), *(("accuracy",) if acc else ()),
                "reference", "seconds"):
        t.add_column(col, justify="left" if col in ("model", "reference") else "right")
    for r in results:
        kid = "–" if r.get("kid") is None else f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f}"
        prs = [f"{r[k]:.3f}" if k in r else "–" for k in ("precision", "recall")] if pr else []
        accs = [f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else "–"] if acc else []
        t.add_row(r["model"], str(r["n"]), f"{r['fid']:.2f}", kid, *prs, *accs, f"{r['ref']} (n={r['ref_n']})",
                  f"{r['seconds']:.0f}")
    return t
