"""`pagoda report`: render a run directory as RUN/report.html (self-contained) and RUN/report.md.

    pagoda report runs/demo            # samples per stage, FID rows of RUN/eval.json, loss curves, w and α, timings
    pagoda report runs/demo --fid 500  # the CLI first scores every stage (pagoda/evaluate.py), then renders
    pagoda report runs/emoji           # a text run: the CLI first draws the same prompts at every stage (prompts.png)

Only renders what the run directory holds (pagoda/rundir.py); it computes nothing.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from pagoda.data import DATA_CREDITS
from pagoda.io import atomic_write_bytes
from pagoda.rundir import INDEX_FILE, METRICS_FILE, PROMPT_GRID, TIMING_FILE, RunDir, grid_name

matplotlib.use("Agg")  # headless: never opens a window


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
    """(steps, values, smoothed values) of one logged quantity over the steps that log it, thinned to ≤ max_points."""
    log = [r for r in log if key in r]
    v = [float(r[key]) for r in log]
    sm, every = _smooth(v, max(1, len(v) // 50)), max(1, -(-len(v) // max_points))
    return [r["step"] for r in log][::every], v[::every], sm[::every]


def plot_curves(teacher_log: list[dict], stage_logs: dict[str, list[dict]]) -> dict[str, bytes]:
    """PNGs: 'losses' (teacher loss; per stage L_rec [, L_dstl, a·L_anchor], L_adv and L_D with chance level 2, and the D
    margin on the held-out batch) and 'weights' (per stage w and α)."""
    names, plots = list(stage_logs) or ["(no stage yet)"], {}
    fig = Figure(figsize=(3.6 * (len(names) + 1), 8.1))
    axes = fig.subplots(3, len(names) + 1, squeeze=False)
    s, v, sm = _series(teacher_log, "loss")
    axes[0][0].plot(s, v, alpha=0.3, color="C0")
    axes[0][0].plot(s, sm, color="C0")
    axes[0][0].set(title="teacher: EDM loss", xlabel="step", yscale="log" if v and min(v) > 0 else "linear")
    axes[1][0].axis("off")
    axes[2][0].axis("off")
    for j, name in enumerate(names, start=1):
        log = stage_logs.get(name, [])
        extra = [(0, key, label) for key, label in (("dstl", "L_dstl"), ("anchor", "a·L_anchor"))
                 if any(r.get(key) for r in log)]  # logged, and not 0 throughout
        for row, key, label in [(0, "rec", "L_rec"), *extra, (1, "adv", "L_adv (G)"), (1, "d", "L_D")]:
            s, v, sm = _series(log, key)
            line, = axes[row][j].plot(s, sm, label=label)  # smoothed, over the raw values in the same colour
            axes[row][j].plot(s, v, alpha=0.25, color=line.get_color())
        axes[1][j].axhline(2.0, color="grey", ls=":", lw=1, label="L_D at chance (2)")
        probed = [r for r in log if "margin" in r]  # measured every few steps
        axes[2][j].plot([r["step"] for r in probed], [r["margin"] for r in probed], color="C4", marker=".")
        axes[2][j].axhline(0.0, color="grey", ls=":", lw=1)
        axes[0][j].set(title=f"{name}: reconstruction", xlabel="step")
        axes[1][j].set(title=f"{name}: adversarial", xlabel="step")
        axes[2][j].set(title=f"{name}: D(real) − D(fake), held out", xlabel="step")
        axes[1][j].legend(fontsize=8)
        if extra:
            axes[0][j].legend(fontsize=8)
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
    run = RunDir(run_dir)
    load = lambda p: json.loads(p.read_text()) if p.is_file() else {}  # noqa: E731
    tdir, stages = run.teacher_dir, run.stages()
    tcfg = load(run.teacher_config).get("teacher", {})
    tlog = read_jsonl(tdir / METRICS_FILE)
    tgrids = sorted(tdir.glob(grid_name("*")))
    timings, t = [], load(tdir / TIMING_FILE)
    if t:
        timings.append({"part": "teacher", **t, "source": f"teacher/{TIMING_FILE}"})
    elif tlog:  # older runs, or a teacher still training
        timings.append({"part": "teacher", "steps": tlog[-1]["step"], "seconds": logged_seconds(tlog, tcfg.get("batch", 0)),
                        "img_per_s": tlog[-1].get("img_per_s"), "source": f"teacher/{METRICS_FILE} (≈)"})
    t = load(run.latents / TIMING_FILE)
    if t:
        timings.append({"part": f"latent cache ({t['images']} images + flips)", **t, "source": f"latents/{TIMING_FILE}"})
    caption = (f"teacher, Heun {2 * tcfg['sample_steps'] - 1} NFE, step {int(tgrids[-1].stem.split('-')[-1])}"
               if tgrids and "sample_steps" in tcfg else "teacher")
    grids = [(caption, tgrids[-1])] if tgrids else []
    logs = {}
    for s in stages:
        logs[s.name] = read_jsonl(s / METRICS_FILE)
        if (s / grid_name("final")).is_file():
            grids.append((f"{s.name} (G, 1 NFE)", s / grid_name("final")))
        t = load(s / TIMING_FILE)
        if t:
            timings.append({"part": s.name, **t, "source": f"{s.name}/{TIMING_FILE}"})
        elif logs[s.name]:
            timings.append({"part": s.name + " (running)", "steps": logs[s.name][-1]["step"], "seconds": None,
                            "img_per_s": logs[s.name][-1].get("img_per_s"), "source": f"{s.name}/{METRICS_FILE}"})
    t_res = load(run.latents / INDEX_FILE).get("resolution", tcfg.get("resolution", "?"))  # the cache is at the teacher's
    names = {tdir: f"teacher ({t_res} px + bicubic)", **{s: f"{s.name} (G)" for s in stages}}
    labelled = [(f"{names[d]}: the same prompts", d / PROMPT_GRID) for d in (tdir, *stages) if (d / PROMPT_GRID).is_file()]
    grids += labelled  # a text run's (pagoda.inference.prompt_grids, written by `pagoda report`): rows labelled
    return {"run": run.root, "config": load(run.config), "teacher_config": tcfg, "latents": load(run.latents / INDEX_FILE),
            "teacher_log": tlog, "stage_logs": logs, "grids": grids, "timings": timings,
            "eval": load(run.eval).get("results", []), "finished": [p.name for p in run.finished()]}


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
    keys = ["name", "resolution", "steps", "batch", "lr_G", "lr_D", "lam", "activate_from", "fade_steps", "ema",
            "discriminator", "distance", "anchor"]
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
    credit = DATA_CREDITS.get(((info["config"] or {}).get("train") or {}).get("data"))
    summary += f". {credit}" if credit else ""
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


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """RUN/report.html (self-contained) and RUN/report.md (+ RUN/report_files/*.png)."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root} is not a directory: pass a run directory (what `pagoda train --out` wrote)")
    info = collect(run.root)
    plots = plot_curves(info["teacher_log"], info["stage_logs"])
    files = {}
    for name, png in plots.items():
        atomic_write_bytes(run.report_files / f"{name}.png", lambda f, png=png: f.write(png))
        files[name] = f"{run.report_files.name}/{name}.png"
    page, md = render(info, plots, files)
    html_path = atomic_write_bytes(run.report_html, lambda f: f.write(page.encode()))
    md_path = atomic_write_bytes(run.report_md, lambda f: f.write(md.encode()))
    return html_path, md_path
