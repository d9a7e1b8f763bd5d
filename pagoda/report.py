"""Measuring a run like the paper: FID/KID of a generator or a teacher (`pagoda eval`) and the run report.

    pagoda eval --checkpoint runs/demo --n 10000                        # last stage vs Fashion-MNIST train
    pagoda eval --checkpoint runs/demo --all-stages --n 500 --ref-n 500 # teacher + every stage (CPU-sized)
    pagoda eval --checkpoint runs/demo/teacher/teacher.pt --solver dpmpp_2m --nfe 10
    pagoda report runs/demo [--fid 500]                                 # RUN/report.html (self-contained) + report.md

Generators and teachers are measured by the same code: z ~ N(0, σ_max² I) at the teacher resolution in
seeded batches, class labels cycling 0..C−1, images scored by `metrics.evaluate` (clean-fid's resize to
299²) against the reference at the images' own resolution (Fashion-MNIST downsampled the ADM way).
Results are merged into RUN/eval.json, whose rows the report's FID table shows. Sits beside inference.py.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from pagoda import dist
from pagoda.data import downsample
from pagoda.dist import DistInfo, pick_device
from pagoda.inference import finished_stages, resolve_generator, resolve_teacher_path
from pagoda.io import CheckpointError, atomic_write_bytes, load_checkpoint, save_json
from pagoda.solvers import karras_sigmas, nfe as count_nfe
from pagoda.train import load_teacher, step_generator, teacher_sample

Progress = Callable[[str, int, int], None]  # (task, done, total), as metrics.evaluate reports


# Models and samplers -----------------------------------------------------------------------------

def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[str, torch.nn.Module, Path]:
    """('generator', G, file) for a generator checkpoint or a run directory, ('teacher', D, file) for a teacher's."""
    p = Path(checkpoint)
    if p.is_file():
        ck = load_checkpoint(p)
        if ck.get("kind") == "teacher" or "unet_config" not in ck:  # ours, or a raw ADM state dict
            return "teacher", load_teacher(p, device), p
    G = resolve_generator(p, device)  # raises a one-line CheckpointError for anything else
    return "generator", G, (finished_stages(p)[-1] / "generator.pt" if p.is_dir() else p)


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
    sigma_max = getattr(model, "sigma_max", 80.0)

    @torch.no_grad()
    def generate(i: int, b: int) -> torch.Tensor:
        z = torch.stack([torch.randn(C, R, R, generator=step_generator(seed, 5, k)) for k in range(i, i + b)])
        z = (sigma_max * z).to(device)
        y = None if ncls is None else ((i + torch.arange(b)) % ncls).to(device)
        x = model(z, y) if kind == "generator" else teacher_sample(model, z, y, steps, solver)
        return resample(x.float().clamp(-1, 1), resize).cpu()

    return generate


def describe(kind: str, model: torch.nn.Module, solver: str, nfe: int, resize: int | None) -> str:
    """A row name: 'G 16px, 1 NFE', 'teacher 8px, heun 35 NFE → bicubic 32px'."""
    res = getattr(model, "resolution", model.unet.config.resolution)
    name = f"G {res}px, 1 NFE" if kind == "generator" else f"teacher {res}px, {solver} {nfe} NFE"
    if resize and resize != res:
        name += f" → {'bicubic' if resize > res else 'ADM'} {resize}px"
    return name


def evaluate_checkpoint(checkpoint: str | Path, n: int = 10_000, ref: str = "fashion-mnist", split: str = "train",
                        ref_n: int | None = None, solver: str = "heun", nfe: int = 35, resize: int | None = None,
                        batch: int = 64, seed: int = 0, device: str = "auto", cache_dir: Path | None = None,
                        progress: Progress | None = None, info: DistInfo | None = None) -> dict:
    """FID/KID of n samples of a generator (checkpoint or run dir) or a teacher (with solver/nfe), as metrics.evaluate
    (split across the ranks of `info`, each on its own device)."""
    from pagoda.metrics import evaluate  # clean-fid and torchvision: imported only when measuring
    dev = info.device if info is not None and info.enabled else pick_device(device)
    kind, model, path = load_model(checkpoint, dev)
    generate = make_sampler(kind, model, solver, nfe, resize, seed, dev)
    name = describe(kind, model, solver, nfe, resize)
    prog = None if progress is None else (lambda task, done, total: progress(f"{name}: {task}", done, total))
    out = evaluate(generate, ref, n, batch, split, dev, max_ref_images=ref_n, cache_dir=cache_dir, progress=prog,
                   info=info)
    res = resize or getattr(model, "resolution", model.unet.config.resolution)
    return {"model": name, "kind": kind, "checkpoint": str(path.resolve()),
            "resolution": res, "solver": solver if kind == "teacher" else None,
            "nfe": nfe if kind == "teacher" else 1, "seed": seed, "split": split, **out}


