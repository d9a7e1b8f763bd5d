"""Every command the docs show is run: the README's code blocks, each command's `--help` examples and the module
docstring of pagoda/cli.py are read here, so the docs and the tests cannot drift.

RUNS says, for each documented command (the key: its text as written), how it runs here: the options appended to make
it tiny (the last value of an option wins) and, rarely, a path it takes instead of one that cannot exist here; or why
it does not run in this file (then the test that covers it, or the reason nothing can). The commands run in RUNS's
order, through Typer's CliRunner, in one working directory holding the docs' inputs (photo.png, shirt.png, T.pt …),
so their relative paths (runs/demo, samples/, …) stand as written: the first two build the tiny run runs/demo that
the others read. FID uses the stand-in Inception of tests/helpers.py (the real one: tests/test_eval.py).
A documented command without a row, a row without a command, or a command that fails: the test fails.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from typer.main import get_command

import pagoda.cli
from pagoda import classifier as C, metrics as M
from pagoda.cli import app
from pagoda.data import load_fashion_mnist
from pagoda.images import tensor_to_pil

from helpers import StandInInception, invoke

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("pagoda", "./dev", "torchrun")  # a documented line starting with one of these is a command


# ---- the documented commands -------------------------------------------------------------------------

def command_lines(text: str) -> list[str]:
    """Commands in a block of shell text: continuation lines joined, comments dropped, whitespace normalised."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line.split(" ")[0] in PROGRAMS:
            out.append(" ".join(line.split()))
    return out


def readme_commands() -> list[str]:
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    return [c for block in blocks for c in command_lines(block)]


def help_commands() -> list[str]:
    """The `Examples:` epilog of every command's --help."""
    def walk(group):
        for cmd in group.commands.values():
            yield from walk(cmd) if hasattr(cmd, "commands") else [cmd]
    return [c for cmd in walk(get_command(app)) for c in command_lines(cmd.epilog or "")]


def documented() -> dict[str, str]:
    """{command: where it is shown}, each command once."""
    found = {}
    for where, commands in (("README.md", readme_commands()), ("--help", help_commands()),
                            ("pagoda/cli.py docstring", command_lines(pagoda.cli.__doc__))):
        for c in commands:
            found.setdefault(c, where)
    return found


# ---- how each one runs here ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """Run the command with `extra` appended (and `swap` {documented arg: arg here}); `slow`: only with -m slow."""

    extra: tuple[str, ...] = ()
    swap: tuple[tuple[str, str], ...] = ()
    slow: bool = False

    def args(self, command: str) -> list[str]:
        swap = dict(self.swap)
        return [swap.get(a, a) for a in shlex.split(command)[1:]] + list(self.extra)


@dataclass(frozen=True)
class Elsewhere:
    """Not run in this file: `why`, and which test covers it (if any can)."""

    why: str


TINY_TEACHER = ("--preset", "tiny", "--steps", "10", "--batch", "16", "--no-progress")
TINY_TRAIN = ("--res", "16", "--preset", "tiny", "--encode-images", "16", "--encode-steps", "4", "--no-progress")
ON_DEMO = TINY_TRAIN + ("--teacher", "runs/demo")  # a new run on the tiny run's teacher (a run directory)
FID = ("--n", "20", "--ref-n", "20", "--no-progress")
REHEARSAL = Elsewhere("ImageNet and 8 GPUs: tests/test_rehearsal.py (slow) runs this command at true size on CPU, with "
                      "real JPEGs and a raw ADM state dict, capped by --max-steps; its plan: the --dry-run row")
TORCHRUN = Elsewhere("N GPUs (NCCL) and ImageNet; the same entry point under torchrun on CPU: "
                     "tests/test_distributed.py::test_torchrun_runs_the_same_entry_point (slow)")
SERVER = Elsewhere("a server that runs until stopped: tests/test_serve.py starts it on a tiny run, drives every /api/ "
                   "route (the README's curl line included) and the page in headless Chromium")

TEXT_RUN = Elsewhere("needs a text run (runs/emoji), which the Fashion-MNIST runs here are not: tests/test_prompts.py "
                    "runs each of these commands on a tiny emoji run")

