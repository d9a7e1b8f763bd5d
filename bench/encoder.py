"""The frozen encoder: round-trip PSNR and speed vs grid size, and how Gaussian its latents z are.

    .venv/bin/python bench/encoder.py --run runs/demo --out results/encoder [--n 500] [--steps 10 20 40]

Held-out Fashion-MNIST *test* images (never seen by the teacher), ADM-downsampled to the teacher resolution R,
are encoded with the run's teacher (PF-ODE σ_min = 0.002 → σ_max = 80 on a Karras grid of `steps` points,
true labels, denoiser clamped: pagoda.encoder.Encoder) and decoded back along the same grid. Per grid size:
round-trip PSNR (dB, data range [−1, 1]), encode images/s, and latent statistics of z/σ_max: mean, std, excess
kurtosis, mean |correlation| between pixel pairs, correlation of horizontal neighbours, and corr(z, x) (how
much of the image z still shows). The row "N(0, 1) reference" holds the same statistics of as many true
Gaussian samples: the sampling noise that a Gaussian-like z is within. Writes OUT/encoder.json and .png.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from common import device, environment, figure, load_run, parser, print_table, sync, write_results
from pagoda.data import make_dataset
from pagoda.images import downsample
from pagoda.encoder import Encoder, psnr


def latent_stats(z: np.ndarray, x: np.ndarray | None) -> dict:
    """Gaussianity of z (n, C, R, R) in σ_max units; x: the encoded images (n, C, R, R) or None."""
    flat = z.reshape(len(z), -1)
    corr = np.corrcoef(flat, rowvar=False)
    off = np.abs(corr[~np.eye(len(corr), dtype=bool)])
    c = (flat - flat.mean()) / flat.std()
    nb = [np.corrcoef(z[..., :, j].ravel(), z[..., :, j + 1].ravel())[0, 1] for j in range(z.shape[-1] - 1)]
    zx = None if x is None else float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(z, x)]))
    return {"mean": float(flat.mean()), "std": float(flat.std()), "excess_kurtosis": float((c**4).mean() - 3),
            "mean_abs_pixel_corr": float(off.mean()), "max_abs_pixel_corr": float(off.max()),
            "neighbour_corr": float(np.mean(nb)), "corr_z_x": zx}


def main() -> None:
    p = parser(__doc__, "encoder")
    p.add_argument("--n", type=int, default=500, help="test images")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40], help="Karras grid points (paper: 40)")
    p.add_argument("--method", default="heun")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    dev = device(a.device)
    teacher, _ = load_run(a.run, dev)
    R = teacher.unet.config.resolution
    data = make_dataset("fashion-mnist", 32, split="test")
    idx = torch.from_numpy(np.random.default_rng(a.seed).permutation(len(data))[:a.n])
    x = downsample(data.images[idx], R)  # the encoder's input: ADM-downsampled to the teacher resolution
    y = data.labels[idx] if teacher.unet.config.num_classes else None
    rows, latents = [], {}
    for steps in a.steps:
        enc = Encoder(teacher, R, steps=steps, method=a.method)
        zs, recs, t_enc, t_dec = [], [], 0.0, 0.0
        for i in range(0, a.n, a.batch):
            xb, yb = x[i:i + a.batch].to(dev), None if y is None else y[i:i + a.batch].to(dev)
            sync(dev)
            t0 = time.perf_counter()
            z = enc.encode(xb, yb)  # data → latent (σ_min → σ_max)
            sync(dev)
            t1 = time.perf_counter()
            recs.append(enc.decode(z, yb).cpu())  # latent → data along the same grid backward
            sync(dev)
            t_enc, t_dec = t_enc + t1 - t0, t_dec + time.perf_counter() - t1
            zs.append(z.cpu())
        z = torch.cat(zs)
        latents[steps] = z
        p_db = psnr(torch.cat(recs), x)
        rows.append({"row": f"{a.method}, {steps} points", "steps": steps, "nfe": enc.nfe, "psnr_db": float(p_db.mean()),
                     "psnr_min_db": float(p_db.min()), "encode_images_per_s": a.n / t_enc, "decode_images_per_s": a.n / t_dec,
                     **latent_stats((z / enc.sigma_max).numpy(), x.numpy())})
    gauss = torch.randn(z.shape, generator=torch.Generator().manual_seed(a.seed)).numpy()
    rows.append({"row": "N(0, 1) reference", **latent_stats(gauss, x.numpy())})
    print_table(f"Encoder round trip and latents, {a.n} Fashion-MNIST test images at {R}px ({dev})", rows,
                [("row", "grid", ""), ("nfe", "NFE", "d"), ("psnr_db", "PSNR dB", ".2f"), ("psnr_min_db", "min", ".2f"),
                 ("encode_images_per_s", "enc img/s", ".1f"), ("mean", "mean z/σ", "+.3f"), ("std", "std z/σ", ".3f"),
                 ("excess_kurtosis", "kurt", "+.2f"), ("mean_abs_pixel_corr", "|corr|", ".3f"),
                 ("neighbour_corr", "nbr corr", "+.3f"), ("corr_z_x", "corr(z,x)", "+.3f")])
    fig = figure(figsize=(13, 3.4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    enc_rows = rows[:-1]
    ax1.plot([r["nfe"] for r in enc_rows], [r["psnr_db"] for r in enc_rows], "o-")
    ax1.set(xlabel="NFE (encode; decode the same)", ylabel="round-trip PSNR (dB)", title="round trip")
    zb = (latents[max(latents)] / 80.0).flatten().numpy()
    grid = np.linspace(-4, 4, 200)
    ax2.hist(zb, bins=80, density=True, alpha=0.6, label=f"z/σ_max ({max(latents)} points)")
    ax2.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
    ax2.set(title="latent histogram", xlabel="z / σ_max")
    ax2.legend(fontsize=8)
    im = ax3.imshow(np.corrcoef(latents[max(latents)].flatten(1).numpy(), rowvar=False), vmin=-1, vmax=1, cmap="RdBu_r")
    ax3.set(title="pixel-pixel correlation of z", xlabel="pixel", ylabel="pixel")
    fig.colorbar(im, ax=ax3)
    fig.tight_layout()
    write_results(a.out, "encoder", {"run": a.run, "n": a.n, "resolution": R, "env": environment(dev), "rows": rows}, fig)


if __name__ == "__main__":
    main()
