"""FID against cost per width schedule of the grown blocks: runs that differ only in `--grow-width`, side by side.

    # the runs: one teacher, latent cache and stage-08 copied into each, then only the growth stages differ
    pagoda train --grow-width constant --out runs/w-constant       # and halve, 16/R, 16 ...
    pagoda train --grow-width halve --steps 700,800,940 --out runs/w-halve-940     # the same at more steps
    OMP_NUM_THREADS=2 .venv/bin/python bench/width_schedules.py --runs runs/w-constant runs/w-halve runs/w-16R \
        runs/w-halve-940 --n 2000 --ref-n 2000 --out results/width_schedules

Per run and finished stage: the schedule's width(s) of the grown blocks, parameters and GFLOP per image (counted
on the meta device, bench/growth_cost.py), images/s of one call of --batch images (best of --repeats, alone:
set OMP_NUM_THREADS), × faster than the run's teacher with Heun 35 NFE at its resolution, the stage's training
CPU seconds and wall seconds (its timing.json: measured while it trained, so only runs trained side by side under
the same load compare), the growth stages' training CPU seconds (stage-16 up to the row's stage), and FID / KID at
n one-step samples against the Fashion-MNIST test split (bench/quality.py's Scorer). FID rows are kept in
OUT/fid_cache.json by the md5 of the generator file (and n, ref_n, seed), so the script can score runs while they
train and be re-run alone for the timings (--fid-only skips them: no img/s columns). Writes OUT/width_schedules.json
and .png: FID against GFLOP per image (one line per schedule, the runs with the fewest top-stage steps: equal
steps), and the top stage's FID against the growth stages' training CPU (one line per schedule through its runs:
equal CPU time).
"""
from __future__ import annotations

from pathlib import Path

import torch

from common import device, environment, figure, load_run, parser, print_table, read_json, time_call, write_results
from growth_cost import flops_per_image
from quality import ScoreCache, Scorer, file_md5, score_generator
from pagoda.inference import make_sampler
from pagoda.rundir import RunDir


def main() -> None:
    p = parser(__doc__, "width_schedules", run=False)
    p.add_argument("--runs", nargs="+", required=True, help="run directories that differ only in --grow-width")
    p.add_argument("--n", type=int, default=2000, help="samples per FID row")
    p.add_argument("--ref-n", type=int, default=2000, help="test images in the FID reference")
    p.add_argument("--batch", type=int, default=64, help="images per timed call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-only", action="store_true", help="no timing: FID rows (cached), table and figure only")
    a = p.parse_args()
    dev = device(a.device)
    scorer, rows, cache = Scorer(dev, ref_n=a.ref_n), [], ScoreCache(a.out, a.n, a.ref_n, a.seed)

    def fid_row(run: str, res: int, G) -> dict:  # FID/KID of G, from the cache when this file was scored before
        return cache.get(file_md5(Path(run) / f"stage-{res:02d}" / "generator.pt"),
                         lambda: score_generator(scorer, G, a.n, a.seed, dev))

    teacher_ips = None
    for run in a.runs:
        cfg = read_json(RunDir(run).config)
        schedule = cfg["train"].get("grow_width") or "preset default"
        teacher, gens = load_run(run, dev)
        if teacher_ips is None and not a.fid_only:  # every run shares the teacher: time its Heun-35 sampler once
            heun = make_sampler("teacher", teacher, "heun", 35, seed=a.seed, device=dev, call_size=a.batch)
            first = iter(range(0, 1 << 30, a.batch))  # a new batch every call (the sampler keeps its last call)
            teacher_ips = a.batch / time_call(lambda: heun(next(first), a.batch), dev, repeats=2)
        widths = {s["resolution"]: s["grow_channels"] for s in cfg["stages"]}
        steps = {s["resolution"]: s["steps"] for s in cfg["stages"]}
        for res, G in sorted(gens.items()):
            G.eval()
            params, flops = flops_per_image(G.unet.config)
            z = G.sigma_max * torch.randn(a.batch, G.unet.config.in_channels, G.base_resolution, G.base_resolution,
                                          generator=torch.Generator().manual_seed(a.seed))
            y = torch.arange(a.batch) % G.unet.config.num_classes if G.unet.config.num_classes else None
            with torch.no_grad():
                ips = None if a.fid_only else a.batch / time_call(lambda: G(z, y), dev, repeats=a.repeats, warmup=2)
            timing = read_json(Path(run) / f"stage-{res:02d}" / "timing.json")
            growth_cpu = sum(read_json(Path(run) / f"stage-{r:02d}" / "timing.json").get("cpu_seconds", 0.0)
                             for r in gens if min(gens) < r <= res)
            row = {"run": str(run), "schedule": schedule, "stage": f"G{res}", "resolution": res, "growth_cpu_s": growth_cpu,
                   "width": widths.get(res), "params_M": params / 1e6, "gflop": flops / 1e9, "img_per_s": ips,
                   "x_teacher": ips and ips / teacher_ips, "train_cpu_s": timing.get("cpu_seconds"),
                   "train_wall_s": timing.get("seconds"), "steps": steps.get(res),
                   **fid_row(run, res, G)}
            rows.append(row)
            print(f"{run} ({schedule}) G{res}: FID {row['fid']:.2f}  {row['gflop']:.3f} GFLOP" +
                  (f"  {ips:.0f} img/s" if ips else ""), flush=True)
    speed = f"teacher Heun-35 {teacher_ips:.0f} img/s" if teacher_ips else "not timed (--fid-only)"
    print_table(f"width schedules: FID at n = {a.n} vs {a.ref_n} test images; {speed}",
                rows, [("schedule", "schedule", ""), ("stage", "stage", ""), ("width", "width", ""),
                       ("params_M", "params M", ".3f"), ("gflop", "GFLOP/img", ".4f"), ("img_per_s", "img/s", ".0f"),
                       ("x_teacher", "× teacher", ".1f"), ("steps", "steps", "d"), ("train_cpu_s", "train CPU s", ".0f"),
                       ("growth_cpu_s", "growth CPU s", ".0f"),
                       ("fid", "FID", ".2f"), ("kid_x1e3", "KID×10³", ".2f")])
    fig = figure(figsize=(12, 4))
    ax, bx = fig.subplots(1, 2)
    top = max(r["resolution"] for r in rows)
    first = min(r["steps"] for r in rows if r["resolution"] == top)  # equal steps: the runs with the fewest top steps
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        pts = [(r["gflop"], r["fid"], r["stage"]) for r in rows if r["schedule"] == schedule and
               next(q["steps"] for q in rows if q["run"] == r["run"] and q["resolution"] == top) == first]
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", label=schedule)
        for x, y, s in pts:
            ax.annotate(s, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        pts = sorted((r["growth_cpu_s"], r["fid"], r["steps"]) for r in rows
                     if r["schedule"] == schedule and r["resolution"] == top)
        bx.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", label=schedule)
        for x, y, k in pts:
            bx.annotate(str(k), (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set(xscale="log", xlabel="GFLOP per image (one call)", ylabel=f"FID (n = {a.n})",
           title=f"FID against cost per width schedule ({first} steps at {top} px)")
    bx.set(xlabel="training CPU s of the growth stages", ylabel=f"G{top} FID (n = {a.n})",
           title=f"G{top} FID against training cost (labels: steps at {top} px)")
    ax.legend()
    bx.legend()
    write_results(a.out, "width_schedules", {"environment": environment(dev), "n": a.n, "ref_n": a.ref_n,
                                              "teacher_heun35_img_per_s": teacher_ips, "rows": rows}, fig)


if __name__ == "__main__":
    main()
