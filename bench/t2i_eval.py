"""Text-to-image tables of issue 21 §6-7 (pagoda/alignment.py) for a text run, per resolution, against floors.

    python bench/t2i_eval.py --run runs/emoji --out results/t2i_eval                # every finished stage, ω 1, 2, 4
    python bench/t2i_eval.py --run runs/emoji runs/emoji-w32 --n 2000 --fid-res 8 64 --fid-omegas 1   # runs side by side
    python bench/t2i_eval.py --fake --out results/t2i_eval                          # the floor rows alone
    python bench/t2i_eval.py --fake --no-fid --res 8 16 32 64                       # alignment only (no Inception)

Rows at each resolution R: the floors — `real` (each prompt's real image at R: the ceiling of alignment; its FID
columns are the real-vs-real floor, two random halves of the training images), `real 8px + bicubic` (what growth
must beat), `noise` (chance) — and, with --run, `teacher 8px + bicubic` (Heun, 35 NFE, classifier-free guided at ω;
one set of 8-px samples per ω, upsampled to each R) and `G` (one call G(z, text, ω); ω > 1 needs an ω-conditioned G)
of every finished stage, for each ω of --omegas; with several runs (one teacher: the first run's), one G row per run
(a stage file scored before, e.g. a shared stage-08, is not scored again). FID/KID only at --fid-res and --fid-omegas
(Inception costs ≈ 20 images/s on 2 CPU cores; alignment costs little). Columns (prompts: the training captions, the first --n of a fixed
permutation, seeds fixed; 'held-out': the 175 captions of the test split, never trained on):
  subgroup / subgroup held-out   emoji-subgroup classifier accuracy (classifiers cached in RUN/classifier/)
  top1 / top5 (+ held-out)       retrieval among all 3,655 real emoji by Lite0 features at 64 px
  tone held-out                  the fraction of the 20 held-out ": dark skin tone" prompts' samples that the emoji-tone
                                 classifier calls dark (all 20 prompts are dark: read it against the next column)
  dark elsewhere                 … of the same 20 emoji's 4 trained tones' samples it calls dark (equal for a sampler
                                 that ignores the tone)
  tone 5                         its accuracy on the 20 emoji in all 5 tones (chance 1/5 for any tone-blind sampler)
  FID / KID×10³                  vs all 3,480 real training emoji at R (clean-fid Inception)
The classifiers' own accuracy on the real train / test images is printed first. Writes OUT/t2i_eval.json.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from common import device, environment, inception_model, load_run, parser, print_table, write_results

from pagoda import alignment as A
from pagoda import metrics as M
from pagoda.classifier import split_accuracy
from pagoda.images import resample
from pagoda.inference import make_sampler
from pagoda.rundir import GENERATOR_FILE, RunDir

COLUMNS = [("model", "model", ""), ("resolution", "px", "d"), ("omega", "ω", ""),
           ("subgroup", "subgroup", ".3f"), ("subgroup_held_out", "subgroup held-out", ".3f"),
           ("top1", "top1", ".3f"), ("top5", "top5", ".3f"), ("top1_held_out", "top1 held-out", ".3f"),
           ("top5_held_out", "top5 held-out", ".3f"), ("tone_held_out", "tone held-out", ".3f"),
           ("dark_elsewhere", "dark elsewhere", ".3f"), ("tone_five", "tone 5", ".3f"), ("fid", "FID", ".2f"),
           ("kid_x1e3", "KID×10³", ".2f")]


def floor_rows(measures: A.Measures, res: int, fid: bool) -> list[dict]:
    """The ceilings and chance at `res`: real images, real 8 px + bicubic, noise."""
    rows = [measures.row("real", None, A.real_sampler(res), fid="real halves" if fid else "none")]
    if res > 8:
        rows.append(measures.row("real 8px + bicubic", None, A.real_sampler(res, via=8), fid="samples" if fid else "none"))
    return rows + [measures.row("noise", None, A.noise_sampler(res), fid="none")]


def text_sampler(kind: str, model, omega: float, dev) -> A.Generate:
    """generate(prompts, seed) of a text teacher (Heun 35 NFE, guided) or generator (one call) of a run."""
    def generate(prompts: list[str], seed: int):
        return make_sampler(kind, model, "heun", 35, seed=seed, device=dev, guidance=omega, prompts=prompts)(0, len(prompts))
    return generate


def upsampled(generate: A.Generate, res: int, memo: dict) -> A.Generate:
    """generate's images bicubic-upsampled to `res`; each (prompts, seed) drawn once for every res (memo)."""
    def up(prompts: list[str], seed: int):
        key = (tuple(prompts), seed)
        if key not in memo:
            memo[key] = generate(prompts, seed)
        return resample(memo[key], res)
    return up


