"""Can a discriminator tell real images from the generator's, and how fast? D trained alone, G frozen.

    .venv/bin/python bench/discriminator.py --run runs/demo --out results/discriminator [--steps 100] [--res 32]

The generator is the run's stage at --res (or, with --grown, the stage below grown once with α = 1: what a fresh
growth stage starts from). Each variant trains a fresh discriminator for --steps hinge steps (Adam β = (0, 0.99),
batch 64: real Fashion-MNIST train images at --res, h-flipped with p = 0.5, vs one-step samples on fresh z with
random labels, DiffAugment as the stage applies it) and is measured on a held-out batch (512 test images vs 512
other samples, no augmentation): accuracy (real > 0 and fake < 0, as the hinge scores them), margin E D(x) − E D(G(z)),
and the hinge L_D at the end of training. Also seconds per D step. Variants: the from-scratch multi-scale D
(spectral norm on/off, lr, augmentation) and the projected D at several backbone input sizes.
Writes OUT/discriminator.json.
"""
from __future__ import annotations

import time

import torch

from common import device, environment, load_run, parser, print_table, write_results
from pagoda.data import make_dataset
from pagoda.discriminators import Discriminator, make_discriminator
from pagoda.loop import step_generator
from pagoda.losses import d_hinge_loss, diff_augment

VARIANTS = {  # name -> (kind, width, input size, lr, DiffAugment policy, spectral norm)
    "multiscale, SN, lr 2e-4, aug": ("multiscale", 32, None, 2e-4, "color,translation,cutout", True),
    "multiscale, lr 2e-3": ("multiscale", 32, None, 2e-3, "color,translation,cutout", True),
    "multiscale, no aug": ("multiscale", 32, None, 2e-4, "", True),
    "multiscale, no SN, lr 2e-3": ("multiscale", 32, None, 2e-3, "color,translation,cutout", False),
    "projected 32 px": ("projected", 32, 32, 2e-3, "color,translation,cutout", True),
    "projected 64 px": ("projected", 32, 64, 2e-3, "color,translation,cutout", True),
    "projected 128 px": ("projected", 32, 128, 2e-3, "color,translation,cutout", True),
}


def build(kind: str, width: int, size: int | None, sn: bool, res: int, ncls: int | None):
    if kind == "multiscale":
        return Discriminator(res, 1, ncls, base_channels=width, max_channels=4 * width, spectral_norm=sn)
    return make_discriminator(kind, res, 1, ncls, width, size)


def main() -> None:
    p = parser(__doc__, "discriminator")
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--grown", action="store_true", help="G = the stage below, grown once (a growth stage's start)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args()
    dev = device(a.device)
    _, gens = load_run(a.run, dev)
    G = gens[a.res // 2].grow(fade=False) if a.grown else gens[a.res]
    G = G.eval().requires_grad_(False)
    ncls, C, R0 = G.config.num_classes, G.channels, G.base_resolution
    train, test = make_dataset("fashion-mnist", a.res), make_dataset("fashion-mnist", a.res, split="test")

    def fakes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, ncls, (n,), generator=g)
        with torch.no_grad():
            return G(G.sigma_max * torch.randn(n, C, R0, R0, generator=g), y).clamp(-1, 1), y

    g = step_generator(0, 77)
    x_hold, y_hold = test.images[:512], test.labels[:512]
    f_hold, yf_hold = fakes(512, g)
    rows = []
    for name in a.variants:
        kind, width, size, lr, policy, sn = VARIANTS[name]
        torch.manual_seed(0)
        D = build(kind, width, size, sn, a.res, ncls).to(dev)
        opt = torch.optim.Adam([q for q in D.parameters() if q.requires_grad], lr=lr, betas=(0.0, 0.99))
        g, t0 = step_generator(0, 1), time.perf_counter()
        for step in range(a.steps):
            i = torch.randint(0, len(train), (a.batch,), generator=g)
            x, y = train.images[i], train.labels[i]
            x = torch.where(torch.rand(a.batch, 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
            f, yf = fakes(a.batch, g)
            ag = step_generator(0, 2, step)
            aug = (lambda t: diff_augment(t, policy, torch.Generator().manual_seed(ag.initial_seed()))) if policy else (lambda t: t)
            loss = d_hinge_loss(D(aug(x), y), D(aug(f), yf))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sec = (time.perf_counter() - t0) / a.steps
        D.eval()
        with torch.no_grad():
            r = torch.cat([h.flatten(1) for h in D(x_hold, y_hold)], 1).mean(1)
            f = torch.cat([h.flatten(1) for h in D(f_hold, yf_hold)], 1).mean(1)
        rows.append({"variant": name, "kind": kind, "input": size, "lr": lr, "augment": policy, "sn": sn,
                     "seconds_per_step": sec, "loss_end": loss.item(), "accuracy": 0.5 * ((r > 0).float().mean() +
                     (f < 0).float().mean()).item(), "margin": (r.mean() - f.mean()).item()})
        print(rows[-1], flush=True)
    what = f"G {'grown from ' + str(a.res // 2) + ' px' if a.grown else 'stage-' + str(a.res)}"
    print_table(f"D alone vs {what} at {a.res} px, {a.steps} steps, batch {a.batch}", rows,
                [("variant", "variant", ""), ("seconds_per_step", "s/step", ".3f"), ("loss_end", "L_D end", ".3f"),
                 ("accuracy", "held-out acc", ".3f"), ("margin", "margin", ".3f")])
    write_results(a.out, f"discriminator-{a.res}{'-grown' if a.grown else ''}",
                  {"run": a.run, "res": a.res, "grown": a.grown, "steps": a.steps, "env": environment(dev), "rows": rows})


if __name__ == "__main__":
    main()
