"""Quality on Fashion-MNIST, every row at the same n, against the test split: one-step G vs teacher vs up-sampling.

    .venv/bin/python bench/quality.py --run runs/demo --out results/quality --n 2000   # CPU: minutes per row

FID / KID (clean-fid pipeline, pagoda.metrics) of n images per row against the Fashion-MNIST *test* split at the
row's resolution (all 10,000 images unless --ref-n, ADM-downsampled; statistics cached in
~/.cache/pagoda/fid-stats). Image i of every sampled row is seeded by (--seed, i). Rows, with R the teacher
resolution and R' every grown resolution of the run:
  G R px, G R'    the one-step generator of each finished stage (1 NFE)
  teacher R px    Heun 35 NFE (and --teacher-rows SOLVER:NFE)
  teacher → R'    teacher samples (Heun 35 NFE) + bicubic up-sampling: what growing must beat
  real R → R'     real *train* images (disjoint from the test reference) down-sampled to R, then bicubic to R':
                  the floor of any up-sampler of a perfect low-resolution model
  real R'         real train images at the row's resolution: the noise floor of FID at this n
FID is biased upwards at small n, so only rows of one table (same n, same reference) compare.
Writes OUT/quality.json, .png. `score_generator` is what bench/ablation.py scores its variants with.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from common import device, draw, environment, figure, inception_model, load_run, parser, print_table, read_json, write_results
from pagoda import metrics as M
from pagoda.data import make_dataset
from pagoda.images import downsample, resample
from pagoda.inference import make_sampler
from pagoda.solvers import solver_steps

TEACHER_ROWS = ["heun:35"]  # SOLVER:NFE
GROUPS = ("generator", "teacher", "upsampled teacher", "upsampled real", "real")  # row groups, in table order


class Scorer:
    """FID/KID of feature sets against the test-split reference at each resolution (computed once, cached)."""

    def __init__(self, dev: torch.device, batch: int = 100, ref_n: int | None = None, kid_subsets: int = 100):
        self.ext = M.FeatureExtractor(dev, batch, model=inception_model(dev))
        self.ref_n, self.kid_subsets, self.refs = ref_n, kid_subsets, {}

    def reference(self, res: int) -> M.ReferenceStats:
        if res not in self.refs:
            self.refs[res] = M.dataset_reference("fashion-mnist", res, self.ext, "test", max_images=self.ref_n)
        return self.refs[res]

    def score(self, feats: np.ndarray, res: int) -> dict:
        ref = self.reference(res)
        fid = M.fid_from_stats(*M.mean_cov(feats), ref.mu, ref.sigma)
        kid, kid_std = M.kid_from_features(feats, ref.features, subsets=self.kid_subsets)
        return {"resolution": res, "n": len(feats), "ref_n": ref.n, "fid": fid, "kid_x1e3": 1e3 * kid,
                "kid_std_x1e3": 1e3 * kid_std}

    def sampled(self, kind, model, n: int, seed: int, dev, solver="heun", nfe=35, resize=None) -> np.ndarray:
        return self.ext.features_from_generator(make_sampler(kind, model, solver, nfe, resize, seed, dev), n)


class ScoreCache:
    """Rows scored before, kept in OUT/fid_cache.json under a key (e.g. a generator file's md5) and n, ref_n, seed:
    read back instead of scored again, so a script can score runs while they train and be re-run for its tables."""

    def __init__(self, out: str | Path, n: int, ref_n: int | None, seed: int):
        self.path, self.suffix = Path(out) / "fid_cache.json", f"-n{n}-ref{ref_n}-seed{seed}"
        self.rows = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str, score) -> dict:
        """The row under key, from score() the first time."""
        key += self.suffix
        if key not in self.rows:
            self.rows[key] = score()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rows, indent=1))
        return self.rows[key]


def file_md5(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def score_generator(scorer: Scorer, G, n: int, seed: int, dev) -> dict:
    """The row of one generator: FID/KID of n one-step samples at its resolution."""
    return scorer.score(scorer.sampled("generator", G, n, seed, dev), G.resolution)


def main() -> None:
    p = parser(__doc__, "quality")
    p.add_argument("--n", type=int, default=2000, help="images per row")
    p.add_argument("--ref-n", type=int, default=None, help="test images in the reference (default: all 10,000)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-rows", nargs="+", default=TEACHER_ROWS, help="teacher rows as SOLVER:NFE")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS, metavar="GROUP",
                   help=f"row groups to compute ({', '.join(GROUPS)}); the others are kept from OUT/quality.json")
    a = p.parse_args()
    old = Path(a.out) / "quality.json"
    kept = []
    if set(a.groups) != set(GROUPS):
        prev = read_json(old)
        if prev.get("n") != a.n or prev.get("run") != a.run or prev.get("ref_n") != a.ref_n:
            raise SystemExit(f"error: --groups {' '.join(a.groups)} keeps the other rows from {old}, which is missing or "
                             f"was not made from --run {a.run} at --n {a.n}: compute every group once first")
        kept = [r for r in prev["rows"] if r["group"] not in a.groups]
    try:  # fail before any sampling: "heun:10" is impossible (Heun takes odd NFE), "rk4:9" unknown
        teacher_rows = [(row.partition(":")[0], int(row.partition(":")[2])) for row in a.teacher_rows]
        for solver, nfe in teacher_rows:
            solver_steps(solver, nfe)
    except ValueError as e:
        raise SystemExit(f"error: --teacher-rows {' '.join(a.teacher_rows)}: {e} (use SOLVER:NFE, e.g. heun:35)") from None
    dev = device(a.device)
    teacher, gens = load_run(a.run, dev)
    R = teacher.unet.config.resolution
    grown = sorted(r for r in gens if r > R)
    scorer, rows, todo = Scorer(dev, a.batch, a.ref_n), [], set(a.groups)
    perm = torch.from_numpy(np.random.default_rng(a.seed).permutation(60_000)[:a.n])
    real = make_dataset("fashion-mnist", 32, split="train").images[perm]  # disjoint from the test reference

    def add(name: str, group: str, nfe: int | None, row: dict) -> None:
        rows.append({"row": name, "group": group, "nfe": nfe, **row})
        print(f"{name}: FID {row['fid']:.2f}  KID×10³ {row['kid_x1e3']:.2f}", flush=True)

    for res, G in sorted(gens.items()) if "generator" in todo else []:
        add(f"G {res}px (stage-{res:02d})", "generator", 1, score_generator(scorer, G, a.n, a.seed, dev))
    for solver, nfe in teacher_rows if "teacher" in todo else []:
        add(f"teacher {R}px {solver} {nfe} NFE", "teacher", nfe,
            scorer.score(scorer.sampled("teacher", teacher, a.n, a.seed, dev, solver, nfe), R))
    if grown and "upsampled teacher" in todo:  # one set of Heun-35 samples, up-sampled to each grown resolution
        generate = make_sampler("teacher", teacher, "heun", 35, seed=a.seed, device=dev)
        x_t = draw(generate, a.n, a.batch)
        for res in grown:
            add(f"teacher {R}px heun 35 NFE → bicubic {res}px", "upsampled teacher", 35,
                scorer.score(scorer.ext.features(resample(x_t, res)), res))
    low = downsample(real, R)
    for res in grown if "upsampled real" in todo else []:
        add(f"real {R}px → bicubic {res}px", "upsampled real", None, scorer.score(scorer.ext.features(resample(low, res)), res))
    for res in [R, *grown] if "real" in todo else []:
        add(f"real {res}px (train vs test)", "real", None, scorer.score(scorer.ext.features(resample(real, res)), res))
    rows[:] = sorted(kept + rows, key=lambda r: GROUPS.index(r["group"]))  # stable: row order within a group kept
    ref_n = scorer.reference(R).n
    print_table(f"Fashion-MNIST quality, n = {a.n} per row, reference = {ref_n} test images", rows,
                [("row", "row", ""), ("resolution", "px", "d"), ("nfe", "NFE", "d"), ("fid", "FID", ".2f"),
                 ("kid_x1e3", "KID ×10³", ".2f"), ("kid_std_x1e3", "± (std)", ".2f")])
    fig = figure(figsize=(8, 0.32 * len(rows) + 1))
    ax = fig.subplots()
    colors = {"teacher": "C1", "generator": "C0", "upsampled teacher": "C2", "upsampled real": "C4", "real": "C7"}
    ax.barh([f"{r['row']}" for r in rows][::-1], [r["fid"] for r in rows][::-1], color=[colors[r["group"]] for r in rows][::-1])
    ax.set(xlabel=f"FID (n = {a.n}; lower is better)", title="Fashion-MNIST quality vs the test split")
    write_results(a.out, "quality", {"run": a.run, "n": a.n, "ref_n": a.ref_n, "seed": a.seed,
                                     "reference": f"fashion-mnist test ({ref_n} images, ADM-downsampled)",
                                     "carried_over": sorted(set(GROUPS) - set(a.groups)),
                                     "env": environment(dev), "rows": rows}, fig)


if __name__ == "__main__":
    main()