def evaluate_run(run_dir: str | Path, teacher: bool = True, **kw) -> list[dict]:
    """The run's teacher (if found; kw solver/nfe) and every finished stage, each scored by evaluate_checkpoint(**kw)."""
    stages = finished_stages(run_dir)
    if not stages:
        raise CheckpointError(f"{run_dir} holds no finished stage (no stage-*/generator.pt): train it first")
    models = [s / "generator.pt" for s in stages]
    if teacher:
        try:
            models.insert(0, resolve_teacher_path(run_dir))
        except CheckpointError:
            pass  # a run without a teacher file: the generator rows alone
    return [evaluate_checkpoint(m, **kw) for m in models]


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory holding `checkpoint` (itself, or RUN/stage-XX/…, RUN/teacher/…), None if not in a run."""
    p = Path(checkpoint)
    in_run = p.parent.name == "teacher" or p.parent.name.startswith("stage-")
    d = p if p.is_dir() else p.parent.parent if in_run else None
    return d if d is not None and ((d / "config.json").is_file() or finished_stages(d)) else None


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
    path = Path(out) if out else (run_dir_of(checkpoint) or Path(".")) / "eval.json"
    if info.is_main:
        record_results(results, path)
    dist.shutdown(info)
    return results, path


@contextmanager
def eval_progress(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress bar (one line per task) fed by metrics.evaluate's (task, done, total) callback."""
    from pagoda.train import progress_bar
    with progress_bar(enabled) as bar:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total, info="")
            bar.update(tasks[task], completed=done, total=total)

        yield update


def results_table(results: list[dict], title: str = "FID / KID"):
    """A rich Table of evaluation rows."""
    from rich.table import Table
    t = Table(title=title)
    for col in ("model", "n", "FID", "KID ×10³", "reference", "seconds"):
        t.add_column(col, justify="left" if col in ("model", "reference") else "right")
    for r in results:
        kid = "–" if r.get("kid") is None else f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f}"
        t.add_row(r["model"], str(r["n"]), f"{r['fid']:.2f}", kid, f"{r['ref']} (n={r['ref_n']})", f"{r['seconds']:.0f}")
    return t


# The run report ----------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl (a torn last line from a killed run is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def logged_seconds(records: list[dict], batch: int) -> float:
    """Wall time implied by a log's cumulative img_per_s, summed over sessions (a resume restarts the step count)."""
    total, count = 0.0, 0
    for i, r in enumerate(records):
        count += 1
        nxt = records[i + 1] if i + 1 < len(records) else None
        if nxt is None or nxt["step"] <= r["step"]:  # end of a session
            total += count * batch / max(r.get("img_per_s", 0.0), 1e-9)
            count = 0
    return total


