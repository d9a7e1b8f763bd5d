"""What growth costs, per width schedule: parameters and FLOPs per image of G at each resolution (no training).

    .venv/bin/python bench/growth_cost.py --out results/growth_cost                 # demo + ImageNet, every schedule
    .venv/bin/python bench/growth_cost.py --run runs/demo --out results/growth_cost # demo as that run built it
    .venv/bin/python bench/growth_cost.py --peak-tflops 312 --utilisation 0.5        # another GPU estimate

Two configurations: the Fashion-MNIST demo (teacher UNet `demo8` at 8 px, grown 8 → 16 → 32; with --run, the run's
own teacher config and stages) and ImageNet (the 295.9 M `imagenet64` ADM teacher, grown 64 → 128 → 256 → 512,
official `activate_from` 9), each under every width schedule of SCHEDULES (pagoda.grow.grow_widths; the ImageNet
`192,192,96` = `256/R` is the official code's table). Models are built on the meta device (no memory, no weights)
and one forward of batch 1 is counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions,
attention; FLOPs = 2 × multiply-adds; norms and activations are not counted). "trained" = parameters that train in
that stage (the freezing policy); "× G_R" = FLOPs / FLOPs of G at the teacher resolution; teacher rows: the same
network × NFE (one Heun PF-ODE sample). "est. img/s" is an ESTIMATE, not a measurement: peak × utilisation / FLOPs
(default: an H100's 989 dense bf16 TFLOP/s at 40 %). Writes OUT/growth_cost.json, .png.
"""
from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import environment, figure, parser, print_table, write_results
from pagoda.decoder import Generator
from pagoda.grow import StageConfig, plan_stages
from pagoda.rundir import RunDir
from pagoda.text import CONTEXT, TextEmbedding
from pagoda.unet import PRESETS, UNet, UNetConfig

CONFIGS = {"demo": ("demo8", 32, "demo"), "imagenet": ("imagenet64", 512, "imagenet64")}  # teacher, target, preset
SCHEDULES = {"demo": ("constant", "halve", "16/R", "16"), "imagenet": ("constant", "halve", "128/R", "192,192,96")}
TEACHER_NFE = (35, 79)  # Heun 35 (the demo's sampler), 79 (the ImageNet teacher's, EDM)


