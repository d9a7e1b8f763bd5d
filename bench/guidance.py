"""Guidance in one network call: FID and class accuracy vs ω, the guided teacher (Heun 35 NFE) vs G(z, y, ω) (1 NFE).

    .venv/bin/pagoda train --guidance-max 4 --out runs/guided                       # a run with an ω-conditioned G
    .venv/bin/python bench/guidance.py --run runs/guided --out results/guidance --n 1000 --ref-n 2000

For every ω (--omegas) and every finished stage: n samples of G(z, y, ω) at the stage's resolution and n guided
teacher samples at the teacher resolution R (the same z and labels: image i from (seed, i), label i mod 10), each
scored by
  FID / KID   against the Fashion-MNIST test split at the row's resolution (bench/quality.py's Scorer);
  accuracy    the fraction the run's Fashion-MNIST classifier (pagoda/classifier.py, RUN/classifier/, trained on
              first use) puts in the conditioning class.
The teacher row of a grown resolution is its R-px samples up-sampled (bicubic): what G must match there. The
goal: G's FID within 10 % of the teacher's, its accuracy within 2 points, at every ω. Writes
OUT/guidance.json, .png.
"""
from __future__ import annotations

import torch

from common import device, draw, environment, figure, load_run, parser, print_table, write_results
from quality import Scorer

from pagoda.classifier import NUM_CLASSES, classifier_for, classifier_file
from pagoda.images import resample
from pagoda.inference import make_sampler
from pagoda.io import load_checkpoint
from pagoda.loop import index_labels
from pagoda.rundir import RunDir

OMEGAS = (1.0, 1.5, 2.0, 3.0, 4.0)


def main() -> None:
    p = parser(__doc__, "guidance")
    p.add_argument("--n", type=int, default=1000, help="samples per row")
    p.add_argument("--ref-n", type=int, default=2000, help="test images in the FID reference")
    p.add_argument("--omegas", type=float, nargs="+", default=list(OMEGAS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    a = p.parse_args()
    dev = device(a.device)
    teacher, gens = load_run(a.run, dev)
    R = teacher.unet.config.resolution
    if not all(G.unet.config.guidance_embed for G in gens.values()):
        raise SystemExit(f"error: {a.run} has no ω-conditioned G: train it with `pagoda train --guidance-max 4`")
    folder = RunDir(a.run).classifier
    classifiers = {res: classifier_for(folder, res) for res in sorted({R, *gens})}
    clf_test = {res: load_checkpoint(folder / classifier_file(res))["test_accuracy"] for res in classifiers}
    print("classifier test accuracy: " + ", ".join(f"{r}px {100 * v:.1f}%" for r, v in clf_test.items()), flush=True)
    scorer, rows = Scorer(dev, a.batch, a.ref_n), []
    labels = index_labels(0, a.n, NUM_CLASSES)

    def add(model: str, omega: float, res: int, x: torch.Tensor) -> None:
        row = {"model": model, "omega": omega, **scorer.score(scorer.ext.features(x), res),
               "accuracy": classifiers[res].accuracy(x, labels)}
        rows.append(row)
        print(f"{model} ω={omega:g} {res}px: FID {row['fid']:.2f}  accuracy {100 * row['accuracy']:.1f}%", flush=True)

    for omega in a.omegas:
        x_t = draw(make_sampler("teacher", teacher, "heun", 35, seed=a.seed, device=dev, guidance=omega), a.n, a.batch)
        for res, G in sorted(gens.items()):
            add("teacher (Heun 35 NFE)" + ("" if res == R else " → bicubic"), omega, res, resample(x_t, res))
            add("G (1 NFE)", omega, res, draw(make_sampler("generator", G, seed=a.seed, device=dev, guidance=omega),
                                              a.n, a.batch))
    for r in rows:  # the goal, per (ω, resolution): G vs the teacher row beside it
        if r["model"].startswith("G"):
            t = next(t for t in rows if t["omega"] == r["omega"] and t["resolution"] == r["resolution"] and t is not r
                     and t["model"].startswith("teacher"))
            r["fid_vs_teacher"] = r["fid"] / t["fid"] - 1
            r["accuracy_vs_teacher"] = r["accuracy"] - t["accuracy"]
    print_table(f"guidance: n = {a.n} per row, reference = {a.ref_n} test images", rows,
                [("model", "model", ""), ("resolution", "px", "d"), ("omega", "ω", "g"), ("fid", "FID", ".2f"),
                 ("kid_x1e3", "KID×10³", ".2f"), ("accuracy", "accuracy", ".3f"),
                 ("fid_vs_teacher", "FID vs teacher", "+.1%"), ("accuracy_vs_teacher", "acc − teacher", "+.3f")])
    fig = figure(figsize=(4.2 * len(gens), 6.4))
    axes = fig.subplots(2, len(gens), squeeze=False)
    for j, res in enumerate(sorted(gens)):
        for model, style in (("teacher", "o--"), ("G", "s-")):
            sel = [r for r in rows if r["resolution"] == res and r["model"].startswith(model)]
            axes[0, j].plot([r["omega"] for r in sel], [r["fid"] for r in sel], style, label=sel[0]["model"])
            axes[1, j].plot([r["omega"] for r in sel], [100 * r["accuracy"] for r in sel], style, label=sel[0]["model"])
        axes[0, j].set(title=f"{res} px", ylabel="FID (lower is better)")
        axes[1, j].set(xlabel="guidance ω", ylabel="class accuracy, %")
        axes[0, j].legend(fontsize=7)
    write_results(a.out, "guidance", {"run": a.run, "n": a.n, "ref_n": a.ref_n, "seed": a.seed,
                                      "classifier_test_accuracy": clf_test, "env": environment(dev), "rows": rows}, fig)


if __name__ == "__main__":
    main()