RUNS: dict[str, Run | Elsewhere] = {
    # the tiny run every later command reads: the teacher into runs/demo/teacher, then train finds it there
    "pagoda teacher train": Run(TINY_TEACHER),
    "pagoda train": Run(TINY_TRAIN),
    "pagoda teacher train --steps 200 --out runs/t": Run(("--preset", "tiny", "--steps", "2", "--batch", "8", "--no-progress")),
    "pagoda train --res 16 --out runs/small": Run(ON_DEMO),
    "pagoda train --guidance-max 4 --out runs/guided": Run(ON_DEMO),
    "pagoda train --steps 700,800,1400 --out runs/long": Run(ON_DEMO + ("--steps", "3,2")),  # the tiny run has 2 stages
    "pagoda train --gpus 0 --procs 2 --res 16 --out runs/cpu2": Run(ON_DEMO, slow=True),
    "pagoda train --preset imagenet64 --res 512 --gpus 8 --dry-run": Run(slow=True),
    # sampling and exports
    "pagoda sample --checkpoint runs/demo": Run(),
    "pagoda sample --checkpoint runs/demo --n 64": Run(),
    "pagoda sample --checkpoint runs/demo/stage-16/generator.pt --class 3 --n 16": Run(),
    "pagoda sample --n 50000 --npz samples.npz": Run(("--n", "8", "--no-progress")),
    "pagoda sample --checkpoint runs/demo --n 50000 --npz samples.npz --rgb": Run(("--n", "8", "--no-progress"),
                                                                                  (("samples.npz", "rgb.npz"),)),
    "pagoda sample --n 1000 --outdir samples/": Run(("--n", "8", "--no-progress")),
    "pagoda sample --checkpoint runs/demo --n 1000 --outdir samples/": Run(("--n", "8", "--no-progress")),
    "pagoda sample --checkpoint runs/guided --guidance 2": Run(("--n", "8")),
    "pagoda teacher sample --method dpmpp_2m --steps 10": Run(("--n", "4")),
    "pagoda teacher sample --checkpoint runs/demo": Run(("--n", "4", "--steps", "4")),
    "pagoda teacher sample --checkpoint runs/demo --method dpmpp_2m --steps 10": Run(("--n", "4")),
    "pagoda teacher sample --npz t.npz --n 10000 --guidance 2": Run(("--n", "4", "--steps", "4", "--no-progress")),
    "pagoda teacher sample --checkpoint runs/demo/teacher/teacher.pt --n 10000 --npz teacher.npz --guidance 2":
        Run(("--n", "4", "--steps", "4", "--no-progress")),
    # the teacher's encoder and G: inversion and control
    "pagoda invert photo.png": Run(),
    "pagoda invert photo.png --checkpoint runs/demo": Run(),
    "pagoda invert photo.jpg": Run(),
    "pagoda invert shirt.png --checkpoint runs/demo --out inverted/": Run(),
    "pagoda superres low.png": Run(),
    "pagoda superres low.png --reference high.png": Run(),
    "pagoda superres low.png --reference high.png --checkpoint runs/demo --out sr/": Run(),
    "pagoda edit shirt.png --to-class 3": Run(),
    "pagoda edit shirt.png --to-class 3 --class 6 --out edited/": Run(),
    "pagoda interpolate a.png b.png": Run(),
    "pagoda interpolate a.png b.png --steps 8": Run(),
    "pagoda interpolate a.png b.png --steps 12 --out interp/": Run(),
    "pagoda inpaint shirt.png --mask mask.png": Run(("--iters", "5")),
    "pagoda inpaint shirt.png --mask mask.png --iters 100 --out filled/": Run(("--iters", "5")),
    "pagoda encode --teacher T.pt --out LATENTS": Run(("--n", "4", "--steps", "4")),
    "pagoda encode --teacher runs/demo --out latents": Run(("--n", "4", "--steps", "4")),
    "pagoda encode --teacher runs/demo --out latents --n 6000": Run(("--n", "4", "--steps", "4")),
    # scores and the report
    "pagoda eval --checkpoint runs/demo": Run(FID),
    "pagoda eval --checkpoint runs/demo --n 10000": Run(FID),
    "pagoda eval --checkpoint runs/demo --all-stages --n 500 --ref-n 500": Run(FID + ("--nfe", "3")),
    "pagoda eval --checkpoint runs/demo/teacher/teacher.pt --solver dpmpp_2m --nfe 10": Run(FID),
    "pagoda eval --checkpoint runs/guided --guidance 2 --accuracy --ref-n 2000 --n 2000": Run(FID),
    "pagoda report runs/demo": Run(("--no-progress",)),
    "pagoda report runs/demo --fid 500": Run(("--fid", "20", "--no-progress")),
    # a text run (emoji): built by tests/test_prompts.py, which runs each of these on it (and test_serve.py the page)
    **{c: TEXT_RUN for c in (
        'pagoda sample --checkpoint runs/emoji --prompt "red apple" --prompt "cat face" --n 8',
        "pagoda sample --checkpoint runs/emoji --prompts prompts.txt --n 4 --outdir samples/",
        'pagoda teacher sample --checkpoint runs/emoji --prompt "red apple" --guidance 3',
        'pagoda edit heart.png --checkpoint runs/emoji --to-prompt "green heart" --prompt "red heart"',
        'pagoda invert heart.png --checkpoint runs/emoji --prompt "red heart"',
        "pagoda eval --checkpoint runs/emoji --ref emoji --n 2000 --ref-n 2000",
        "pagoda report runs/emoji")},
    "pagoda serve --checkpoint runs/emoji": SERVER,
    # what cannot run here
    "pagoda serve --checkpoint runs/demo": SERVER,
    "pagoda serve --checkpoint runs/guided --port 8000": SERVER,
    "./dev train": Elsewhere("sets up .venv and the Debian data package, then runs `pagoda train` (run above, tiny)"),
    "./dev test": Elsewhere("sets up .venv, then runs this test suite"),
    "pagoda train --gpus 8 --res 128 --data /data/imagenet/train --teacher edm_imagenet64_ema.pt --preset imagenet64":
        REHEARSAL,
    "pagoda train --res 128 --data /data/imagenet --teacher edm_imagenet64_ema.pt --preset imagenet64 --gpus 8": REHEARSAL,
    "torchrun --standalone --nproc-per-node 8 -m pagoda.cli train --res 128 --data /data/imagenet/train --teacher "
    "edm_imagenet64_ema.pt --preset imagenet64": TORCHRUN,
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id pagoda128 -m "
    "pagoda.cli train --res 128 --data /data/imagenet/train --teacher edm_imagenet64_ema.pt --preset imagenet64": TORCHRUN,
    "pagoda eval --checkpoint runs/in128 --n 50000 --ref VIRTUAL_imagenet128_labeled.npz --gpus 8":
        Elsewhere("8 GPUs, an ImageNet-128 run and the ADM reference batch; the split over ranks on CPU: "
                  "tests/test_eval.py::test_eval_split_over_two_ranks_equals_one_process"),
}


