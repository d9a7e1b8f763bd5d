"""Quality on Fashion-MNIST, every row at the same n: teacher vs one-step G vs up-sampling vs real data.

    .venv/bin/python bench/quality.py --run runs/demo --n 1000 --out results/quality   # CPU: ≈ 1-3 Inception images/s

FID / KID (clean-fid pipeline, pagoda.metrics) of n images per row against n Fashion-MNIST *train* images at
the row's resolution (ADM-downsampled, seeded subset, cached in ~/.cache/pagoda/fid-stats). Rows, with R the
teacher resolution and R' every grown resolution of the run:
  teacher R px    dpmpp_2m at 10 and 20 NFE, heun at 35 and 79 NFE (EDM's sampler; Heun takes odd NFE only)
  G R px, G R'    the one-step generator of each finished stage (1 NFE)
  teacher → R'    teacher samples (heun 35 NFE) + bicubic up-sampling: what growing must beat
  real R → R'     held-out *test* images down-sampled to R, then bicubic up to R': the floor of any super-resolver
  real R, real R' test images at the row's resolution vs the train reference: the noise floor at this n
FID is biased upwards at small n, so only rows of one table (same n) compare. Writes OUT/quality.json, .png.
After retraining stages, `--groups generator` recomputes only those rows; the other groups' rows are carried
over from OUT/quality.json when it was made from the same run directory at the same n (all rows are seeded).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common import device, environment, figure, load_run, parser, print_table, write_results
from pagoda import metrics as M
from pagoda.data import downsample, make_dataset
from pagoda.evaluate import make_sampler, resample, solver_steps

TEACHER_ROWS = ["dpmpp_2m:10", "dpmpp_2m:20", "heun:35", "heun:79"]  # SOLVER:NFE
GROUPS = ("teacher", "generator", "upsampled teacher", "upsampled real", "real")  # row groups, in table order


def main() -> None:
    p = parser(__doc__, "quality")
    p.add_argument("--n", type=int, default=1000, help="images per row (and reference images per resolution)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--teacher-rows", nargs="+", default=TEACHER_ROWS, help="teacher rows as SOLVER:NFE")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS, metavar="GROUP",
                   help=f"row groups to compute ({', '.join(GROUPS)}); the others are kept from OUT/quality.json")
    a = p.parse_args()
    old = Path(a.out) / "quality.json"
    kept = []
    if set(a.groups) != set(GROUPS):
        prev = json.loads(old.read_text()) if old.is_file() else {}
        if prev.get("n") != a.n or prev.get("run") != a.run:
            raise SystemExit(f"error: --groups {' '.join(a.groups)} keeps the other rows from {old}, which is missing or "
                             f"was not made from --run {a.run} at --n {a.n}: compute every group once first")
        kept = [r for r in prev["rows"] if r["group"] not in a.groups]
    try:  # fail before any sampling: "heun:10" is impossible (Heun takes odd NFE), "rk4:9" unknown
        teacher_rows = [(row.partition(":")[0], row.partition(":")[2]) for row in a.teacher_rows]
        for row, (solver, nfe) in zip(a.teacher_rows, teacher_rows):
            if not nfe.isdigit():
                raise ValueError(f"{row!r} is not SOLVER:NFE (e.g. heun:35)")
            solver_steps(solver, int(nfe))
        teacher_rows = [(solver, int(nfe)) for solver, nfe in teacher_rows]
    except ValueError as e:
        raise SystemExit(f"error: --teacher-rows {' '.join(a.teacher_rows)}: {e}") from None
    dev = device(a.device)
    teacher, gens = load_run(a.run, dev)
    R = teacher.unet.config.resolution
    grown = sorted(r for r in gens if r > R)
    ext = M.FeatureExtractor(dev, a.batch)
    refs = {res: M.dataset_reference("fashion-mnist", res, ext, "train", max_images=a.n) for res in [R, *grown]}
    perm = torch.from_numpy(np.random.default_rng(a.seed).permutation(10_000)[:a.n])
    test = make_dataset("fashion-mnist", 32, split="test").images[perm]  # held out: neither teacher nor G saw them

    def from_sampler(kind, model, solver="heun", nfe=35, resize=None) -> np.ndarray:
        return ext.features_from_generator(make_sampler(kind, model, solver, nfe, resize, a.seed, dev), a.n, a.batch)

    rows = []

    def score(name: str, group: str, res: int, nfe: int | None, feats: np.ndarray) -> None:
        ref = refs[res]
        full = ref.features is not None and len(ref.features) == ref.n  # all reference features kept: exact FID
        fid = M.fid_from_features(feats, ref.features) if full else M.fid_from_stats(*M.mean_cov(feats), ref.mu, ref.sigma)
        kid, kid_std = M.kid_from_features(feats, ref.features, subsets=a.kid_subsets) if ref.features is not None else (None, None)
        rows.append({"row": name, "group": group, "resolution": res, "nfe": nfe, "n": len(feats), "fid": fid,
                     "kid_x1e3": None if kid is None else 1e3 * kid, "kid_std_x1e3": None if kid is None else 1e3 * kid_std})
        print(f"{name}: FID {fid:.2f}", flush=True)

    todo = set(a.groups)
    for solver, nfe in teacher_rows if "teacher" in todo else []:
        score(f"teacher {R}px {solver} {nfe} NFE", "teacher", R, nfe, from_sampler("teacher", teacher, solver, nfe))
    for res, G in sorted(gens.items()) if "generator" in todo else []:
        score(f"G {res}px (stage-{res:02d})", "generator", res, 1, from_sampler("generator", G))
    for res in grown if "upsampled teacher" in todo else []:
        score(f"teacher {R}px heun 35 NFE → bicubic {res}px", "upsampled teacher", res, 35,
              from_sampler("teacher", teacher, "heun", 35, res))
    low = downsample(test, R)
    for res in grown if "upsampled real" in todo else []:
        score(f"real {R}px → bicubic {res}px", "upsampled real", res, None, ext.features(resample(low, res)))
    for res in [R, *grown] if "real" in todo else []:
        score(f"real {res}px (test vs train)", "real", res, None, ext.features(resample(test, res)))
    rows[:] = sorted(kept + rows, key=lambda r: GROUPS.index(r["group"]))  # stable: row order within a group kept
    print_table(f"Fashion-MNIST quality, n = {a.n} per row, reference n = {a.n} train images", rows,
                [("row", "row", ""), ("resolution", "px", "d"), ("nfe", "NFE", "d"), ("fid", "FID", ".2f"),
                 ("kid_x1e3", "KID ×10³", ".2f"), ("kid_std_x1e3", "± (std)", ".2f")])
    fig = figure(figsize=(8, 0.32 * len(rows) + 1))
    ax = fig.subplots()
    colors = {"teacher": "C1", "generator": "C0", "upsampled teacher": "C2", "upsampled real": "C4", "real": "C7"}
    ax.barh([f"{r['row']}" for r in rows][::-1], [r["fid"] for r in rows][::-1], color=[colors[r["group"]] for r in rows][::-1])
    ax.set(xlabel=f"FID (n = {a.n}; lower is better)", title="Fashion-MNIST quality")
    write_results(a.out, "quality", {"run": a.run, "n": a.n, "reference": "fashion-mnist train (ADM-downsampled)",
                                     "carried_over": sorted(set(GROUPS) - set(a.groups)),
                                     "env": environment(dev), "rows": rows}, fig)


if __name__ == "__main__":
    main()
