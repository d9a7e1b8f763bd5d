"""The pipeline-cost claim: PaGoDA's 8 → 32 against the conventional route, a teacher and a one-step G at 32 px.

    pagoda train --out runs/demo                                        # PaGoDA: 8-px teacher, G8, grown to 16, 32
    pagoda train --teacher-preset demo32 --res 32 --out runs/conv32     # conventional: the same recipe at 32 px
    OMP_NUM_THREADS=2 .venv/bin/python bench/pipeline_cost.py --runs runs/demo runs/conv32 --n 2000 --ref-n 2000
    # cost curves: more runs of a route with a longer last stage, e.g. `pagoda train --steps 700,800,1500 --out
    # runs/demo-1500` and `pagoda train --teacher-preset demo32 --res 32 --steps 350 --out runs/conv32-350`
    OMP_NUM_THREADS=2 .venv/bin/python bench/pipeline_cost.py --runs runs/demo runs/demo-1500 runs/conv32-350 runs/conv32

The conventional route is `pagoda train` itself on a teacher trained at the target resolution (`demo32`: the demo
teacher's recipe, widths and 4-px attention, two more levels; 1200 steps × 128): latent cache at 32 px, then one
stage at the teacher resolution with the first stage's recipe (G = teacher copy, L_rec + λ L_adv), no growth.
Per run: the CPU seconds of every phase from its timing.json files (teacher, latent cache, each stage: the cost of
every timed session; a phase trained side by side with other jobs still counts its own process's CPU time), their
sum, and the FID/KID of the last stage's G at the target resolution (n one-step samples against --ref-n
Fashion-MNIST test images, bench/quality.py's Scorer; cached in OUT/fid_cache.json by the generator file's md5).
Runs with the same route (teacher px -> G px) are points of one cost curve; for every row, the CPU seconds each other
route needs to reach its FID, read off that route's curve by linear interpolation between its measured points
("< first" / "> last" outside them: not extrapolated). --teacher-fid adds each teacher's Heun-35 FID at its own
resolution (35 NFE per image: minutes at 32 px). Writes OUT/pipeline_cost.json and .png (FID against total CPU s).
"""
from __future__ import annotations

from pathlib import Path

from common import device, environment, figure, load_run, parser, print_table, read_json, write_results
from quality import ScoreCache, Scorer, file_md5, score_generator
from pagoda.rundir import GENERATOR_FILE, TIMING_FILE, RunDir


def phases(run: Path) -> list[tuple[str, dict]]:
    """(phase, its timing.json) of a run, in pipeline order: teacher, latent cache, stages."""
    r = RunDir(run)
    found = [("teacher", r.teacher_dir / TIMING_FILE), ("latent cache", r.latents / TIMING_FILE)]
    found += [(s.name, s / TIMING_FILE) for s in r.finished()]
    return [(name, read_json(path)) for name, path in found if path.is_file()]


def cpu_to_reach(curve: list[tuple[float, float]], fid: float) -> float | str:
    """CPU s at which a route's (CPU s, FID) points first reach `fid`, interpolated linearly; a string outside them."""
    curve = sorted(curve)
    if curve[0][1] <= fid:
        return f"< {curve[0][0]:.0f}"
    for (c0, f0), (c1, f1) in zip(curve, curve[1:]):
        if f1 <= fid:
            return c0 + (c1 - c0) * (f0 - fid) / (f0 - f1)
    return f"> {curve[-1][0]:.0f}"


def main() -> None:
    p = parser(__doc__, "pipeline_cost", run=False)
    p.add_argument("--runs", nargs="+", required=True, help="finished run directories (PaGoDA's, the conventional)")
    p.add_argument("--n", type=int, default=2000, help="samples per FID row")
    p.add_argument("--ref-n", type=int, default=2000, help="test images in the FID reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-fid", action="store_true", help="also each teacher's Heun-35 FID at its resolution")
    a = p.parse_args()
    dev = device(a.device)
    scorer, rows, cache = Scorer(dev, ref_n=a.ref_n), [], ScoreCache(a.out, a.n, a.ref_n, a.seed)

    for run in map(Path, a.runs):
        teacher, gens = load_run(run, dev)
        res = max(gens)
        G = gens[res].eval()
        cost = phases(run)
        row = {"run": str(run), "route": f"teacher {teacher.resolution} px -> G{res}",
               **{f"cpu_{name}": t.get("cpu_seconds") for name, t in cost},
               "steps": {name: t.get("steps") for name, t in cost},
               "cpu_total": sum(t.get("cpu_seconds", 0.0) for _, t in cost),
               "wall_total": sum(t.get("seconds", 0.0) for _, t in cost),
               **cache.get(file_md5(RunDir(run).stage(res) / GENERATOR_FILE),
                            lambda: score_generator(scorer, G, a.n, a.seed, dev))}
        if a.teacher_fid:
            row["teacher_fid"] = cache.get("teacher-" + file_md5(RunDir(run).teacher), lambda: scorer.score(
                scorer.sampled("teacher", teacher, a.n, a.seed, dev), teacher.resolution))["fid"]
        rows.append(row)
        print(f"{row['route']}: {row['cpu_total']:.0f} CPU s, FID {row['fid']:.2f}", flush=True)
    curves = {route: [(r["cpu_total"], r["fid"]) for r in rows if r["route"] == route]
              for route in dict.fromkeys(r["route"] for r in rows)}
    for r in rows:
        r["reach_cpu"] = {route: cpu_to_reach(c, r["fid"]) for route, c in curves.items() if route != r["route"]}
    names = list(dict.fromkeys(k for r in rows for k in r if k.startswith("cpu_") and k != "cpu_total"))
    print_table(f"pipeline cost: CPU seconds per phase, FID at n = {a.n} vs {a.ref_n} test images", rows,
                [("route", "route", "")] + [(k, k[4:] + " CPU s", ".0f") for k in names]
                + [("cpu_total", "total CPU s", ".0f"), ("fid", "FID", ".2f"), ("kid_x1e3", "KID×10³", ".2f")]
                + ([("teacher_fid", "teacher FID", ".2f")] if a.teacher_fid else []))
    for r in rows:
        for route, cpu in r["reach_cpu"].items():
            print(f"{route} reaches {r['route']}'s FID {r['fid']:.2f} ({r['run']}, {r['cpu_total']:.0f} CPU s) at "
                  + (f"{cpu:.0f}" if isinstance(cpu, float) else cpu) + " CPU s")
    fig = figure(figsize=(6, 4))
    ax = fig.subplots()
    for route, c in curves.items():
        ax.plot(*zip(*sorted(c)), "o-", label=route)
    ax.set(xscale="log", xlabel="total training CPU s (teacher + latent cache + stages)", ylabel=f"final G FID (n = {a.n})",
           title="the pipeline's cost: PaGoDA's growth against the conventional route")
    ax.legend()
    write_results(a.out, "pipeline_cost", {"environment": environment(dev), "n": a.n, "ref_n": a.ref_n, "rows": rows}, fig)


if __name__ == "__main__":
    main()
