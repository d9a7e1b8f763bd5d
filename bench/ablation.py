"""The growth recipe, one change at a time: retrain stages of a run with a variant, score FID/KID.

    .venv/bin/python bench/ablation.py --base runs/demo --out results/ablation --rows ema_split:growth_lr_G_8e-4
    .venv/bin/python bench/ablation.py --base runs/demo --out results/ablation --table      # the table so far
    .venv/bin/python bench/ablation.py --list                                               # every row's changes

A row is `RECIPE:CHANGE`: a recipe (RECIPES, a set of GrowPreset values) with one change (ROWS: GrowPreset and
TrainConfig fields). Every row reuses the base run's teacher and latent cache, takes stage-08 (the decoder at
the teacher resolution) from the base run or retrains it (ROWS' third field), trains the rest, and scores each
stage it trained: FID/KID of n one-step samples (seeded by (seed, i)) against the Fashion-MNIST test split
(bench/quality.py's Scorer, the same reference for every row). Per row it also reads the stages' logs: wall
and CPU time, L_rec at the start and end, the last L_D and the held-out D margin. `RECIPE:unchanged` trains a
recipe as it is: pass `--base OUT/runs/RECIPE:unchanged` to the rows that reuse that recipe's stage-08. A row
is trained once (OUT/runs/<row>) and scored once (OUT/<row>.json): rerunning skips what exists. Time it alone
on the machine (it trains and runs Inception on the CPU). docs/ablations.md has every row's results.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from common import device, environment, print_table, read_json, write_results
from quality import Scorer, score_generator


from pagoda.decoder import load_generator
from pagoda.grow import GrowPreset, plan_stages
from pagoda.rundir import GENERATOR_FILE, METRICS_FILE, TIMING_FILE, RunDir
from pagoda.train import TrainConfig, train

# The first recipe: a multi-scale D from scratch, the random-feature distance `features`, 300 / 250 / 200 steps.
SCRATCH_D = GrowPreset(name="scratch_d", steps=(300, 250, 200), batch=(64, 64, 32), lr_G=2e-4, lr_D=2e-4,
                       lam=(0.2, 1.0), activate_from=3, fade_steps=(0, 60), ema=0.99, d_channels=32,
                       encode_images=2000, encode_steps=20, grow_optimizer="adam")
PROJECTED_D = dict(discriminator="projected", lr_D=2e-3, d_input=32)  # frozen Lite0 at 32 px, lr_D = 10 lr_G
# Each recipe as changes from SCRATCH_D, each adding to the one before; `demo` gives pagoda.grow.PRESETS["demo"]'s
# stages (plan_stages is equal).
RECIPES: dict[str, dict] = {"scratch_d": {}}
RECIPES["lite0"] = {**PROJECTED_D, "distance": "lite0", "steps": (400, 800, 600), "adv_start": (0, 450)}
RECIPES["lite0_pyramid"] = {**RECIPES["lite0"], "distance": "lite0+multiscale", "steps": (700, 800, 600)}
RECIPES["adam_anchor"] = {**RECIPES["lite0_pyramid"], "optimizer": "adam", "grow_distance": "lite0+4*multiscale",
                          "anchor": 4.0}
RECIPES["d_continued"] = {**RECIPES["adam_anchor"], "d_continue": True}
RECIPES["ema_split"] = {**RECIPES["d_continued"], "ema": 0.995, "grow_ema": 0.99}
RECIPES["growth_lr_G"] = {**RECIPES["ema_split"], "grow_lr_G": 4e-4}
RECIPES["demo"] = {**RECIPES["growth_lr_G"], "grow_width": "16", "steps": (700, 800, 1000)}  # docs/benchmarks.md §3b
GUIDED = dict(guidance_max=4.0, distill=3.0)  # TrainConfig: G(z, y, ω) for ω in [1, 4], L_dstl weight β = 3


def _rows(recipe: str, rows: dict[str, tuple[dict, dict, str]]) -> dict[str, tuple[dict, dict, str]]:
    """RECIPE:CHANGE -> (GrowPreset changes from SCRATCH_D, TrainConfig changes, stage-08 "base" | "train")."""
    return {f"{recipe}:{change}": ({**RECIPES[recipe], **preset}, cfg, first) for change, (preset, cfg, first) in rows.items()}


# Steps are (stage-08, stage-16, stage-32). "base": stage-08 is the base run's (a growth-stage row); "train": the row
# trains stage-08 as it says (or copies it from a row that trained it identically); `--stages 1` scores stage-08 only.
ROWS: dict[str, tuple[dict, dict, str]] = {f"{r}:unchanged": (c, {}, "train") for r, c in RECIPES.items()}
ROWS |= _rows("scratch_d", {
    "rec_only": (dict(lam=(0.2, 0.0)), {}, "base"),
    # the CPU s per stage of projected_d (1 thread: 69 → 252 s at 16 px, 90 → 238 s at 32 px)
    "rec_only_equal_cpu": (dict(lam=(0.2, 0.0), steps=(300, 900, 530)), {}, "base"),
    "projected_d": (PROJECTED_D, {}, "base"),
    "projected_d_no_aug": (PROJECTED_D, dict(augment=""), "base"),
    "projected_d_lite0": ({**PROJECTED_D, "distance": "lite0"}, {}, "base"),
    "projected_d_continued": ({**PROJECTED_D, "d_continue": True}, {}, "train"),
    "projected_d_input_64": ({**PROJECTED_D, "d_input": 64}, {}, "base"),
    "no_aug": ({}, dict(augment=""), "base"),
    "stage08_projected_d": (PROJECTED_D, {}, "train"),
    "stage08_projected_d_lite0": ({**PROJECTED_D, "distance": "lite0"}, {}, "train"),
    "stage08_projected_d_600_steps": ({**PROJECTED_D, "steps": (600, 250, 200)}, {}, "train"),
    "projected_d_lite0_500_400_steps": ({**PROJECTED_D, "distance": "lite0", "steps": (300, 500, 400)}, {}, "base"),
    # L_rec alone for about the CPU time of the row below (a `lite0` L_rec step ≈ 0.54 CPU s at 16 px, a GAN step ≈ 1)
    "rec_only_lite0_900_600_steps": (dict(lam=(0.2, 0.0), distance="lite0", steps=(300, 900, 600)), {}, "base"),
    "projected_d_lite0_rec_warmup_450": ({**PROJECTED_D, "distance": "lite0", "steps": (300, 800, 600),
                                          "adv_start": (0, 450)}, {}, "base"),
})
ROWS |= _rows("lite0", {
    "pyramid": (dict(distance="lite0+multiscale"), {}, "base"),
    "stage08_700_steps_pyramid": (dict(distance="lite0+multiscale", steps=(700, 800, 600)), {}, "train"),
    "pyramid_x4": (dict(distance="lite0+4*multiscale"), {}, "base"),
    "guided_adv_at_omega_1": ({}, dict(guidance_max=4.0, guided_adv=False), "train"),  # distill β = 1 (the default)
})
ROWS |= _rows("lite0_pyramid", {
    "distill_1": ({}, dict(distill=1.0), "train"),
    "stage08_1400_steps": (dict(steps=(1400, 800, 600)), {}, "train"),
    "pyramid_x4": (dict(distance="lite0+4*multiscale"), {}, "train"),
    "stage08_adam": (dict(optimizer="adam"), {}, "train"),
    "stage08_lr_G_4e-4": (dict(lr_G=4e-4), {}, "train"),
    "stage08_ema_0.995": (dict(ema=0.995), {}, "train"),
    "growth_pyramid_x4_anchor_4": (dict(grow_distance="lite0+4*multiscale", anchor=4.0), {}, "base"),
    "growth_pyramid_x4_anchor_16": (dict(grow_distance="lite0+4*multiscale", anchor=16.0), {}, "base"),
    "guided_distill_3": ({}, GUIDED, "train"),
})
ROWS |= _rows("adam_anchor", {
    "stage08_ema_0.995": (dict(ema=0.995), {}, "train"),
    "stage08_d_steps_2": (dict(d_steps_per_g=2), {}, "train"),
    "stage08_lam_0.5": (dict(lam=(0.5, 1.0)), {}, "train"),
    "growth_d_continued": (dict(d_continue=True), {}, "base"),
    "guided_distill_3": ({}, GUIDED, "train"),
})
ROWS |= _rows("d_continued", {
    "w_max_1": (dict(w_max=1.0), {}, "train"),
    "lr_D_6e-4": (dict(lr_D=6e-4), {}, "train"),
    "ema_0.995": (dict(ema=0.995), {}, "train"),
    "stage08_ema_0.995": (dict(ema=0.995, grow_ema=0.99), {}, "train"),  # = the recipe ema_split
    # a GAN step with the anchor costs 1.53x / 1.25x a rec-only step at 16 / 32 px: 450 + 350 x 1.53 ≈ 990, 450 + 150 x 1.25 ≈ 640
    "growth_rec_only_equal_cpu": (dict(lam=(0.2, 0.0), steps=(700, 990, 640)), {}, "base"),
    "guided_distill_3": ({}, GUIDED, "base"),  # --base OUT/runs/adam_anchor:guided_distill_3 (its stage-08)
})
# growth stages of ema_split (--base a run of it); rec-only rows: the 1-thread CPU s of its GAN growth stages
ROWS |= _rows("ema_split", {
    "growth_d_steps_2": (dict(d_steps_per_g=2), {}, "base"),
    "growth_lam_0.5": (dict(lam=(0.2, 0.5)), {}, "base"),
    "growth_lr_G_4e-4": (dict(grow_lr_G=4e-4), {}, "base"),  # = the recipe growth_lr_G
    "growth_lr_G_8e-4": (dict(grow_lr_G=8e-4), {}, "base"),
    "growth_rec_only_equal_cpu": (dict(lam=(0.2, 0.0), steps=(700, 1450, 800)), {}, "base"),
    "growth_rec_only_lr_G_4e-4_equal_cpu": (dict(grow_lr_G=4e-4, lam=(0.2, 0.0), steps=(700, 1450, 800)), {}, "base"),
    "growth_no_aug": ({}, dict(augment=""), "base"),
    # every stage: a continued D's heads are sized for the backbone's 32-px feature maps
    "d_input_64": (dict(d_input=64), {}, "train"),
    "guided_distill_3": ({}, GUIDED, "train"),
    "guided_distill_3_growth_lr_G_4e-4": (dict(grow_lr_G=4e-4), GUIDED, "base"),  # --base OUT/runs/ema_split:guided_distill_3
})

# the TrainConfig fields that change how stage-08 trains
KEY_FIELDS = ("augment", "seed", "distill", "guidance_max", "guided_adv")


def _stage08_key(run: RunDir) -> tuple | None:
    """What stage-08 of a finished run was trained with: (its StageConfig, the KEY_FIELDS of its TrainConfig)."""
    cfg = read_json(run.config)
    if not run.generator(8).is_file() or not cfg:
        return None
    return json.dumps(cfg["stages"][0], sort_keys=True), *(cfg["train"].get(f) for f in KEY_FIELDS)


def train_row(name: str, base: RunDir, out: Path, stages: int | None = None) -> RunDir:
    """OUT/runs/<name>: the base run's teacher and cache; stage-08 copied from the base run ("base" rows: a growth
    ablation) or from any run that trained it exactly as this row would (same stage config, augmentation, seed);
    then train() for the rest."""
    preset_changes, cfg_changes, first = ROWS[name]
    run = RunDir(out / "runs" / name)
    run.root.mkdir(parents=True, exist_ok=True)
    for sub in (base.teacher_dir, base.latents):
        if not (run.root / sub.name).exists():
            (run.root / sub.name).symlink_to(sub.resolve(), target_is_directory=True)
    cfg = TrainConfig(out=str(run.root), preset=replace(SCRATCH_D, name=f"ablation-{name}", **preset_changes),
                      max_stages=stages, **cfg_changes)
    stage08 = plan_stages(8, cfg.res, cfg.preset, cfg.discriminator, cfg.distance)[0]
    key = json.dumps(asdict(stage08), sort_keys=True), *(getattr(cfg, f) for f in KEY_FIELDS)
    if not run.stage(8).exists():
        trained = [RunDir(out / "runs" / r) for r, (_, _, f) in ROWS.items() if f == "train" and r != name]
        donor = base if first == "base" else next((r for r in trained if _stage08_key(r) == key), None)
        if donor is not None:
            shutil.copytree(donor.stage(8), run.stage(8))
    train(cfg, progress=False)
    return run


def stage_log(stage_dir: Path) -> dict:
    log = [json.loads(line) for line in (stage_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    q = max(1, len(log) // 10)
    probes = [r["margin"] for r in log if "margin" in r]
    timing = read_json(stage_dir / TIMING_FILE)
    return {"seconds": timing.get("seconds"), "cpu_seconds": timing.get("cpu_seconds"), "steps": len(log),
            "rec_start": statistics.mean(r["rec"] for r in log[:q]), "rec_end": statistics.mean(r["rec"] for r in log[-q:]),
            "d_end": statistics.mean(r["d"] for r in log[-q:]), "margin_end": probes[-1] if probes else None}


def score_row(name: str, run: RunDir, scorer: Scorer, n: int, seed: int, dev) -> dict:
    """FID/KID and log summary of every stage this row trained (a copied base stage-08 is not scored again)."""
    rows = {}
    for sdir in run.finished()[1 if ROWS[name][2] == "base" else 0:]:
        G = load_generator(sdir / GENERATOR_FILE, dev)
        rows[G.resolution] = {**score_generator(scorer, G, n, seed, dev), **stage_log(sdir)}
        print(f"{name} {sdir.name}: FID {rows[G.resolution]['fid']:.2f}", flush=True)
    preset_changes, cfg_changes, _ = ROWS[name]
    return {"row": name, "preset": preset_changes, "config": cfg_changes, "n": n, "seed": seed, "stages": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/demo", help="the run whose teacher, cache and stage-08 every row reuses")
    p.add_argument("--out", default="results/ablation")
    p.add_argument("--rows", nargs="*", default=[], choices=list(ROWS), metavar="RECIPE:CHANGE", help="rows to train and score")
    p.add_argument("--list", action="store_true", help="print every row and its changes, then stop")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-n", type=int, default=2000, help="test images in the FID reference (bench/quality.py's)")
    p.add_argument("--table", action="store_true", help="print the table of every scored row")
    p.add_argument("--train-only", action="store_true", help="train the rows, score nothing")
    p.add_argument("--stages", type=int, default=None, help="train (and score) only the first N stages of each row")
    a = p.parse_args()
    if a.list:
        for name, (preset_changes, cfg_changes, first) in ROWS.items():
            print(f"{name}  stage-08 {first}  {preset_changes} {cfg_changes}")
        return
    out, base, dev = Path(a.out), RunDir(a.base), device(a.device)
    scorer = Scorer(dev, ref_n=a.ref_n)
    for name in a.rows:
        result = out / f"{name}.json"
        if result.is_file():
            continue
        run = train_row(name, base, out, a.stages)
        if not a.train_only:
            write_results(out, name, {**score_row(name, run, scorer, a.n, a.seed, dev), "env": environment(dev),
                                      "ref_n": a.ref_n, "preset": asdict(replace(SCRATCH_D, **ROWS[name][0]))})
    rows = []
    for name in ROWS:
        r = read_json(out / f"{name}.json")
        for res, s in sorted(r.get("stages", {}).items(), key=lambda kv: int(kv[0])):
            sdir = RunDir(out / "runs" / name).stage(int(res))  # the log summary re-read (rows scored before it grew)
            rows.append({"row": name, **s, **(stage_log(sdir) if (sdir / TIMING_FILE).is_file() else {})})
    if a.table or a.rows:
        print_table(f"growth recipe ablation, n = {a.n}, vs the test split", rows,
                    [("row", "row", ""), ("resolution", "px", "d"), ("steps", "steps", "d"), ("seconds", "s", ".0f"), ("cpu_seconds", "CPU s", ".0f"),
                     ("fid", "FID", ".2f"), ("kid_x1e3", "KID×10³", ".2f"), ("rec_start", "L_rec first", ".4f"),
                     ("rec_end", "L_rec last", ".4f"), ("d_end", "L_D last", ".3f"), ("margin_end", "margin", ".3f")])


if __name__ == "__main__":
    main()
