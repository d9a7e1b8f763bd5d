"""Probability-flow ODE solvers for EDM (variance-exploding) denoisers: the Karras σ grid and `solve`.

The PF-ODE (Karras et al. 2022, eq. 4 with σ(t) = t, s(t) = 1) is

    dx/dσ = (x − D(x, σ, y)) / σ,

where D is any denoiser `(x, sigma[batch], labels) -> x0`. `solve` integrates it along a strictly
monotone σ grid: decreasing = sampling (noise → data, a final σ = 0 allowed), increasing = encoding
(data → noise, PaGoDA's frozen encoder). Three methods, step for step as the references:

    euler     k-diffusion `sample_euler`                      NFE = n − 1
    heun      EDM Algorithm 1 (S_churn = 0) / `sample_heun`    NFE = 2(n − 1), minus 1 if the grid ends at 0
    dpmpp_2m  DPM-Solver++(2M), k-diffusion `sample_dpmpp_2m`  NFE = n − 1

for a grid of n points (a trailing 0 included). Step coefficients are computed in float64 from the
grid; the state x keeps its own dtype/device. Nothing here knows about networks and no_grad is the
caller's choice (`sample`, the teacher's sampler, runs without gradients). Imports only torch and math.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
METHODS = ("euler", "heun", "dpmpp_2m")
HEUN_POINTS = 18  # the reference sampler's Karras grid: Heun, 2·18 − 1 = 35 NFE (EDM's default)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's noise range (Karras et al. 2022, Table 1); models carry their own


class SolverError(ValueError):
    """Bad solver input; the message names the problem and the fix."""


def karras_sigmas(
    n: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Karras grid σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (EDM eq. 5), no trailing 0.

    Computed in float64 and returned as `dtype` (float32 by default, so it mixes with float32
    tensors on any device; pass dtype=torch.float64 for the exact grid). Append a 0 to sample to data.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise SolverError(f"karras_sigmas needs n >= 2 points, got n={n!r}; pass an int n >= 2")
    if not (0.0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise SolverError(f"karras_sigmas needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if not (rho > 0.0 and math.isfinite(rho)):
        raise SolverError(f"karras_sigmas needs a finite rho > 0, got rho={rho}")
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints (the power can be off by an ulp)
    return sigmas.to(dtype=dtype, device=device)


def _grid(sigmas: Tensor | Sequence[float]) -> list[float]:
    """Validate a σ grid and return it as Python floats (float64): strictly monotone, > 0 except a final 0."""
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1:
            raise SolverError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}; pass a flat sequence")
        grid = [float(s) for s in sigmas.detach().cpu().double()]
    else:
        grid = [float(s) for s in sigmas]
    if len(grid) < 2:
        raise SolverError(f"sigmas needs at least 2 points (one step), got {len(grid)}")
    if not all(math.isfinite(s) for s in grid):
        raise SolverError("sigmas contains inf/nan; pass finite noise levels")
    diffs = [b - a for a, b in zip(grid[:-1], grid[1:])]
    if not (all(d < 0 for d in diffs) or all(d > 0 for d in diffs)):
        raise SolverError("sigmas must be strictly monotone (decreasing to sample, increasing to encode)")
    decreasing = diffs[0] < 0
    positive = grid[:-1] if decreasing else grid  # sampling may end exactly at σ = 0, nothing else may
    if min(positive) <= 0.0 or grid[-1] < 0.0:
        where = "before the last point" if decreasing else "at the start of an increasing grid (encode from sigma_min)"
        raise SolverError(f"sigmas must be > 0 {where}; got min {min(grid)}")
    return grid


def nfe(method: str, sigmas: Tensor | Sequence[float]) -> int:
    """Denoiser calls `solve` makes on this grid: n−1 (euler, dpmpp_2m), 2(n−1) − [σ_last = 0] (heun, as EDM)."""
    if method not in METHODS:
        raise SolverError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    grid = _grid(sigmas)
    steps = len(grid) - 1
    return 2 * steps - (grid[-1] == 0.0) if method == "heun" else steps


def solve(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    method: str = "heun",
    labels: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """Integrate the PF-ODE dx/dσ = (x − D(x, σ, y))/σ (EDM eq. 4) from sigmas[0] to sigmas[-1].

    x: state at sigmas[0], shape (batch, ...). Returns x at sigmas[-1] in x's dtype.
    callback, if given, is called after each step with {i, sigma, sigma_next, x (after the step),
    denoised (D at (x_i, σ_i)), nfe (denoiser calls so far)}.
    """
    if method not in METHODS:
        raise SolverError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] < 1:
        raise SolverError("x must be a tensor of shape (batch, ...) with batch >= 1")
    grid = _grid(sigmas)
    calls = 0

    def D(x_: Tensor, sigma: float) -> Tensor:
        nonlocal calls
        calls += 1
        sigma_b = torch.full((x_.shape[0],), sigma, dtype=x_.dtype, device=x_.device)
        out = denoiser(x_, sigma_b, labels)
        if not isinstance(out, Tensor) or out.shape != x_.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise SolverError(f"denoiser must return a tensor shaped like x {tuple(x_.shape)}, got {got}")
        return out.to(x_.dtype)

    old_denoised: Tensor | None = None
    for i, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
        x_cur = x
        denoised = D(x_cur, sigma)

        if method == "dpmpp_2m":
            # DPM-Solver++(2M) in t = −ln σ: h = t_next − t (< 0 when encoding; r = h_last/h > 0 both ways).
            if sigma_next == 0.0:
                x = denoised  # Step into σ = 0: the exponential integrator returns D exactly.
            else:
                h = math.log(sigma) - math.log(sigma_next)
                if old_denoised is None:
                    # First step: 1st-order exponential integrator (DDIM) with D held constant.
                    x = (sigma_next / sigma) * x_cur - math.expm1(-h) * denoised
                else:
                    # Multistep 2nd-order correction: extrapolate D linearly in t from the previous step.
                    h_last = math.log(grid[i - 1]) - math.log(sigma)
                    r = h_last / h
                    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                    x = (sigma_next / sigma) * x_cur - math.expm1(-h) * denoised_d
            old_denoised = denoised
        else:
            # Euler step (EDM Alg. 1, lines 4-5).
            d_cur = (x_cur - denoised) / sigma
            x = x_cur + (sigma_next - sigma) * d_cur
            # Apply 2nd-order correction (EDM Alg. 1, lines 6-8); the step into σ = 0 stays Euler.
            if method == "heun" and sigma_next != 0.0:
                d_prime = (x - D(x, sigma_next)) / sigma_next
                x = x_cur + (sigma_next - sigma) * (0.5 * d_cur + 0.5 * d_prime)

        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised, "nfe": calls})
    return x


@torch.no_grad()
def sample(denoiser: Denoiser, z: Tensor, steps: int = HEUN_POINTS, method: str = "heun", labels: Any = None,
           sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> Tensor:
    """x0 = PF-ODE solve from z ~ N(0, σ_max² I) on a Karras grid of `steps` points plus a final 0, in [−1, 1]."""
    sigmas = torch.cat([karras_sigmas(steps, sigma_min, sigma_max, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    return solve(denoiser, z, sigmas, method, labels).clamp(-1, 1)


def solver_steps(method: str, calls: int) -> int:
    """Karras grid points (a final σ = 0 appended) on which `method` makes exactly `calls` denoiser calls (NFE)."""
    steps = (calls + 1) // 2 if method == "heun" else calls  # Heun: 2(n−1) − 1 calls; Euler, DPM-Solver++: n − 1
    if steps < 2 or nfe(method, torch.cat([karras_sigmas(steps), torch.zeros(1)])) != calls:
        raise ValueError(f"{method} cannot take {calls} NFE; fix: heun takes odd NFE >= 3 (e.g. 35, 79), "
                         f"euler and dpmpp_2m any NFE >= 2")
    return steps
