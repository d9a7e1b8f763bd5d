"""Sampling speed: the one-step generator at every grown resolution vs the teacher's PF-ODE samplers.

    .venv/bin/python bench/speed.py --run runs/demo --out results/speed            # CPU: OMP_NUM_THREADS sets threads
    .venv/bin/python bench/speed.py --run runs/demo --out results/speed-gpu --device cuda --batch 256

Same process, same device, same batch of z ~ N(0, σ_max² I) and labels: G(z, y) once per image at each
finished stage, vs the teacher at its base resolution with Euler / Heun / DPM-Solver++(2M) at each --nfe
(Heun takes only odd NFE, so its row uses the next odd one: the NFE column is the real count). Each row is
the best of --repeats timed batches after one warm-up batch. "× slower" = images/s of G at the teacher
resolution / images/s of the row. Writes OUT/speed.json and OUT/speed.png (images/s, log scale).
"""
from __future__ import annotations

import torch

from common import device, environment, figure, load_run, parser, print_table, time_call, write_results
from pagoda.solvers import METHODS
from pagoda.solvers import sample


def main() -> None:
    p = parser(__doc__, "speed")
    p.add_argument("--batch", type=int, default=64, help="images per call, the same for every row")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 35, 79], help="teacher NFE per image")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    dev = device(a.device)
    teacher, gens = load_run(a.run, dev)
    cfg = teacher.unet.config
    g = torch.Generator().manual_seed(a.seed)
    z = (teacher.sigma_max * torch.randn(a.batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)).to(dev)
    y = None if cfg.num_classes is None else (torch.arange(a.batch) % cfg.num_classes).to(dev)
    rows = []
    with torch.inference_mode():
        for res, G in sorted(gens.items()):  # one network call per image
            sec = time_call(lambda G=G: G(z, y), dev, a.repeats)
            rows.append({"sampler": f"G stage-{res:02d} (one step)", "resolution": res, "nfe": 1, "seconds_per_batch": sec})
        for method in a.methods:  # the teacher's PF-ODE from σ_max to 0 on a Karras grid
            for nfe in a.nfe:
                steps = (nfe + 2) // 2 if method == "heun" else nfe  # heun: 2·steps − 1 calls
                sec = time_call(lambda m=method, s=steps: sample(teacher, z, s, m, y, teacher.sigma_min, teacher.sigma_max), dev, a.repeats)
                real_nfe = 2 * steps - 1 if method == "heun" else steps
                rows.append({"sampler": f"teacher {method}", "resolution": cfg.resolution, "nfe": real_nfe,
                             "seconds_per_batch": sec})
    base = next(r for r in rows if r["resolution"] == cfg.resolution and r["nfe"] == 1)
    for r in rows:
        r["images_per_s"] = a.batch / r["seconds_per_batch"]
        r["ms_per_image"] = 1e3 * r["seconds_per_batch"] / a.batch
        r["times_slower_than_G"] = base["images_per_s"] / r["images_per_s"]
    print_table(f"Sampling speed, batch {a.batch}, {dev}", rows,
                [("sampler", "sampler", ""), ("resolution", "px", "d"), ("nfe", "NFE", "d"),
                 ("images_per_s", "images/s", ".1f"), ("ms_per_image", "ms/image", ".3f"),
                 ("times_slower_than_G", "× slower than G", ".1f")])
    fig = figure(figsize=(7, 0.3 * len(rows) + 1))
    ax = fig.subplots()
    labels = [f"{r['sampler']} {r['resolution']}px, {r['nfe']} NFE" for r in rows]
    ax.barh(labels[::-1], [r["images_per_s"] for r in rows][::-1], color=["C0" if r["nfe"] == 1 else "C1" for r in rows][::-1])
    ax.set(xscale="log", xlabel="images / s", title=f"sampling speed ({dev}, batch {a.batch})")
    write_results(a.out, "speed", {"run": a.run, "batch": a.batch, "env": environment(dev), "rows": rows}, fig)


if __name__ == "__main__":
    main()