def test_every_documented_command_has_a_row():
    docs = documented()
    missing = [f"{c}   ({where})" for c, where in docs.items() if c not in RUNS]
    stale = [c for c in RUNS if c not in docs]
    assert not missing, "documented commands without a row in RUNS (add one):\n" + "\n".join(missing)
    assert not stale, "rows of RUNS that no doc shows any more (remove them):\n" + "\n".join(stale)


# ---- running them ------------------------------------------------------------------------------------

def write_inputs(folder: Path) -> None:
    """The files the docs name: Fashion-MNIST test images as PNGs, a photo, a mask, T.pt (the tiny run's teacher)."""
    x, _ = load_fashion_mnist("test")
    for name, i in (("shirt.png", 0), ("a.png", 1), ("b.png", 2), ("high.png", 3), ("photo.png", 4)):
        tensor_to_pil(x[i]).save(folder / name)
    tensor_to_pil(x[3]).resize((8, 8), Image.BICUBIC).save(folder / "low.png")
    Image.fromarray(skimage.data.astronaut()[40:300, 100:460]).save(folder / "photo.jpg")  # RGB, 360×260
    mask = np.full((32, 32), 255, np.uint8)
    mask[8:20, 10:24] = 0
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "T.pt").symlink_to("runs/demo/teacher/teacher.pt")  # there once `pagoda teacher train` ran


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with the docs' inputs, as the current directory, with the stand-in Inception, a private
    FID-statistics cache and a small class-accuracy classifier."""
    folder = tmp_path_factory.mktemp("readme")
    write_inputs(folder)
    small = C.classifier_config
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        mp.setattr(M, "load_inception", lambda *a, **k: StandInInception())
        mp.setattr(C, "classifier_config", lambda res, **kw: small(res, layers="16p,32p", epochs=1, images=1000))
        yield folder


def run_all(commands: list[str]) -> None:
    """Run each command with its row; one failure message listing every command that failed."""
    failed = []
    for command in commands:
        res = invoke(*RUNS[command].args(command))
        if res.exit_code != 0:
            failed.append(f"$ {command}   (ran: {' '.join(RUNS[command].args(command))})\n{res.output}")
    assert not failed, f"{len(failed)} documented command(s) failed:\n" + "\n".join(failed)


def runnable(slow: bool) -> list[str]:
    docs = documented()
    return [c for c, r in RUNS.items() if isinstance(r, Run) and r.slow == slow and c in docs]


def test_documented_commands_run(workdir):
    run_all(runnable(slow=False))
    assert (workdir / "runs" / "demo" / "stage-16" / "generator.pt").is_file()
    assert {p.name for p in (workdir / "runs").iterdir()} == {"demo", "t", "small", "guided", "long"}
    assert len(list((workdir / "samples").glob("*.png"))) == 8 and (workdir / "rgb.npz").is_file()


@pytest.mark.slow
def test_documented_commands_run_slow(workdir):
    """The 2-process CPU run and the imagenet64 dry run at 512 (≈ 2-3 min on 2 cores); needs the tiny run."""
    if not (workdir / "runs" / "demo" / "stage-16").is_dir():
        run_all(["pagoda teacher train", "pagoda train"])
    run_all(runnable(slow=True))
