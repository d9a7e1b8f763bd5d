"""The growth recipe, one change at a time: retrain the growth stages of a run with a variant, score FID/KID.

    .venv/bin/python bench/ablation.py --base runs/demo --out results/ablation --rows baseline projected rec-only
    .venv/bin/python bench/ablation.py --base runs/demo --out results/ablation --table      # the table so far

Every row reuses the base run's teacher, latent cache and (unless the row retrains it) stage-08, trains the
growth stages 16 and 32 with its variant of the demo preset (pagoda.grow.GrowPreset fields and TrainConfig
fields, see ROWS), and scores each stage it trained: FID/KID of n one-step samples (seeded by (seed, i)) against
the Fashion-MNIST test split (bench/quality.py's Scorer, the same reference for every row). Per row it also
reads the stages' logs: wall time, L_rec at the start and end, the last L_D and the held-out D margin. A row is
trained once (OUT/runs/<row>) and scored once (OUT/<row>.json): rerunning skips what exists.
Time it alone on the machine (it trains and runs Inception on the CPU).
"""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from common import device, environment, print_table, read_json, write_results
from quality import Scorer, score_generator

import argparse

from pagoda.decoder import load_generator
from pagoda.grow import GrowPreset, plan_stages
from pagoda.rundir import GENERATOR_FILE, METRICS_FILE, TIMING_FILE, RunDir
from pagoda.train import TrainConfig, train

# The demo preset before this study (2026-11, pagoda/grow.py history): every row is a change from it.
BASE = GrowPreset(name="demo-before", steps=(300, 250, 200), batch=(64, 64, 32), lr_G=2e-4, lr_D=2e-4, lam=(0.2, 1.0),
                  activate_from=3, fade_steps=(0, 60), ema=0.99, d_channels=32, encode_images=2000, encode_steps=20,
                  grow_optimizer="adam")