def run_rows(measures: A.Measures, teacher, runs: dict[str, dict], omegas: list[float], fid_res: set[int],
             fid_omegas: set[float], dev, g_only: bool = False) -> list[dict]:
    """The floors, the teacher 8 px + bicubic and G of every run's finished stages, for every ω, stage by stage
    (g_only: G alone). runs: {name: {resolution: (G, md5 of its file)}}."""
    memos, rows, seen = {omega: {} for omega in omegas}, [], {}
    for res in sorted({r for gens in runs.values() for r in gens}):
        fid = res in fid_res
        rows += [] if g_only else floor_rows(measures, res, fid)
        for omega in omegas:
            kind = "samples" if fid and omega in fid_omegas else "none"
            if not g_only:
                rows.append(measures.row("teacher 8px" + (" + bicubic" if res > 8 else ""), omega, upsampled(
                    text_sampler("teacher", teacher, omega, dev), res, memos[omega]), fid=kind))
            for name, gens in runs.items():
                if res not in gens:
                    continue
                G, md5 = gens[res]
                label = f"G {name}" if len(runs) > 1 else "G"
                if (md5, omega) in seen:  # the same file as another run's stage: one row says both
                    seen[md5, omega]["model"] += f" = {name}"
                elif omega == 1 or G.unet.config.guidance_embed:
                    seen[md5, omega] = measures.row(label, omega, text_sampler("generator", G, omega, dev), fid=kind)
                    rows.append(seen[md5, omega])
        print_table(f"t2i_eval: {res} px", [r for r in rows if r["resolution"] == res], COLUMNS)
    return rows


def load_text_runs(paths: list[str], dev) -> tuple[object, dict[str, dict]]:
    """(the first run's teacher, {run name: {resolution: (G, md5 of its generator file)}}); a run without a text
    encoder: SystemExit with the fix."""
    teacher, runs = None, {}
    for path in paths:
        t, gens = load_run(path, dev)
        if getattr(t, "text_encoder", None) is None:
            raise SystemExit(f"error: {path} is not a text run (its teacher has no text encoder); fix: train one with "
                             f"`pagoda train --data emoji --preset emoji`, or pass --fake")
        teacher = teacher or t
        files = {int(s.name.split("-")[-1]): s / GENERATOR_FILE for s in RunDir(path).finished()}
        runs[Path(path).name] = {r: (G, hashlib.md5(files[r].read_bytes()).hexdigest()) for r, G in gens.items()}
    return teacher, runs


def main() -> None:
    p = parser(__doc__, "t2i_eval", run=False)
    p.add_argument("--run", nargs="+", default=None, help="text run directories (pagoda train --data emoji --out RUN)")
    p.add_argument("--fake", action="store_true", help="no run: the floor rows alone (real images, noise)")
    p.add_argument("--res", type=int, nargs="+", default=[8, 16, 32, 64], help="--fake: resolutions of the rows")
    p.add_argument("--omegas", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="guidance ω of the run's rows")
    p.add_argument("--n", type=int, default=None, help="training prompts per row (default: all 3,480)")
    p.add_argument("--no-fid", action="store_true", help="alignment only (FID needs Inception on every sample)")
    p.add_argument("--g-only", action="store_true", help="G rows alone (the floors and the teacher scored before)")
    p.add_argument("--fid-res", type=int, nargs="+", default=[8, 16, 32, 64], help="resolutions of the FID/KID columns")
    p.add_argument("--fid-omegas", type=float, nargs="+", default=None, help="ω of the FID/KID columns (default: all)")
    p.add_argument("--classifiers", default=None, help="classifier cache folder (default RUN/classifier or OUT/classifier)")
    a = p.parse_args()
    if (a.run is None) == (not a.fake):
        raise SystemExit("error: pass --run RUN (a text run) or --fake (the floor rows alone), not both")
    dev = device(a.device)
    ext = None if a.no_fid else M.FeatureExtractor(dev, 100, model=inception_model(dev))
    folder = a.classifiers or (RunDir(a.run[0]).classifier if a.run else Path(a.out) / "classifier")
    teacher, runs = load_text_runs(a.run, dev) if a.run else (None, {})
    gens = {r for g in runs.values() for r in g}
    measures = A.Measures(folder, a.n, ext)
    accuracy = {f"{task}-{r}": {split: split_accuracy(measures.classifier(task, r), split) for split in ("train", "test")}
                for task in ("emoji-subgroup", "emoji-tone") for r in (sorted(gens) or a.res)}
    print("classifier accuracy on real images: " + ", ".join(f"{k} train {v['train']:.3f} test {v['test']:.3f}"
                                                           for k, v in accuracy.items()), flush=True)
    fid_res = set() if a.no_fid else set(a.fid_res)
    rows = run_rows(measures, teacher, runs, a.omegas, fid_res, set(a.fid_omegas or a.omegas), dev,
                    a.g_only) if a.run else \
        [row for r in a.res for row in floor_rows(measures, r, r in fid_res)]
    print_table(f"t2i_eval: n = {len(measures.prompts['train'])} training prompts per row", rows, COLUMNS)
    write_results(a.out, "t2i_eval", {"run": a.run, "n": len(measures.prompts["train"]), "classifier_accuracy": accuracy,
                                      "env": environment(dev), "rows": rows})


if __name__ == "__main__":
    main()
