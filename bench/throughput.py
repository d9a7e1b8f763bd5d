"""Training throughput per stage (images/s): as logged by a run, and measured now on this machine's devices.

    .venv/bin/python bench/throughput.py --run runs/demo --out results/throughput                 # logged only
    .venv/bin/python bench/throughput.py --run runs/demo --out results/throughput --measure 5     # + 5 steps per stage

Logged: the timing.json of the teacher and of each stage (images/s = steps × global batch / wall time, D steps
and checkpoints included; "CPU s" = the process's CPU time, less inflated than wall time on a shared machine;
runs without a teacher timing.json fall back to its metrics.jsonl). Measured (--measure K): for each device
(--devices, default cpu and cuda when available) the run's own teacher step (EDM loss, Adam) and each stage's
StageTrainer.train_step (one G step + its D steps, the run's config and latent cache, weights from the run, a
scratch folder), one warm-up step then K timed steps. Writes OUT/throughput.json and .png.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from common import environment, figure, parser, print_table, read_json, sync, write_results
from pagoda.data import loader, make_dataset
from pagoda.decoder import Generator
from pagoda.dist import DistInfo
from pagoda.encoder import LatentPairs, LatentStore
from pagoda.grow import StageConfig
from pagoda.report import logged_seconds, read_jsonl
from pagoda.rundir import METRICS_FILE, TIMING_FILE, RunDir, resolve_teacher_path
from pagoda.stage import RunSpec, StageTrainer
from pagoda.teacher import Denoiser, edm_loss, load_teacher
from pagoda.train import TrainConfig


def logged(run: Path) -> list[dict]:
    """Throughput rows from the run's logs."""
    rows, r = [], RunDir(run)
    tlog, tcfg = read_jsonl(r.teacher_dir / METRICS_FILE), read_json(r.teacher_config).get("teacher", {})
    t = read_json(r.teacher_dir / TIMING_FILE)
    if t or tlog:  # teacher/timing.json; older runs: the cumulative images/s of metrics.jsonl
        rows.append({"part": "teacher", "resolution": tcfg.get("resolution"), "batch": tcfg.get("batch"), "device": "logged",
                     "steps": t.get("steps", tlog[-1]["step"] if tlog else None),
                     "seconds": t.get("seconds", logged_seconds(tlog, tcfg.get("batch", 0))),
                     "cpu_seconds": t.get("cpu_seconds"), "images_per_s": t.get("img_per_s", tlog[-1]["img_per_s"] if tlog else None)})
    for st in read_json(r.config).get("stages", []):
        t = read_json(r.stage(st["resolution"]) / TIMING_FILE)
        if t:
            rows.append({"part": st["name"], "resolution": st["resolution"], "batch": st["batch"], "device": "logged",
                         "steps": t["steps"], "seconds": t["seconds"], "cpu_seconds": t.get("cpu_seconds"),
                         "images_per_s": t["img_per_s"]})
    return rows


def measured(run: Path, dev: torch.device, k: int) -> list[dict]:
    """Throughput rows of K fresh training steps per part on `dev` (nothing in the run is written)."""
    r = RunDir(run)
    cfg_all = read_json(r.config)
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k_: v for k_, v in cfg_all["train"].items() if k_ in known})
    teacher = load_teacher(resolve_teacher_path(run), dev)
    rows = []

    def timed(step, batch: int) -> float:
        step()  # warm-up: allocations, lazy init
        sync(dev)
        t = time.perf_counter()
        for _ in range(k):
            step()
        sync(dev)
        return k * batch / (time.perf_counter() - t)

    tcfg = read_json(r.teacher_config).get("teacher", {})
    if tcfg:  # the teacher's training step: EDM loss, backward, Adam
        D = Denoiser(type(teacher.unet)(teacher.unet.config)).to(dev).train()
        opt = torch.optim.Adam(D.parameters(), lr=tcfg["lr"])
        data = make_dataset(tcfg["data"], tcfg["resolution"])
        xb, yb = next(loader(data, [(torch.arange(tcfg["batch"]) % len(data)).tolist()]))
        xb, yb = xb.to(dev), yb.to(dev) if D.unet.config.num_classes else None

        def teacher_step():
            loss = edm_loss(D, xb, yb, label_dropout=tcfg["label_dropout"]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rows.append({"part": "teacher", "resolution": tcfg["resolution"], "batch": tcfg["batch"], "device": str(dev),
                     "steps": k, "images_per_s": timed(teacher_step, tcfg["batch"])})
    store = LatentStore(r.latents)
    info = DistInfo(device=dev)
    with tempfile.TemporaryDirectory() as scratch:
        for i, st in enumerate(StageConfig.from_dict(d) for d in cfg_all["stages"]):
            prev = r.generator(st.resolution // 2)
            if st.grow and not prev.is_file():
                print(f"skip {st.name}: {prev} is not there (the previous stage did not finish)")
                continue
            G_prev = Generator.from_checkpoint(prev, map_location=dev) if st.grow else None
            pairs = LatentPairs.from_cache(store, make_dataset(cfg.data, st.resolution, channels=teacher.channels))
            trainer = StageTrainer(RunSpec.of(cfg), st, i, teacher, G_prev, pairs, RunDir(scratch).stage(st.resolution), info)
            rows.append({"part": st.name, "resolution": st.resolution, "batch": st.batch, "device": str(dev), "steps": k,
                         "images_per_s": timed(trainer.train_step, st.batch)})
    return rows


def main() -> None:
    p = parser(__doc__, "throughput")
    p.add_argument("--measure", type=int, default=0, help="also time K fresh training steps per stage (0 = logged only)")
    p.add_argument("--devices", nargs="+", default=None, help="devices to measure on (default: cpu, and cuda if available)")
    a = p.parse_args()
    run = Path(a.run)
    if not RunDir(run).config.is_file():
        raise SystemExit(f"error: {run}/config.json not found: pass --run a run directory (pagoda train --out)")
    rows = logged(run)
    devices = a.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if a.measure > 0:
        for d in devices:
            rows += measured(run, torch.device(d), a.measure)
    print_table(f"Training throughput ({run}), torch threads {torch.get_num_threads()}", rows,
                [("part", "part", ""), ("resolution", "px", "d"), ("batch", "batch", "d"), ("device", "device", ""),
                 ("steps", "steps", "d"), ("seconds", "seconds", ".1f"), ("cpu_seconds", "CPU s", ".1f"),
                 ("images_per_s", "images/s", ".1f")])
    fig = figure(figsize=(7, 3.2))
    ax = fig.subplots()
    parts, groups = list(dict.fromkeys(r["part"] for r in rows)), list(dict.fromkeys(r["device"] for r in rows))
    width = 0.8 / max(1, len(groups))
    for j, d in enumerate(groups):  # one bar per (part, device): logged, then each measured device
        g = [r for r in rows if r["device"] == d]
        ax.bar([parts.index(r["part"]) + j * width for r in g], [r["images_per_s"] for r in g], width=width, label=d)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(parts))], parts)
    ax.set(yscale="log", ylabel="training images / s", title="training throughput per stage")
    ax.legend(fontsize=8)
    write_results(a.out, "throughput", {"run": str(run), "env": environment(torch.device(devices[-1])), "rows": rows,
                                        "devices": devices, "measure_steps": a.measure}, fig)


if __name__ == "__main__":
    main()
