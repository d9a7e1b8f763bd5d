"""The one owner of the run-directory layout: file and folder names, finished stages, resolving a path to a file.

    RUN/config.json              the resolved config of every stage
    RUN/teacher/teacher.pt       the teacher (EMA weights), if trained here; + checkpoint.pt, config.json, grids, logs
    RUN/latents/                 the encoder cache (index.json + shard-00000.pt …; image and flip) + timing.json
    RUN/teacher-samples.pt       the distillation pool's teacher samples (shared by the stages)
    RUN/stage-08/ stage-16/ …    per stage: generator.pt (marks it done), checkpoint.pt, grids, logs
    RUN/classifier/              `pagoda eval --accuracy`'s classifiers;  RUN/eval.json   `pagoda eval` rows
    RUN/report.html, report.md, report_files/   the report
    a loop's logs:               metrics.jsonl (one line per step), timing.json (at the end)

`pagoda sample/invert/eval` accept a checkpoint file, a stage directory or a run directory (then the last
finished stage's generator): `model_file` resolves the path, pagoda/decoder.py's `load_model` loads the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pagoda.io import CheckpointError

TEACHER_FILE, GENERATOR_FILE, CHECKPOINT_FILE = "teacher.pt", "generator.pt", "checkpoint.pt"
CONFIG_FILE = "config.json"  # RUN/config.json (every stage) and RUN/teacher/config.json (the teacher job)
PROMPT_GRID = "prompts.png"  # RUN/teacher/ and RUN/stage-XX/: a text run's grid of the same prompts (pagoda report)
METRICS_FILE, TIMING_FILE = "metrics.jsonl", "timing.json"  # a training loop's logs (pagoda/loop.py), in its folder
INDEX_FILE = "index.json"  # a latent cache's CacheInfo (pagoda/encoder.py)
TEACHER_SAMPLES_FILE = "teacher-samples.pt"  # the distillation pool's teacher samples, RUN/teacher-samples.pt


def stage_dir_name(res: int) -> str:
    """Run-directory name of the stage at `res`: "stage-08", "stage-16", "stage-128"."""
    return f"stage-{int(res):02d}"


def shard_name(i: int) -> str:
    """File name of latent-cache shard i: shard-00000.pt."""
    return f"shard-{i:05d}.pt"


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
    teacher = property(lambda self: self.teacher_dir / TEACHER_FILE)
    teacher_config = property(lambda self: self.teacher_dir / CONFIG_FILE)
    latents = property(lambda self: self.root / "latents")
    teacher_samples = property(lambda self: self.root / TEACHER_SAMPLES_FILE)
    classifier = property(lambda self: self.root / "classifier")
    eval = property(lambda self: self.root / "eval.json")
    report_html = property(lambda self: self.root / "report.html")
    report_md = property(lambda self: self.root / "report.md")
    report_files = property(lambda self: self.root / "report_files")

    def stage(self, res: int) -> Path:
        """RUN/stage-XX of the stage at resolution `res`."""
        return self.root / stage_dir_name(res)

    def generator(self, res: int) -> Path:
        """RUN/stage-XX/generator.pt of the stage at `res` (its final EMA generator)."""
        return self.stage(res) / GENERATOR_FILE

    def checkpoint(self, res: int) -> Path:
        """RUN/stage-XX/checkpoint.pt of the stage at `res` (its resumable training state)."""
        return self.stage(res) / CHECKPOINT_FILE

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


def model_file(path: str | Path) -> Path:
    """A checkpoint file (itself), a stage directory or a run directory (its last finished stage) -> a generator or
    teacher file."""
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
