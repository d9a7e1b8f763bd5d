"""Do the grown generators keep objects in place, and do they reconstruct better than up-sampling? (PSNR, no Inception)

    .venv/bin/python bench/fidelity.py --run runs/demo --out results/fidelity [--n 1000] [--images 500]

consistency  mean PSNR(↓G_R'(z), G_R(z)) over n fresh z ~ N(0, σ_max² I) (labels cycling 0..C−1), ↓ = the ADM
             down-sampling (2×2 means): the grown generator draws the same object as the base one
invert       Fashion-MNIST *test* images (never trained on): x_R = ↓x to the teacher resolution, z = E(x_R, y) with the
             teacher's PF-ODE (Heun, 40 Karras points, as `pagoda invert`; y = the true label), G_R'(z) vs the real x at
             R' (PSNR), beside bicubic up-sampling of x_R to R' (the baseline a super-resolver must beat)
Writes OUT/fidelity.json.
"""
from __future__ import annotations

import torch

from common import device, environment, load_run, parser, print_table, write_results
from pagoda.data import make_dataset
from pagoda.images import downsample, resample
from pagoda.encoder import Encoder, psnr
from pagoda.loop import step_generator


def main() -> None:
    p = parser(__doc__, "fidelity")
    p.add_argument("--n", type=int, default=1000, help="fresh z for the consistency rows")
    p.add_argument("--images", type=int, default=500, help="test images for the invert rows")
    p.add_argument("--steps", type=int, default=40, help="encoder Karras grid points (pagoda invert: 40)")
    a = p.parse_args()
    dev = device(a.device)
    teacher, gens = load_run(a.run, dev)
    R = teacher.resolution
    G_R, ncls = gens[R], teacher.unet.config.num_classes
    z = G_R.sigma_max * torch.randn(a.n, teacher.channels, R, R, generator=step_generator(0, 11))
    y = None if ncls is None else torch.arange(a.n) % ncls
    test = make_dataset("fashion-mnist", 32, split="test")
    x, yx = test.images[:a.images], test.labels[:a.images] if ncls else None
    enc = Encoder(teacher, R, steps=a.steps, sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max)
    zx = torch.cat([enc.encode(x[i:i + 100], None if yx is None else yx[i:i + 100]) for i in range(0, len(x), 100)])
    rows = []
    with torch.no_grad():
        base = torch.cat([G_R(z[i:i + 200], None if y is None else y[i:i + 200]) for i in range(0, a.n, 200)])
        for res, G in sorted(gens.items()):
            row = {"resolution": res}
            if res > R:
                out = torch.cat([G(z[i:i + 200], None if y is None else y[i:i + 200]) for i in range(0, a.n, 200)])
                row["consistency_psnr"] = psnr(downsample(out, R), base).mean().item()
            rec = torch.cat([G(zx[i:i + 200], None if yx is None else yx[i:i + 200]) for i in range(0, len(zx), 200)])
            real = downsample(x, res)
            row["invert_psnr"] = psnr(rec.clamp(-1, 1), real).mean().item()
            row["bicubic_psnr"] = psnr(resample(downsample(x, R), res), real).mean().item() if res > R else None
            rows.append(row)
            print(row, flush=True)
    print_table(f"fidelity of {a.run}: consistency over {a.n} z, invert over {a.images} test images", rows,
                [("resolution", "px", "d"), ("consistency_psnr", "PSNR(↓G(z), G_R(z)) dB", ".2f"),
                 ("invert_psnr", "invert PSNR dB", ".2f"), ("bicubic_psnr", "bicubic from R dB", ".2f")])
    write_results(a.out, "fidelity", {"run": a.run, "n": a.n, "images": a.images, "steps": a.steps,
                                      "env": environment(dev), "rows": rows})


if __name__ == "__main__":
    main()
