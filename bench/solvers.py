"""Error vs NFE of the PF-ODE solvers (euler, heun, dpmpp_2m) in both directions, on analytic denoisers.

    .venv/bin/python bench/solvers.py --out results/solvers

Problems (all float64, Karras grid σ ∈ [0.002, 80], ρ = 7, as PaGoDA's encoder):
  gaussian  data N(0.2, 0.5²): the exact flow x(σ) = μ + (x(σ0) − μ)√((s²+σ²)/(s²+σ0²)) is the oracle.
            sample: 80 → 0.002; sample0: 80 → 0.002 → 0 (EDM's grid); encode: 0.002 → 80.
  mixture   per-element 1-D Gaussian mixture (3 modes, sd 0.05–0.15), posterior-mean denoiser. Oracle: Heun
            with 4096 steps. encode: 0.002 → 80 from data samples; roundtrip: encode then decode on the
            reversed grid, error vs the input (what the PaGoDA encoder/decoder check relies on).
Error = RMS(x − oracle) / RMS(oracle − mean): relative, so directions are comparable. On the Gaussian,
Euler's sample and encode errors coincide exactly (not a bug): its step factors (s²+σ_iσ_{i+1})/(s²+σ_i²)
and (s²+σ_iσ_{i+1})/(s²+σ_{i+1}²) multiply to products whose ratio is exactly the true factor k².
Writes OUT/solvers.json (every row) and OUT/solvers.png (log-log error vs NFE); prints one table per problem.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pagoda.solvers import METHODS, karras_sigmas, nfe, solve

F64 = torch.float64


def gaussian_denoiser(mu: float, s: float):
    """D(x, σ) = μ + s²/(s²+σ²)(x − μ), the posterior mean for data N(μ, s²)."""
    def D(x, sigma, labels):
        return mu + s**2 / (s**2 + sigma.view(-1, *([1] * (x.ndim - 1))) ** 2) * (x - mu)
    return D


def mixture_denoiser(w, m, sd):
    """Posterior mean E[x0 | x0 + σn = x] for the per-element mixture Σ_k w_k N(m_k, sd_k²)."""
    w, m, sd = (torch.tensor(v, dtype=F64) for v in (w, m, sd))

    def D(x, sigma, labels):
        xx, var = x[..., None], sd**2 + sigma.view(-1, *([1] * x.ndim)) ** 2  # (B, ..., K)
        log_p = torch.log(w) - 0.5 * torch.log(var) - 0.5 * (xx - m) ** 2 / var
        resp = torch.exp(log_p - torch.logsumexp(log_p, -1, keepdim=True))
        return (resp * (m + sd**2 / var * (xx - m))).sum(-1)
    return D


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt() / (ref - ref.mean()).pow(2).mean().sqrt())


def run(steps: list[int], batch: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []

    def add(problem, direction, method, n, grid, err):
        rows.append(dict(problem=problem, direction=direction, method=method, steps=n,
                         nfe=nfe(method, grid), error=err))

    # Gaussian oracle.
    mu, s = 0.2, 0.5
    D = gaussian_denoiser(mu, s)
    noise = torch.randn(batch, 4, dtype=F64, generator=gen)
    x_max, x_min = mu + math.sqrt(s**2 + 80.0**2) * noise, mu + math.sqrt(s**2 + 0.002**2) * noise
    for method in METHODS:
        for n in steps:
            down = karras_sigmas(n + 1, dtype=F64)
            down0 = torch.cat([karras_sigmas(n, dtype=F64), torch.zeros(1, dtype=F64)])  # n steps, last into 0
            cases = (("sample", down, x_max), ("sample0", down0, x_max), ("encode", down.flip(0), x_min))
            for direction, grid, x0 in cases:
                exact = mu + (x0 - mu) * math.sqrt((s**2 + float(grid[-1]) ** 2) / (s**2 + float(grid[0]) ** 2))
                add("gaussian", direction, method, n, grid, rel_err(solve(D, x0, grid, method), exact))

    # Gaussian mixture: fine-grid Heun as the oracle for encoding, the input itself for the round trip.
    w, m, sd = [0.3, 0.45, 0.25], [-0.7, 0.1, 0.8], [0.05, 0.15, 0.1]
    D = mixture_denoiser(w, m, sd)
    k = torch.multinomial(torch.tensor(w, dtype=F64), batch * 4, replacement=True, generator=gen)
    noise = torch.randn(batch * 4, dtype=F64, generator=gen)
    x = (torch.tensor(m, dtype=F64)[k] + torch.tensor(sd, dtype=F64)[k] * noise).view(batch, 4)  # data samples
    z_ref = solve(D, x, karras_sigmas(4097, dtype=F64).flip(0), "heun")
    for method in METHODS:
        for n in steps:
            up = karras_sigmas(n + 1, dtype=F64).flip(0)
            z = solve(D, x, up, method)
            add("mixture", "encode", method, n, up, rel_err(z, z_ref))
            back = solve(D, z, up.flip(0), method)
            rows.append(dict(problem="mixture", direction="roundtrip", method=method, steps=n,
                             nfe=2 * nfe(method, up), error=rel_err(back, x)))
    return rows


def print_tables(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        Console = Table = None
    keys = sorted({(r["problem"], r["direction"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for problem, direction in keys:
        sel = [r for r in rows if r["problem"] == problem and r["direction"] == direction]
        steps = sorted({r["steps"] for r in sel})
        cell = {(r["method"], r["steps"]): r for r in sel}
        header = ["steps"] + [f"{m} NFE | err" for m in METHODS]
        body = [[str(n)] + [f"{cell[m, n]['nfe']:5d} | {cell[m, n]['error']:.2e}" for m in METHODS] for n in steps]
        # Observed order from the last halving (error ratio, log2).
        body.append(["order"] + [f"{math.log2(cell[m, steps[-2]]['error'] / cell[m, steps[-1]]['error']):.2f}"
                                 for m in METHODS])
        title = f"{problem} / {direction}"
        if Table is None:
            print(f"\n{title}\n" + "\n".join("  ".join(f"{c:>20}" for c in row) for row in [header] + body))
        else:
            table = Table(title=title)
            for h in header:
                table.add_column(h, justify="right")
            for row in body:
                table.add_row(*row)
            Console(width=120).print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["problem"], r["direction"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, (problem, direction) in zip(axes[0], keys):
        for method in METHODS:
            sel = [r for r in rows if (r["problem"], r["direction"], r["method"]) == (problem, direction, method)]
            sel.sort(key=lambda r: r["nfe"])
            ax.loglog([r["nfe"] for r in sel], [r["error"] for r in sel], "o-", label=method, ms=3)
        ax.set_title(f"{problem} / {direction}", fontsize=9)
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative RMS error")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/solvers", help="results directory")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256], help="step counts")
    parser.add_argument("--batch", type=int, default=256, help="points per problem (each of 4 elements)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.steps) < 2 or min(args.steps) < 1:
        parser.error("--steps needs at least two step counts >= 1")
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    t0 = time.perf_counter()
    rows = run(sorted(args.steps), args.batch, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "solvers.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    plot(rows, out / "solvers.png")
    print_tables(rows)
    print(f"\nwrote {out / 'solvers.json'} and {out / 'solvers.png'} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
