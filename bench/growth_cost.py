"""What growth costs: parameters and FLOPs per image of the generator at each resolution (no training).

    .venv/bin/python bench/growth_cost.py --out results/growth_cost                 # demo preset + ImageNet
    .venv/bin/python bench/growth_cost.py --run runs/demo --out results/growth_cost # demo as that run built it

Two configurations: the Fashion-MNIST demo (teacher UNet `demo8` at 8 px, grown 8 → 16 → 32; with --run,
the run's own teacher config and stages) and ImageNet (the 295.9 M `imagenet64` ADM teacher, grown
64 → 128 → 256 → 512 with 192-channel doublings, official `activate_from` 9). Models are built on the meta
device (no memory, no weights) and one forward of batch 1 is counted by torch.utils.flop_counter.FlopCounterMode
(matmuls, convolutions, attention; FLOPs = 2 × multiply-adds; norms and activations are not counted).
"trained" = parameters that train in that stage (the freezing policy); "× G_R" = FLOPs / FLOPs of G at the
teacher resolution. Teacher rows: the same network × NFE (one PF-ODE sample). Writes OUT/growth_cost.json, .png.
"""
from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import environment, figure, parser, print_table, write_results
from pagoda.decoder import Generator
from pagoda.grow import StageConfig, plan_stages
from pagoda.rundir import RunDir
from pagoda.unet import PRESETS, UNet, UNetConfig

CONFIGS = {"demo": ("demo8", 32, "demo"), "imagenet": ("imagenet64", 512, "imagenet64")}  # teacher, target, preset


def flops_per_image(cfg: UNetConfig) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image) of the UNet, counted on the meta device."""
    with torch.device("meta"):
        unet = UNet(cfg)
        x, t = torch.zeros(1, cfg.in_channels, cfg.resolution, cfg.resolution), torch.zeros(1)
        with FlopCounterMode(display=False) as counter:
            unet(x, t, None)  # a class embedding is a lookup: no FLOPs either way
    return sum(p.numel() for p in unet.parameters()), counter.get_total_flops()


def trained_params(cfg: UNetConfig, activate_from: int | None) -> int:
    """Parameters that train under Generator.set_trainable(activate_from) (None: every parameter)."""
    with torch.device("meta"):
        G = Generator(UNet(cfg))
    G.set_trainable(activate_from)
    return sum(p.numel() for p in G.parameters() if p.requires_grad)


def rows_for(name: str, teacher: UNetConfig, stages) -> list[dict]:
    """One row per stage (G at its resolution), then teacher sampling at 35 and 79 NFE."""
    rows, cfg = [], teacher
    for i, st in enumerate(stages):
        if st.grow:
            cfg = cfg.grown(st.grow_channels)
        params, fl = flops_per_image(cfg)
        rows.append({"config": name, "model": f"G {st.name}", "resolution": cfg.output_resolution, "nfe": 1,
                     "params_M": params / 1e6, "trained_M": trained_params(cfg, st.activate_from) / 1e6, "gflops": fl / 1e9})
    params, fl = flops_per_image(teacher)
    for nfe in (35, 79):
        rows.append({"config": name, "model": f"teacher heun {nfe} NFE", "resolution": teacher.resolution, "nfe": nfe,
                     "params_M": params / 1e6, "trained_M": None, "gflops": nfe * fl / 1e9})
    base = rows[0]["gflops"]
    for r in rows:
        r["x_base"] = r["gflops"] / base
    return rows


def main() -> None:
    p = parser(__doc__, "growth_cost", run=False)
    p.add_argument("--run", default=None, help="take the demo rows from this run's config.json instead of the presets")
    a = p.parse_args()
    rows = []
    for name, (unet, target, preset) in CONFIGS.items():
        teacher, stages = PRESETS[unet], plan_stages(PRESETS[unet].resolution, target, preset)
        if name == "demo" and a.run:
            cfg = json.loads(RunDir(a.run).config.read_text())
            stages = [StageConfig.from_dict(d) for d in cfg["stages"]]
            name, teacher = f"run {a.run}", UNetConfig.from_dict(cfg["teacher"])
        rows += rows_for(name, teacher, stages)
    print_table("Generator cost per image (batch 1, meta device)", rows,
                [("config", "config", ""), ("model", "model", ""), ("resolution", "px", "d"), ("params_M", "params (M)", ".3f"),
                 ("trained_M", "trained (M)", ".3f"), ("gflops", "GFLOP/image", ".4g"), ("x_base", "× G_R", ".2f")])
    fig = figure(figsize=(9, 3.5))
    for ax, key, label in zip(fig.subplots(1, 2), ("gflops", "params_M"), ("GFLOP per image", "parameters (M)")):
        for name in dict.fromkeys(r["config"] for r in rows):
            g = [r for r in rows if r["config"] == name and r["nfe"] == 1]
            ax.plot([r["resolution"] for r in g], [r[key] for r in g], "o-", label=f"G, {name}")
        ax.set(xscale="log", yscale="log", xlabel="output resolution (px)", ylabel=label)
        ax.legend(fontsize=8)
    write_results(a.out, "growth_cost", {"env": environment(torch.device("cpu")), "rows": rows}, fig)


if __name__ == "__main__":
    main()