# The demo preset of the first study (d6f0f4e: Lite0 distance, stage-08 400 steps) as changes from BASE; rows "demo: …"
# start there and are run with --base runs/demo-lite0 (a default run of that preset, whose stage-08 is the "base" one).
DEMO = dict(steps=(400, 800, 600), lr_D=2e-3, distance="lite0", adv_start=(0, 450), discriminator="projected", d_input=32)
# The second default (fbf4760: Lite0 + pixel pyramid, stage-08 700 steps) as changes from BASE; rows "ms: …" start
# there and are run with --base runs/demo-ms (a default run of it).
MS = {**DEMO, "distance": "lite0+multiscale", "steps": (700, 800, 600)}
# The fourth default (Adam in every stage; growth stages: 4× pyramid + anchor 4, a fresh D each) as changes from BASE:
# rows "adam: …" (run with --base runs/demo-adam, a default run of it; today's default adds "adam: D continues").
ADAM = {**MS, "optimizer": "adam", "grow_distance": "lite0+4*multiscale", "anchor": 4.0}
# The fifth default (runs/demo: + D continuity; rows "default: …", run with --base runs/demo). Today's `demo`
# preset adds EMA 0.995 in stage-08 (the row "default: stage-08 EMA 0.995").
DEFAULT = {**ADAM, "d_continue": True}
# Today's `demo` preset (5fcf838: EMA 0.995 in stage-08, 0.99 in the growth stages); rows "today: …", run with --base
# runs/demo5 (`pagoda train` of it).
TODAY = {**DEFAULT, "ema": 0.995, "grow_ema": 0.99}
PROJ = dict(discriminator="projected", lr_D=2e-3, d_input=32)  # projected D, lr_D 10x lr_G, backbone input 32 px
# name -> (GrowPreset changes, TrainConfig changes, stage-08: "base" = the base run's, "train" = as the row says).
# Steps are (stage-08, stage-16, stage-32).
ROWS: dict[str, tuple[dict, dict, str]] = {
    "rec-only": (dict(lam=(0.2, 0.0)), {}, "base"),
    # as many CPU-seconds per stage as "projected" took (1 thread: 69 -> 252 s at 16 px, 90 -> 238 s at 32 px)
    "rec-only, equal CPU time": (dict(lam=(0.2, 0.0), steps=(300, 900, 530)), {}, "base"),
    "projected": (PROJ, {}, "base"),
    "projected, no aug": (PROJ, dict(augment=""), "base"),
    "projected, lite0 distance": ({**PROJ, "distance": "lite0"}, {}, "base"),
    "projected, D continues": ({**PROJ, "d_continue": True}, {}, "train"),
    "multiscale, no aug": ({}, dict(augment=""), "base"),
    "projected, 64 px": ({**PROJ, "d_input": 64}, {}, "base"),
    # stage-08 (the decoder at the teacher resolution) rows: train it as the row says
    "stage-08: projected": (PROJ, {}, "train"),
    "stage-08: projected, lite0 distance": ({**PROJ, "distance": "lite0"}, {}, "train"),
    "stage-08: projected, 600 steps": ({**PROJ, "steps": (600, 250, 200)}, {}, "train"),
    "projected, lite0 distance, 2x steps": ({**PROJ, "distance": "lite0", "steps": (300, 500, 400)}, {}, "base"),
    # L_rec alone for about the CPU time of the row below (a Lite0-distance step costs ≈ 0.54 CPU s at 16 px,
    # ≈ 2x a `features` step; a GAN step ≈ 1 CPU s)
    "rec-only, lite0 distance, 900-600 steps": (dict(lam=(0.2, 0.0), distance="lite0", steps=(300, 900, 600)), {}, "base"),
    # L_rec alone for the first 450 steps of each growth stage (cheap), then the GAN term: 350 / 150 GAN steps
    "projected, lite0 distance, rec warm-up 450": ({**PROJ, "distance": "lite0", "steps": (300, 800, 600),
                                                    "adv_start": (0, 450)}, {}, "base"),
    # from DEMO (the first Lite0 default): a pixel pyramid beside the Lite0 features (objects stay in place:
    # consistency and inversion PSNR), and a longer stage-08 (G8 vs the teacher's FID)
    "demo: lite0+multiscale distance": ({**DEMO, "distance": "lite0+multiscale"}, {}, "base"),
    "demo: stage-08 700 steps, lite0+multiscale": ({**DEMO, "distance": "lite0+multiscale", "steps": (700, 800, 600)},
                                                  {}, "train"),
    "demo: lite0+4*multiscale distance": ({**DEMO, "distance": "lite0+4*multiscale"}, {}, "base"),
    # from MS: G8 against the teacher (the distillation term toward its Heun-35 samples; a heavier pixel term)
    "ms: distill β=1": (MS, dict(distill=1.0), "train"),
    "ms: stage-08 1400 steps": ({**MS, "steps": (1400, 800, 600)}, {}, "train"),
    "ms: lite0+4*multiscale distance": ({**MS, "distance": "lite0+4*multiscale"}, {}, "train"),
    # stage-08 (train with --stages 1) from MS, one knob at a time: the optimizer, lr_G, EMA (G8 vs the teacher)
    "ms: stage-08 Adam": ({**MS, "optimizer": "adam"}, {}, "train"),
    "ms: stage-08 lr_G 4e-4": ({**MS, "lr_G": 4e-4}, {}, "train"),
    "ms: stage-08 EMA 0.995": ({**MS, "ema": 0.995}, {}, "train"),
    # stage-08 from ADAM (the fourth default's stage-08): EMA, lr_D, λ and the adaptive-weight clip, D steps per G step
    "adam: stage-08 EMA 0.995": ({**ADAM, "ema": 0.995}, {}, "train"),
    "adam: stage-08 d_steps 2": ({**ADAM, "d_steps_per_g": 2}, {}, "train"),
    "adam: stage-08 λ 0.5": ({**ADAM, "lam": (0.5, 1.0)}, {}, "train"),
    # growth stages from the default's stage-08: each growth stage continues the previous stage's D (grown)
    "adam: D continues": ({**ADAM, "d_continue": True}, {}, "base"),
    # from DEFAULT (today's default; run with --base runs/demo), every stage: the adaptive-weight clip, lr_D, and EMA
    # 0.995 (its stage-08 is the row "adam: stage-08 EMA 0.995"'s)
    "default: w_max 1": ({**DEFAULT, "w_max": 1.0}, {}, "train"),
    "default: lr_D 6e-4": ({**DEFAULT, "lr_D": 6e-4}, {}, "train"),
    "default: EMA 0.995": ({**DEFAULT, "ema": 0.995}, {}, "train"),
    # EMA 0.995 in stage-08 only (the row above: G8 gains, G16 / G32 lose)
    "default: stage-08 EMA 0.995": ({**DEFAULT, "ema": 0.995, "grow_ema": 0.99}, {}, "train"),
    # growth stages of runs/demo with L_rec alone for the CPU time of the default's (a GAN step with the anchor costs
    # 1.53x / 1.25x a rec-only step at 16 / 32 px in runs/demo's logs: 450 + 350 x 1.53 ≈ 990, 450 + 150 x 1.25 ≈ 640)
    "default: rec-only, equal CPU time": ({**DEFAULT, "lam": (0.2, 0.0), "steps": (700, 990, 640)}, {}, "base"),
    # growth stages of runs/demo5 (today's preset): two D steps per G step, and λ 0.5 (the D that was at chance in the
    # growth stages of the first recipe: does it need more steps or less adversarial weight now?)
    "today: growth d_steps 2": ({**TODAY, "d_steps_per_g": 2}, {}, "base"),
    "today: growth λ 0.5": ({**TODAY, "lam": (0.2, 0.5)}, {}, "base"),
    # L_rec alone for the CPU time of today's GAN growth stages (1 thread: GAN rows 433-525 / 269-340 CPU s at 16 / 32 px;
    # the row "default: rec-only, equal CPU time" took 0.33 / 0.37 CPU s a step): the GAN's margin at equal cost
    "today: rec-only, equal CPU time": ({**TODAY, "lam": (0.2, 0.0), "steps": (700, 1450, 800)}, {}, "base"),
    # growth stages: lr_G 4e-4 (measured in stage-08 only before), and no DiffAugment on D's inputs
    "today: growth lr_G 4e-4": ({**TODAY, "lr_G": 4e-4}, {}, "base"),  # = the `demo` preset since (grow_lr_G 4e-4)
    "today: growth lr_G 8e-4": ({**TODAY, "lr_G": 8e-4}, {}, "base"),
    # the `demo` preset since (growth lr_G 4e-4): L_rec alone for the CPU time of its GAN growth stages, at that lr
    "today: rec-only at lr_G 4e-4, equal CPU time": ({**TODAY, "lr_G": 4e-4, "lam": (0.2, 0.0), "steps": (700, 1450, 800)},
                                                     {}, "base"),
    "today: growth no aug": (TODAY, dict(augment=""), "base"),
    # the frozen backbone's input at 64 px instead of 32 (the projected D and the lite0 distance; ≈ 2x a step's cost),
    # every stage: a growth stage continues stage-08's D, whose heads are sized for the backbone's 32-px feature maps
    "today: d_input 64": ({**TODAY, "d_input": 64}, {}, "train"),
    # growth stages only (stage-08 of the base run): the heavier pixel term, + the anchor d(↓G(z'), G_8(z')) on the
    # adversarial fakes (consistency at 32 px)
    "ms: growth lite0+4*multiscale, anchor 4": ({**MS, "grow_distance": "lite0+4*multiscale", "anchor": 4.0}, {}, "base"),
    "ms: growth lite0+4*multiscale, anchor 16": ({**MS, "grow_distance": "lite0+4*multiscale", "anchor": 16.0}, {},
                                                  "base"),
    # the ω-conditioned G of runs/guided (DEMO + --guidance-max 4; score the ω table with bench/guidance.py)
    "guided: adversarial at ω' = 1": (DEMO, dict(guidance_max=4.0, guided_adv=False), "train"),
    # G(z, y, ω) barely moves with ω (mean |G(ω=4) − G(ω=1)| 0.021 vs the teacher's 0.17): a stronger, pixel-anchored
    # distillation (the second default's lite0+multiscale distance and 700 steps, β = 3)
    "guided: ms preset, β = 3": (MS, dict(guidance_max=4.0, distill=3.0), "train"),
    # the same from the fourth default (Adam; 4× pyramid + anchor 4 in the growth stages): the ω table at 8 / 16 / 32 px
    "guided: adam preset, β = 3": (ADAM, dict(guidance_max=4.0, distill=3.0), "train"),
    # growth stages of today's default from that row's stage-08 (--base it): L_dstl in stage-08 only, the anchor
    # holding every ω on the guided stage-08 G in the growth stages (pagoda/stage.py)
    "guided: default, L_dstl in stage-08 only": (DEFAULT, dict(guidance_max=4.0, distill=3.0), "base"),
    # `pagoda train --guidance-max 4` of today's preset (stage-08 EMA 0.995: G8 10.6 -> 8.9 unguided), every stage
    "guided: today's preset": (TODAY, dict(guidance_max=4.0, distill=3.0), "train"),
    # its growth stages at lr_G 4e-4 (the `demo` preset since; --base "OUT/runs/guided: today's preset")
    "guided: growth lr_G 4e-4": ({**TODAY, "lr_G": 4e-4}, dict(guidance_max=4.0, distill=3.0), "base"),
}


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
    cfg = TrainConfig(out=str(run.root), preset=replace(BASE, name=f"ablation-{name}", **preset_changes),
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
    p.add_argument("--rows", nargs="*", default=[], choices=list(ROWS))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ref-n", type=int, default=2000, help="test images in the FID reference (bench/quality.py's)")
    p.add_argument("--table", action="store_true", help="print the table of every scored row")
    p.add_argument("--train-only", action="store_true", help="train the rows, score nothing")
    p.add_argument("--stages", type=int, default=None, help="train (and score) only the first N stages of each row")
    a = p.parse_args()
    out, base, dev = Path(a.out), RunDir(a.base), device(a.device)
    scorer = Scorer(dev, ref_n=a.ref_n)
    for name in a.rows:
        result = out / f"{name}.json"
        if result.is_file():
            continue
        run = train_row(name, base, out, a.stages)
        if not a.train_only:
            write_results(out, name, {**score_row(name, run, scorer, a.n, a.seed, dev), "env": environment(dev),
                                      "ref_n": a.ref_n, "preset": asdict(replace(BASE, **ROWS[name][0]))})
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
