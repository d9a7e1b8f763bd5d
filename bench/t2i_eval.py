"""Text-to-image tables of issue 21 §6-7 (pagoda/alignment.py) for samplers generate(prompts, seed), per resolution.

    python bench/t2i_eval.py --fake --out results/t2i_eval                  # ceilings (real images), chance (noise)
    python bench/t2i_eval.py --fake --no-fid --res 8 16 32 64               # alignment only (no Inception: minutes)

Rows: with --fake, `real` (each prompt's real image at the row's resolution: the ceiling of alignment; its FID
columns are the real-vs-real floor, two random halves of the training images), `real 8px + bicubic` (the floor
that growth must beat) and `noise` (chance). A text run's rows (teacher 8 px + bicubic, G8 … G64, ω ∈ {1, 2, 4})
go through `measure` with the run's samplers. Columns, per row (prompts: the training captions, the first --n of a
fixed permutation, seeds fixed; 'held-out': the 175 captions of the test split, never trained on):
  subgroup / subgroup held-out   emoji-subgroup classifier accuracy (RUN/classifier/emoji-subgroup-R.pt)
  top1 / top5 (+ held-out)       retrieval among all 3,655 real emoji by Lite0 features at 64 px
  tone held-out / tone 5         emoji-tone classifier accuracy on the 20 held-out ": dark skin tone" prompts / on
                                 their 20 bases in all 5 tones (chance 1/5 for any sampler that ignores the tone)
  FID / KID×10³                  vs all 3,480 real training emoji at the row's resolution (clean-fid Inception)
Writes OUT/t2i_eval.json.
"""
from __future__ import annotations

from pathlib import Path

from common import device, environment, inception_model, parser, print_table, write_results

from pagoda import alignment as A
from pagoda import metrics as M
from pagoda.classifier import split_accuracy

COLUMNS = [("model", "model", ""), ("resolution", "px", "d"), ("omega", "ω", ""),
           ("subgroup", "subgroup", ".3f"), ("subgroup_held_out", "subgroup held-out", ".3f"),
           ("top1", "top1", ".3f"), ("top5", "top5", ".3f"), ("top1_held_out", "top1 held-out", ".3f"),
           ("top5_held_out", "top5 held-out", ".3f"), ("tone_held_out", "tone held-out", ".3f"),
           ("tone_five", "tone 5", ".3f"), ("fid", "FID", ".2f"), ("kid_x1e3", "KID×10³", ".2f")]


def fake_rows(measures: A.Measures, resolutions: list[int], fid: bool) -> list[dict]:
    """The ceilings and chance: real images, real 8 px + bicubic, noise, at each resolution."""
    rows = []
    for res in resolutions:
        rows.append(measures.row("real", None, A.real_sampler(res), fid="real halves" if fid else "none"))
        if res > 8:
            rows.append(measures.row("real 8px + bicubic", None, A.real_sampler(res, via=8),
                                     fid="samples" if fid else "none"))
        rows.append(measures.row("noise", None, A.noise_sampler(res), fid="none"))
        print_table(f"t2i_eval: {res} px so far", rows[-3:], COLUMNS)
    return rows


def main() -> None:
    p = parser(__doc__, "t2i_eval", run=False)
    p.add_argument("--fake", action="store_true", help="score the real images (ceilings) and noise (chance)")
    p.add_argument("--res", type=int, nargs="+", default=[8, 16, 32, 64], help="resolutions of the rows")
    p.add_argument("--n", type=int, default=None, help="training prompts per row (default: all 3,480)")
    p.add_argument("--no-fid", action="store_true", help="alignment only (FID needs Inception on every sample)")
    p.add_argument("--classifiers", default=None, help="classifier cache folder (default OUT/classifier)")
    a = p.parse_args()
    if not a.fake:
        raise SystemExit("error: pass --fake (a text run's samplers go through Measures.row; see the docstring)")
    dev = device(a.device)
    ext = None if a.no_fid else M.FeatureExtractor(dev, 100, model=inception_model(dev))
    measures = A.Measures(a.classifiers or Path(a.out) / "classifier", a.n, ext)
    accuracy = {f"{task}-{res}": {split: split_accuracy(measures.classifier(task, res), split) for split in ("train", "test")}
                for task in ("emoji-subgroup", "emoji-tone") for res in a.res}
    print("classifier accuracy on real images: " + ", ".join(f"{k} train {v['train']:.3f} test {v['test']:.3f}"
                                                           for k, v in accuracy.items()), flush=True)
    rows = fake_rows(measures, a.res, not a.no_fid)
    print_table(f"t2i_eval: n = {len(measures.prompts['train'])} training prompts per row", rows, COLUMNS)
    write_results(a.out, "t2i_eval", {"n": len(measures.prompts["train"]), "classifier_accuracy": accuracy,
                                      "env": environment(dev), "rows": rows})


if __name__ == "__main__":
    main()