def _smooth(v: list[float], k: int) -> list[float]:
    """Trailing moving average over k points (k = 1: unchanged)."""
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x - (v[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # tight_layout already ran; bbox="tight" would draw twice
    return buf.getvalue()


def _series(log: list[dict], key: str, max_points: int = 2000) -> tuple[list[int], list[float], list[float]]:
    """(steps, values, smoothed values) of one logged quantity, thinned to ≤ max_points (NaN where not logged)."""
    v = [float(r.get(key, float("nan"))) for r in log]
    sm, every = _smooth(v, max(1, len(v) // 50)), max(1, -(-len(v) // max_points))
    return [r["step"] for r in log][::every], v[::every], sm[::every]


def plot_curves(teacher_log: list[dict], stage_logs: dict[str, list[dict]]) -> dict[str, bytes]:
    """PNGs: 'losses' (teacher loss; per stage L_rec, L_adv and L_D) and 'weights' (per stage w and α)."""
    import matplotlib
    matplotlib.use("Agg")  # headless: never opens a window
    from matplotlib.figure import Figure
    names, plots = list(stage_logs) or ["(no stage yet)"], {}
    fig = Figure(figsize=(3.6 * (len(names) + 1), 5.4))
    axes = fig.subplots(2, len(names) + 1, squeeze=False)
    s, v, sm = _series(teacher_log, "loss")
    axes[0][0].plot(s, v, alpha=0.3, color="C0")
    axes[0][0].plot(s, sm, color="C0")
    axes[0][0].set(title="teacher: EDM loss", xlabel="step", yscale="log" if v and min(v) > 0 else "linear")
    axes[1][0].axis("off")
    for j, name in enumerate(names, start=1):
        for row, key, label in [(0, "rec", "L_rec"), (1, "adv", "L_adv (G)"), (1, "d", "L_D")]:
            s, v, sm = _series(stage_logs.get(name, []), key)
            line, = axes[row][j].plot(s, sm, label=label)  # smoothed, over the raw values in the same colour
            axes[row][j].plot(s, v, alpha=0.25, color=line.get_color())
        axes[0][j].set(title=f"{name}: reconstruction", xlabel="step")
        axes[1][j].set(title=f"{name}: adversarial", xlabel="step")
        axes[1][j].legend(fontsize=8)
    fig.tight_layout()
    plots["losses"] = _png(fig)
    fig = Figure(figsize=(3.6 * len(names), 2.8))
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        s, w, _ = _series(stage_logs.get(name, []), "w")
        ax.plot(s, w, color="C2", label="w (adaptive weight)")
        ax.set(title=name, xlabel="step", ylabel="w", yscale="log" if w and min(w) > 0 else "linear")
        ax2 = ax.twinx()
        s, alpha, _ = _series(stage_logs.get(name, []), "alpha")
        ax2.plot(s, alpha, color="C3", ls="--", label="α (fade-in)")
        ax2.set(ylabel="α", ylim=(-0.05, 1.05))
        ax.legend(handles=ax.get_lines() + ax2.get_lines(), fontsize=8, loc="lower right")
    fig.tight_layout()
    plots["weights"] = _png(fig)
    return plots


def collect(run_dir: Path) -> dict:
    """Everything the report shows, read from the run directory (missing parts are empty, never an error)."""
    run = Path(run_dir)
    load = lambda p: json.loads(p.read_text()) if p.is_file() else {}  # noqa: E731
    tdir, stages = run / "teacher", sorted(run.glob("stage-*"), key=lambda p: int(p.name.split("-")[-1]))
    tcfg = load(tdir / "config.json").get("teacher", {})
    tlog = read_jsonl(tdir / "metrics.jsonl")
    tgrids = sorted(tdir.glob("grid-*.png"))
    timings, t = [], load(tdir / "timing.json")
    if t:
        timings.append({"part": "teacher", **t, "source": "teacher/timing.json"})
    elif tlog:  # older runs, or a teacher still training
        timings.append({"part": "teacher", "steps": tlog[-1]["step"], "seconds": logged_seconds(tlog, tcfg.get("batch", 0)),
                        "img_per_s": tlog[-1].get("img_per_s"), "source": "teacher/metrics.jsonl (≈)"})
    t = load(run / "latents" / "timing.json")
    if t:
        timings.append({"part": f"latent cache ({t['images']} images + flips)", **t, "source": "latents/timing.json"})
    caption = (f"teacher, Heun {2 * tcfg['sample_steps'] - 1} NFE, step {int(tgrids[-1].stem.split('-')[-1])}"
               if tgrids and "sample_steps" in tcfg else "teacher")
    grids = [(caption, tgrids[-1])] if tgrids else []
    logs = {}
    for s in stages:
        logs[s.name] = read_jsonl(s / "metrics.jsonl")
        if (s / "grid-final.png").is_file():
            grids.append((f"{s.name} (G, 1 NFE)", s / "grid-final.png"))
        t = load(s / "timing.json")
        if t:
            timings.append({"part": s.name, **t, "source": f"{s.name}/timing.json"})
        elif logs[s.name]:
            timings.append({"part": s.name + " (running)", "steps": logs[s.name][-1]["step"], "seconds": None,
                            "img_per_s": logs[s.name][-1].get("img_per_s"), "source": f"{s.name}/metrics.jsonl"})
    return {"run": run, "config": load(run / "config.json"), "teacher_config": tcfg,
            "latents": load(run / "latents" / "index.json"),
            "teacher_log": tlog, "stage_logs": logs, "grids": grids, "timings": timings,
            "eval": load(run / "eval.json").get("results", []), "finished": [p.name for p in finished_stages(run)]}


def _fmt(v, spec: str = ".4g") -> str:
    return "–" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _tables(info: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows) of strings: fid, timings, stages."""
    fid = (["model", "n", "FID", "KID ×10³", "reference", "checkpoint"],
           [[r["model"], str(r["n"]), f"{r['fid']:.2f}",
             "–" if r.get("kid") is None else f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f}",
             f"{r['ref']} (n={r['ref_n']})", "/".join(Path(r.get("checkpoint", "")).parts[-2:])]
            for r in info["eval"]])
    timings = (["part", "steps", "seconds", "CPU seconds", "images/s", "source"],
               [[t["part"], _fmt(t.get("steps")), _fmt(t.get("seconds"), ".1f"), _fmt(t.get("cpu_seconds"), ".1f"),
                 _fmt(t.get("img_per_s"), ".1f"), t["source"]] for t in info["timings"]])
    keys = ["name", "resolution", "steps", "batch", "lr_G", "lr_D", "lam", "activate_from", "fade_steps", "ema"]
    stages = (keys, [[_fmt(s.get(k)) for k in keys] for s in info["config"].get("stages", [])])
    return {"fid": fid, "timings": timings, "stages": stages}


NO_FID = ("no RUN/eval.json yet (FID is slow on CPU, so the report does not compute it by default): "
          "run `pagoda eval --checkpoint {run} --all-stages --n 500 --ref-n 500` or `pagoda report {run} --fid 500`")
SECTIONS = [("samples", "Samples per stage"), ("fid", "FID / KID"), ("losses", "Loss curves"),
            ("weights", "Adaptive weight w and fade-in α"), ("timings", "Timings"), ("config", "Config")]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def render(info: dict, plots: dict[str, bytes], plot_files: dict[str, str]) -> tuple[str, str]:
    """(report.html with every image embedded as base64, report.md linking the image files relative to RUN)."""
    run, tables = info["run"], _tables(info)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    summary = (f"{len(info['finished'])} finished stage(s): {', '.join(info['finished']) or 'none'}; latent cache: "
               + (f"{info['latents']['num_images']} images × 2 flips, {info['latents']['method']} on "
                  f"{info['latents']['steps']} grid points" if info["latents"] else "none"))
    no_fid = NO_FID.format(run=run)
    cfg_text = json.dumps(info["config"] or {"note": "no RUN/config.json"}, indent=2)
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>PaGoDA run {html.escape(run.name)}</title><style>"
         "body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
         ".grids{display:flex;gap:1em;align-items:flex-start}figure{margin:0;flex:1}figure img{width:100%;"
         "image-rendering:pixelated}pre{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}</style></head><body>",
         f"<h1>PaGoDA run report: {html.escape(str(run))}</h1><p>{html.escape(summary)}. Written {when}.</p><p>"
         + " · ".join(f"<a href='#{k}'>{t}</a>" for k, t in SECTIONS) + "</p>"]
    md = [f"# PaGoDA run report: {run}", "", f"{summary}. Written {when}.", ""]
    for key, title in SECTIONS:
        h.append(f"<h2 id='{key}'>{title}</h2>")
        md += [f"## {title}", ""]
        if key == "samples":
            h.append("<div class='grids'>" + "".join(
                f"<figure><img alt='{html.escape(c)}' src='{_data_uri(p.read_bytes())}'><figcaption>{html.escape(c)}"
                f"</figcaption></figure>" for c, p in info["grids"]) + "</div>" if info["grids"] else "<p>no grids yet</p>")
            md += [f"| {' | '.join(c for c, _ in info['grids'])} |", "|" + "---|" * len(info["grids"]),
                   "| " + " | ".join(f"![{c}]({p.relative_to(run).as_posix()})" for c, p in info["grids"]) + " |"] \
                if info["grids"] else ["no grids yet"]
        elif key == "fid":
            h.append(_html_table(*tables["fid"]) if info["eval"] else f"<p>{html.escape(no_fid)}</p>")
            md.append(_md_table(*tables["fid"]) if info["eval"] else no_fid)
        elif key in plots:
            h.append(f"<img alt='{key}' src='{_data_uri(plots[key])}'>")
            md.append(f"![{key}]({plot_files[key]})")
        elif key == "timings":
            h.append(_html_table(*tables["timings"]))
            md.append(_md_table(*tables["timings"]))
        elif key == "config":
            h += [_html_table(*tables["stages"]), f"<pre>{html.escape(cfg_text)}</pre>"]
            md += [_md_table(*tables["stages"]), "", "```json", cfg_text, "```"]
        md.append("")
    return "".join(h) + "</body></html>\n", "\n".join(md)


def write_report(run_dir: str | Path, fid: int | None = None, ref: str = "fashion-mnist", ref_n: int | None = None,
                 device: str = "auto", progress: Progress | None = None) -> tuple[Path, Path]:
    """RUN/report.html (self-contained) and RUN/report.md (+ RUN/report_files/*.png); fid=N first scores every stage."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a directory: pass a run directory (what `pagoda train --out` wrote)")
    if fid:
        results = evaluate_run(run, n=fid, ref=ref, ref_n=ref_n or fid, device=device, progress=progress)
        record_results(results, run / "eval.json")
    info = collect(run)
    plots = plot_curves(info["teacher_log"], info["stage_logs"])
    files = {}
    for name, png in plots.items():
        atomic_write_bytes(run / "report_files" / f"{name}.png", lambda f, png=png: f.write(png))
        files[name] = f"report_files/{name}.png"
    page, md = render(info, plots, files)
    html_path = atomic_write_bytes(run / "report.html", lambda f: f.write(page.encode()))
    md_path = atomic_write_bytes(run / "report.md", lambda f: f.write(md.encode()))
    return html_path, md_path