def flops_per_image(cfg: UNetConfig) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image) of the UNet, counted on the meta device; a text UNet with a full
    caption (CONTEXT tokens; the text encoder, run once per prompt, not counted)."""
    with torch.device("meta"):
        unet = UNet(cfg)
        x, t = torch.zeros(1, cfg.in_channels, cfg.resolution, cfg.resolution), torch.zeros(1)
        text = cfg.text_dim and TextEmbedding(torch.zeros(1, CONTEXT, cfg.text_dim), torch.ones(1, CONTEXT, dtype=torch.bool),
                                              torch.zeros(1, cfg.text_dim))
        with FlopCounterMode(display=False) as counter:
            unet(x, t, None, text=text or None)  # a class embedding is a lookup: no FLOPs either way
    return sum(p.numel() for p in unet.parameters()), counter.get_total_flops()


def trained_params(cfg: UNetConfig, activate_from: int | None) -> int:
    """Parameters that train under Generator.set_trainable(activate_from) (None: every parameter)."""
    with torch.device("meta"):
        G = Generator(UNet(cfg))
    G.set_trainable(activate_from)
    return sum(p.numel() for p in G.parameters() if p.requires_grad)


def rows_for(name: str, schedule: str, teacher: UNetConfig, stages: list[StageConfig]) -> list[dict]:
    """One row per stage (G at its resolution, grown as the stages say)."""
    rows, cfg = [], teacher
    for st in stages:
        if st.grow:
            cfg = cfg.grown(st.grow_channels)
        params, fl = flops_per_image(cfg)
        rows.append({"config": name, "schedule": schedule, "model": f"G {st.name}", "resolution": cfg.output_resolution,
                     "widths": ",".join(map(str, cfg.grow_channels)) or "–", "nfe": 1, "params_M": params / 1e6,
                     "trained_M": trained_params(cfg, st.activate_from) / 1e6, "gflops": fl / 1e9})
    return rows


def teacher_rows(name: str, teacher: UNetConfig) -> list[dict]:
    params, fl = flops_per_image(teacher)
    return [{"config": name, "schedule": "–", "model": f"teacher heun {nfe} NFE", "resolution": teacher.resolution,
             "widths": "–", "nfe": nfe, "params_M": params / 1e6, "trained_M": None, "gflops": nfe * fl / 1e9}
            for nfe in TEACHER_NFE]


def main() -> None:
    p = parser(__doc__, "growth_cost", run=False)
    p.add_argument("--run", default=None, help="take the demo rows from this run's config.json instead of the presets")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for the estimate (H100 SXM dense bf16)")
    p.add_argument("--utilisation", type=float, default=0.4, help="fraction of the peak the estimate assumes")
    a = p.parse_args()
    rows = []
    for name, (unet, target, preset) in CONFIGS.items():
        teacher, runs = PRESETS[unet], []
        for schedule in SCHEDULES[name]:
            runs.append((schedule, plan_stages(teacher.resolution, target, preset, width=schedule,
                                               top_width=teacher.top_width)))
        if name == "demo" and a.run:
            cfg = json.loads(RunDir(a.run).config.read_text())
            name, teacher = f"run {a.run}", UNetConfig.from_dict(cfg["teacher"])
            runs = [("run", [StageConfig.from_dict(d) for d in cfg["stages"]])]
        group = [r for schedule, stages in runs for r in rows_for(name, schedule, teacher, stages)]
        group += teacher_rows(name, teacher)
        base = group[0]["gflops"]  # G at the teacher resolution (the same under every schedule)
        for r in group:
            r["x_base"] = r["gflops"] / base
            r["est_img_s"] = a.peak_tflops * 1e12 * a.utilisation / (r["gflops"] * 1e9)
        rows += group
    cols = [("schedule", "schedule", ""), ("model", "model", ""), ("resolution", "px", "d"), ("widths", "grown widths", ""),
            ("params_M", "params (M)", ".3f"), ("trained_M", "trained (M)", ".3f"), ("gflops", "GFLOP/image", ".4g"),
            ("x_base", "× G_R", ".2f")]
    est = f"est. img/s ({a.peak_tflops:g} TFLOP/s × {a.utilisation:.0%})"
    for name in dict.fromkeys(r["config"] for r in rows):
        group = [r for r in rows if r["config"] == name]
        gpu = name == "imagenet"
        print_table(f"{name}: generator cost per image (batch 1, meta device)" + (", GPU img/s ESTIMATED" if gpu else ""),
                    group, cols + ([("est_img_s", est, ",.0f")] if gpu else []))
    fig = figure(figsize=(9, 3.5))
    for ax, key, label in zip(fig.subplots(1, 2), ("gflops", "params_M"), ("GFLOP per image", "parameters (M)")):
        for name, schedule in dict.fromkeys((r["config"], r["schedule"]) for r in rows if r["nfe"] == 1):
            g = [r for r in rows if (r["config"], r["schedule"], r["nfe"]) == (name, schedule, 1)]
            ax.plot([r["resolution"] for r in g], [r[key] for r in g], "o-", label=f"{name}, {schedule}")
        ax.set(xscale="log", yscale="log", xlabel="output resolution (px)", ylabel=label)
        ax.legend(fontsize=7)
    estimate = {"peak_tflops": a.peak_tflops, "utilisation": a.utilisation, "note": "img/s estimated from FLOPs"}
    write_results(a.out, "growth_cost", {"env": environment(torch.device("cpu")), "gpu_estimate": estimate,
                                         "rows": rows}, fig)


if __name__ == "__main__":
    main()
