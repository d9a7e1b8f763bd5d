"""The one owner of the run-directory layout: file and folder names, finished stages, resolving a path.

    RUN/config.json              the resolved config of every stage
    RUN/teacher/teacher.pt       the teacher (EMA weights), if trained here; + checkpoint.pt, grids, metrics.jsonl
    RUN/latents/                 the encoder cache (index.json + shards; image and flip)
    RUN/stage-08/ stage-16/ …    per stage: generator.pt (marks it done), checkpoint.pt, grids, metrics.jsonl
    RUN/eval.json                `pagoda eval` rows;   RUN/report.html, report.md, report_files/   the report

`pagoda sample/invert/eval` accept a checkpoint file, a stage directory or a run directory (then the last
finished stage); `open_model` tells a teacher, a generator and a raw ADM state dict apart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pagoda.decoder import Generator
from pagoda.io import ADM, GENERATOR, TEACHER, CheckpointError, open_checkpoint
from pagoda.teacher import Denoiser, load_teacher

TEACHER_FILE, GENERATOR_FILE, CHECKPOINT_FILE = "teacher.pt", "generator.pt", "checkpoint.pt"
TEACHER_SAMPLES_FILE = "teacher-samples.pt"  # RUN/teacher-samples.pt: L_dstl's teacher ODE samples (every stage)
CONFIG_FILE = "config.json"  # RUN/config.json (every stage) and RUN/teacher/config.json (the teacher job)


def stage_dir_name(res: int) -> str:
    """Run-directory name of the stage at `res`: "stage-08", "stage-16", "stage-128"."""
    return f"stage-{int(res):02d}"


def grid_name(tag: str | int) -> str:
    """File name of a sample grid: grid-final.png, grid-000500.png."""
    return f"grid-{tag:06d}.png" if isinstance(tag, int) else f"grid-{tag}.png"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / CONFIG_FILE)
    teacher_dir = property(lambda self: self.root / "teacher")
    teacher = property(lambda self: self.root / "teacher" / TEACHER_FILE)
    latents = property(lambda self: self.root / "latents")
    teacher_samples = property(lambda self: self.root / TEACHER_SAMPLES_FILE)
    eval = property(lambda self: self.root / "eval.json")
    report_html = property(lambda self: self.root / "report.html")
    report_md = property(lambda self: self.root / "report.md")
    report_files = property(lambda self: self.root / "report_files")

    def stage(self, res: int) -> Path:
        """RUN/stage-XX of the stage at resolution `res`."""
        return self.root / stage_dir_name(res)

    def stages(self) -> list[Path]:
        """Every stage directory (finished or not), lowest resolution first."""
        return sorted((p for p in self.root.glob("stage-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]))

    def finished(self) -> list[Path]:
        """Stage directories with a final generator, lowest resolution first."""
        return [p for p in self.stages() if is_finished(p)]

    def is_run(self) -> bool:
        return self.config.is_file() or bool(self.finished())


def is_finished(stage_dir: Path) -> bool:
    """A stage is done once its EMA generator is written (a finished stage is never redone)."""
    return (Path(stage_dir) / GENERATOR_FILE).is_file()


def run_root(path: str | Path) -> RunDir:
    """The run directory a path points into: itself, RUN/stage-XX[/file] or RUN/teacher[/file] -> RUN."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if p.name == "teacher" or p.name.startswith("stage-"):
        p = p.parent
    return RunDir(p)


def run_of(path: str | Path) -> RunDir | None:
    """run_root(path) if it is a run (a config.json or a finished stage), else None."""
    run = run_root(path)
    return run if run.is_run() else None


def generator_file(path: str | Path) -> Path:
    """A generator checkpoint file, a stage directory, or a run directory (its last finished stage) -> the file."""
    path = Path(path)
    if path.is_dir() and is_finished(path):  # RUN/stage-XX
        return path / GENERATOR_FILE
    if path.is_dir():
        stages = RunDir(path).finished()
        if not stages:
            raise CheckpointError(f"{path} holds no finished stage (no stage-*/{GENERATOR_FILE}): run "
                                  f"`pagoda train --out {path}` first")
        return stages[-1] / GENERATOR_FILE
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a generator .pt or a run directory")
    return path


def resolve_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """The EMA generator of a checkpoint, stage or run directory, frozen for inference."""
    _, ckpt = open_checkpoint(generator_file(path), expect=(GENERATOR,))
    return _frozen(Generator.from_checkpoint(ckpt), device)


def _frozen(G: Generator, device) -> Generator:
    return G.to(device).eval().requires_grad_(False)


def resolve_teacher_path(path: str | Path) -> Path:
    """The teacher of a run: RUN/teacher/teacher.pt, or the --teacher recorded in RUN/config.json."""
    run = run_root(path)
    if run.teacher.is_file():
        return run.teacher
    if run.config.is_file():
        t = json.loads(run.config.read_text()).get("train", {}).get("teacher")
        if t and Path(t).is_file():
            return Path(t)
    raise CheckpointError(f"no teacher found for {path}: pass --teacher CKPT")


def open_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[str, Generator | Denoiser, Path]:
    """('generator', G, file) for a generator checkpoint, stage or run directory; ('teacher', D, file) for a
    teacher checkpoint or a raw ADM state dict."""
    file = generator_file(path)
    kind, ckpt = open_checkpoint(file, expect=(TEACHER, ADM, GENERATOR))
    if kind == GENERATOR:
        return "generator", _frozen(Generator.from_checkpoint(ckpt), device), file
    return "teacher", load_teacher(file, device, ckpt), file
