"""Shared pieces of the bench scripts: run-directory models, timing, tables, result files.

Not a bench itself; `bench/<name>.py` scripts import it (`python bench/<name>.py` puts bench/ on sys.path).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from pagoda.decoder import Generator, load_generator
from pagoda.dist import pick_device
from pagoda.rundir import GENERATOR_FILE, RunDir, resolve_teacher_path
from pagoda.io import save_json
from pagoda.teacher import load_teacher


def parser(doc: str, name: str, run: bool = True) -> argparse.ArgumentParser:
    """argparse with the bench's docstring as help and the common --run / --out / --device options."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if run:
        p.add_argument("--run", default="runs/demo", help="a finished run directory (pagoda train --out)")
    p.add_argument("--out", default=f"results/{name}", help="results folder (JSON, PNG)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p


def load_run(run: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[int, Generator]]:
    """(teacher denoiser, {resolution: EMA generator of each finished stage}) of a run directory."""
    stages = RunDir(run).finished()
    if not stages:
        raise SystemExit(f"error: {run} holds no finished stage (stage-*/{GENERATOR_FILE}); train it first or pass --run")
    teacher = load_teacher(resolve_teacher_path(run), device)
    gens = {}
    for s in stages:
        G = load_generator(s / GENERATOR_FILE, device)
        gens[G.resolution] = G
    return teacher, gens


def draw(generate, n: int, batch: int) -> torch.Tensor:
    """Images 0 … n−1 of a sampler generate(i, b) (pagoda.inference.make_sampler), in batches of `batch`."""
    return torch.cat([generate(i, min(batch, n - i)) for i in range(0, n, batch)])


class OnnxInception:
    """The FID Inception (pagoda.metrics.load_inception) run by ONNX Runtime on the CPU: the same features (measured
    1.2e-6 relative) about 2x faster than torch there. Used by the benches when `onnxruntime` and `onnx` are
    installed (`pip install onnxruntime onnx`); the graph is exported once to ~/.cache/pagoda/inception.onnx."""

    def __init__(self, threads: int | None = None):
        import onnxruntime as ort
        from pagoda.metrics import default_cache_dir, load_inception
        path = default_cache_dir().parent / "inception.onnx"
        if not path.is_file():
            x = torch.zeros(2, 3, 299, 299)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.onnx.export(load_inception().layers, (x,), str(path), input_names=["x"], output_names=["f"],
                              dynamic_axes={"x": {0: "batch"}}, dynamo=False, opset_version=17)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads or torch.get_num_threads(), 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 299, 299) in [0, 255] -> (B, 2048), as clean-fid's feature model."""
        x = ((x.float() - 128) / 128).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"x": x})[0].reshape(len(x), -1))


def inception_model(dev: torch.device):
    """The feature model the benches use: ONNX Runtime on the CPU when installed, else pagoda's torch Inception."""
    if dev.type == "cpu":
        try:
            return OnnxInception()
        except ImportError:
            pass
    return None  # FeatureExtractor loads pagoda.metrics.load_inception


def device(name: str) -> torch.device:
    return pick_device(name)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn: Callable[[], object], dev: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall seconds of fn() over `repeats` calls after `warmup` calls (CUDA synchronised).

    The minimum, as timeit recommends: other processes only ever add time, so it is the least noisy estimate.
    """
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return min(times)


def environment(dev: torch.device) -> dict:
    """Where the numbers were measured (goes into every JSON)."""
    return {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """A rich table; columns = (key, header, format spec) with '' for str()."""
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for _, header, spec in columns:
        t.add_column(header, justify="right" if spec else "left")
    for r in rows:
        t.add_row(*["–" if r.get(k) is None else format(r[k], spec) if spec else str(r[k]) for k, _, spec in columns])
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(t)  # files and pipes: no wrapping


def write_results(out: str | Path, name: str, payload: dict, fig=None) -> list[Path]:
    """OUT/name.json (and OUT/name.png from a matplotlib Figure); returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_json(payload, out / f"{name}.json")]
    if fig is not None:
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        paths.append(out / f"{name}.png")
    print("wrote " + ", ".join(map(str, paths)))
    return paths


def figure(*args, **kw):
    """A headless matplotlib Figure (Agg), no pyplot state."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(*args, **kw)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
