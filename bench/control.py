"""Inverse problems on held-out images: super-resolution, reconstruction and inpainting PSNR beside their baselines.

    .venv/bin/python bench/control.py --run runs/demo --out results/control [--n 100]

On the first n Fashion-MNIST *test* images at G's resolution (the encoder: Heun, 40 Karras points, as the commands):
  superres   x_R = ↓x to the teacher resolution, rounded to 8 bits (a low-res PNG), encoded once, one G call; vs bicubic
  invert     the same from the full-resolution image (`pagoda invert`); class = the best-reconstructing one (as the
             commands) and, for reference, the true class
  inpaint    masks: a centre square (1/4 of the side from each border) and random 1/8-side cells (p = 0.5); PSNR over
             the hole only; `pagoda inpaint` (latent optimisation through G, pagoda.control.inpaint_images) vs the
             blur fill it starts from (pagoda.control.blur_fill); known pixels are kept exactly (checked)
Mean PSNR ± its standard error. Writes OUT/control.json.
"""
from __future__ import annotations

import time

import torch

from common import device, environment, parser, print_table, write_results
from pagoda.control import blur_fill, hole_psnr, inpaint_images
from pagoda.data import make_dataset
from pagoda.images import downsample, resample
from pagoda.encoder import Encoder, psnr
from pagoda.inference import encode_images, load_models


def masks(kind: str, n: int, res: int) -> torch.Tensor:
    """1 = known pixel: a centre hole of half the side, or random 1/8-side cells."""
    m = torch.ones(n, 1, res, res)
    if kind == "centre":
        q = res // 4
        m[..., q:res - q, q:res - q] = 0
        return m
    cells = (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    return cells.repeat_interleave(res // 8, -2).repeat_interleave(res // 8, -1)


def main() -> None:
    p = parser(__doc__, "control")
    p.add_argument("--n", type=int, default=100)
    a = p.parse_args()
    dev = device(a.device)
    G, D = load_models(a.run)
    test = make_dataset("fashion-mnist", G.resolution, split="test")
    x, y_true = test.images[:a.n], test.labels[:a.n]
    R, rows = D.resolution, []

    def row(task: str, method: str, v: torch.Tensor, seconds: float | None = None) -> None:
        rows.append({"task": task, "method": method, "psnr": v.mean().item(), "sem": (v.std() / len(v) ** 0.5).item(),
                     "seconds_per_image": seconds})
        print(rows[-1], flush=True)

    with torch.no_grad():
        x_lo = downsample(x, R)
        png = ((x_lo.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the low-resolution image as an 8-bit PNG
        for task, source in (("superres", png), ("invert", x)):
            t = time.perf_counter()
            z, y = encode_images(G, D, source)
            row(task, "G, best class", psnr(G(z, y).clamp(-1, 1), x), (time.perf_counter() - t) / a.n)
            z = Encoder(D, R, steps=40, sigma_min=D.sigma_min, sigma_max=D.sigma_max).encode(downsample(source, R), y_true)
            row(task, "G, true class", psnr(G(z, y_true).clamp(-1, 1), x))
            row(task, "bicubic", psnr(resample(png if task == "superres" else x_lo, G.resolution), x))
    for kind in ("centre", "random"):
        m = masks(kind, a.n, G.resolution)
        row(f"inpaint {kind}", "blur fill", hole_psnr(blur_fill(x, m), x, m))
        t = time.perf_counter()
        out, _ = inpaint_images(G, D, x, m)
        if not torch.equal(out * m, x * m):
            raise SystemExit("error: inpainting changed a known pixel")
        row(f"inpaint {kind}", "pagoda inpaint", hole_psnr(out, x, m), (time.perf_counter() - t) / a.n)
    print_table(f"inverse problems on {a.n} test images, {a.run} ({G.resolution} px)", rows,
                [("task", "task", ""), ("method", "method", ""), ("psnr", "PSNR dB", ".2f"), ("sem", "±", ".2f"),
                 ("seconds_per_image", "s/image", ".3f")])
    write_results(a.out, "control", {"run": a.run, "n": a.n, "env": environment(dev), "rows": rows})


if __name__ == "__main__":
    main()
