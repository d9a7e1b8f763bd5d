"""Tests for pagoda.solvers: PF-ODE convergence orders against the closed-form Gaussian flow, round trips
through an analytic Gaussian-mixture denoiser, agreement with straight-line copies of the EDM /
k-diffusion samplers, NFE counts, error messages and the Karras grid. Everything in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.solvers import METHODS, SolverError, karras_sigmas, nfe, solve

F64 = torch.float64
ORDER = {"euler": 1, "heun": 2, "dpmpp_2m": 2}


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(mu: float, s: float):
    """Posterior mean for data N(mu, s² I): D(x, σ) = mu + s²/(s²+σ²)(x − mu)."""
    def D(x, sigma, labels):
        return mu + s**2 / (s**2 + _bcast(sigma, x) ** 2) * (x - mu)
    return D


def gaussian_flow(x0, mu: float, s: float, sigma0: float, sigma1: float):
    """Exact PF-ODE flow for N(mu, s²): x(σ1) = mu + (x(σ0) − mu)·√((s²+σ1²)/(s²+σ0²))."""
    return mu + (x0 - mu) * math.sqrt((s**2 + sigma1**2) / (s**2 + sigma0**2))


def mixture_denoiser(w, m, sd):
    """Per-element posterior mean for the 1-D mixture Σ_k w_k N(m_k, sd_k²) observed with noise σ."""
    w, m, sd = (torch.as_tensor(v, dtype=F64) for v in (w, m, sd))

    def D(x, sigma, labels):
        xx, var = x[..., None], sd**2 + _bcast(sigma, x)[..., None] ** 2
        log_p = torch.log(w) - 0.5 * torch.log(var) - 0.5 * (xx - m) ** 2 / var  # log responsibilities
        resp = torch.exp(log_p - torch.logsumexp(log_p, -1, keepdim=True))  # (torch.softmax is ~100× slower
        return (resp * (m + sd**2 / var * (xx - m))).sum(-1)                  #  on tiny CPU tensors here)
    return D


def make_grid(n_steps: int, sigma_min: float, sigma_max: float, kind, increasing: bool) -> torch.Tensor:
    """n_steps + 1 points on a Karras (kind = ρ) or geometric (kind = 'geo') grid; both nest under halving."""
    if kind == "geo":
        grid = torch.logspace(math.log10(sigma_max), math.log10(sigma_min), n_steps + 1, dtype=F64)
    else:
        grid = karras_sigmas(n_steps + 1, sigma_min, sigma_max, kind, dtype=F64)
    return grid.flip(0) if increasing else grid


# ---------------------------------------------------------------------------------------------
# Convergence order on the Gaussian oracle.
# For Gaussian data every method is linear in (x − mu): x_N − mu = k_N (x_0 − mu), and the exact flow
# is x(σ) − mu = k(σ)(x_0 − mu). The error measured is the sup over the trajectory of the relative error
# max|x_i − x(σ_i)| / max|x(σ_i) − mu| = |k_{N,i}/k(σ_i) − 1|. The trajectory sup (via the callback,
# on grid points shared by the n- and 2n-step grids) is used instead of the end-point error because
# the end-point error of DPM-Solver++(2M) when sampling changes sign as n grows for some (s, grid)
# (its large-σ steps are nearly exact, so small opposite-sign contributions near σ ≈ s can cancel) and
# a ratio of two such errors says nothing about the order. Measured with 64 → 128 steps over 400 random
# configurations in the ranges below plus the 162 corners of the ranges, the observed orders were:
# Euler 0.973–0.997, Heun 1.946–2.051, DPM-Solver++(2M) 1.886–2.121 (both directions). The bands
# [0.9, 1.1] and [1.8, 2.2] leave ≥ 0.07 of margin and still exclude the neighbouring integer orders.
# ---------------------------------------------------------------------------------------------
gaussian_cases = st.fixed_dictionaries({
    "mu": st.floats(-2.0, 2.0),
    "log10_s": st.floats(-1.3, 0.3),              # s ∈ [0.05, 2]
    "log10_sigma_min": st.floats(-2.7, -1.3),     # σ_min ∈ [0.002, 0.05]
    "log10_sigma_max": st.floats(0.7, 1.9),       # σ_max ∈ [5, 80]
    "kind": st.sampled_from([5.0, 7.0, "geo"]),
    "shape": st.lists(st.integers(1, 3), min_size=1, max_size=3),
    "seed": st.integers(0, 2**16),
})


def _trajectory_error(method, case, n_steps, increasing):
    mu, s = case["mu"], 10 ** case["log10_s"]
    grid = make_grid(n_steps, 10 ** case["log10_sigma_min"], 10 ** case["log10_sigma_max"], case["kind"], increasing)
    sigma0 = float(grid[0])
    noise = torch.randn(case["shape"], dtype=F64, generator=torch.Generator().manual_seed(case["seed"]))
    x0 = mu + math.sqrt(s**2 + sigma0**2) * noise  # a typical point of the marginal at σ0
    errors = []

    def record(info):
        exact = gaussian_flow(x0, mu, s, sigma0, info["sigma_next"])
        errors.append(float((info["x"] - exact).abs().max() / (exact - mu).abs().max()))

    solve(gaussian_denoiser(mu, s), x0, grid, method, callback=record)
    return max(errors)


@pytest.mark.parametrize("increasing", [False, True], ids=["sampling", "encoding"])
@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=gaussian_cases)
def test_gaussian_convergence_order(increasing, case):
    for method in METHODS:
        coarse, fine = (_trajectory_error(method, case, n, increasing) for n in (64, 128))
        order = math.log2(coarse / fine)
        lo, hi = (0.9, 1.1) if ORDER[method] == 1 else (1.8, 2.2)
        assert lo <= order <= hi, f"{method}: observed order {order:.3f} (errors {coarse:.3e} → {fine:.3e})"
        # ... and converged, not just proportional (worst corner of the ranges at 128 steps, measured:
        # Euler 0.037, Heun 0.0025, DPM-Solver++(2M) 0.0034).
        assert fine < (0.1 if ORDER[method] == 1 else 1e-2)


def test_sampling_into_zero_reaches_the_gaussian_data_point():
    """With a final 0 the last step is Euler (EDM), an O(σ_min²/s²) error: the orders survive it."""
    mu, s = 0.4, 0.7
    x_max = mu + 80.0 * torch.randn(3, 5, dtype=F64)
    exact = gaussian_flow(x_max, mu, s, 80.0, 0.0)
    for method in METHODS:
        errs = []
        for n in (32, 64):
            grid = torch.cat([karras_sigmas(n + 1, dtype=F64), torch.zeros(1, dtype=F64)])
            out = solve(gaussian_denoiser(mu, s), x_max, grid, method)
            errs.append(float((out - exact).abs().max() / (exact - mu).abs().max()))
        # measured: Euler 0.081 → 0.041 (1.96×), Heun 0.0133 → 0.0032 (4.1×), DPM-Solver++(2M) 4.3×
        assert errs[0] / errs[1] > (1.8 if method == "euler" else 3.5), (method, errs)
        assert errs[1] < (0.06 if method == "euler" else 5e-3), (method, errs)


# ---------------------------------------------------------------------------------------------
# Invertibility through a Gaussian-mixture posterior mean: encode σ_min → σ_max, decode back on the
# same grid reversed; the round-trip error must sit under a tolerance C·(n0/n)^p that shrinks with the
# step count n. Measured over 35 mixtures in the ranges below (incl. equal-weight, well-separated modes
# at the minimum sd; Karras ρ=7), the worst max-abs error × (n/32)^2 was 0.032 (DPM-Solver++(2M)) and
# 0.008 (Heun) for n = 32, 64, 128 (typical decay is ~8× per halving: the leading forward and backward
# errors cancel), and for Euler the worst error × (n/64) was 0.31 for n = 64, 128 (Euler is still
# pre-asymptotic at 32 steps for sharp mixtures: up to 0.88). 32 → 128 always shrank ≥ 2.8× (Euler) and
# ≥ 28× (2nd order). Asserted with ~1.5× margin: C = 0.05 (2nd order), 0.5 (Euler, from 64 steps), and
# shrink ≥ 12× / ≥ 2×. Sharper mixtures (sd 0.1) need more steps before these bounds hold.
# ---------------------------------------------------------------------------------------------
mixtures = st.integers(2, 4).flatmap(lambda k: st.fixed_dictionaries({
    "w": st.lists(st.floats(0.2, 1.0), min_size=k, max_size=k),
    "m": st.lists(st.floats(-1.0, 1.0), min_size=k, max_size=k),
    "sd": st.lists(st.floats(0.15, 0.4), min_size=k, max_size=k),
    "seed": st.integers(0, 2**16),
}))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(mix=mixtures)
def test_mixture_round_trip_error_shrinks_with_steps(mix):
    w = torch.tensor(mix["w"], dtype=F64) / sum(mix["w"])
    gen = torch.Generator().manual_seed(mix["seed"])
    k = torch.multinomial(w, 24, replacement=True, generator=gen)
    m, sd = torch.tensor(mix["m"], dtype=F64), torch.tensor(mix["sd"], dtype=F64)
    x = (m[k] + sd[k] * torch.randn(24, dtype=F64, generator=gen)).view(2, 3, 4)  # data (σ_min noise negligible)
    D = mixture_denoiser(w, mix["m"], mix["sd"])
    for method in METHODS:
        errs = {}
        for n in (32, 64, 128):
            up = karras_sigmas(n + 1, dtype=F64).flip(0)
            z = solve(D, x, up, method)
            assert z.abs().max() > 10 * x.abs().max()  # really reached the noise scale
            errs[n] = float((solve(D, z, up.flip(0), method) - x).abs().max())
        if method == "euler":
            assert all(errs[n] <= 0.5 * 64 / n for n in (64, 128)) and errs[128] * 2 <= errs[32], errs
        else:
            assert all(errs[n] <= 0.05 * (32 / n) ** 2 for n in errs) and errs[128] * 12 <= errs[32], (method, errs)


# ---------------------------------------------------------------------------------------------
# Reference agreement: straight-line copies of NVlabs/edm `edm_sampler` (S_churn = 0) and k-diffusion
# `sample_euler` / `sample_heun` / `sample_dpmpp_2m`, written here independently of pagoda.solvers.
# ---------------------------------------------------------------------------------------------
def edm_sampler_ref(net, latents, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    step_indices = torch.arange(num_steps, dtype=F64)
    t_steps = (sigma_max ** (1 / rho)
               + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(F64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = x_next, t_cur  # no churn
        denoised = net(x_hat, t_hat.expand(len(x_hat)), None).to(F64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next.expand(len(x_next)), None).to(F64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next, t_steps


def k_euler_ref(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, None)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def k_heun_ref(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, None)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in, None)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def k_dpmpp_2m_ref(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, None)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


K_REFS = {"euler": k_euler_ref, "heun": k_heun_ref, "dpmpp_2m": k_dpmpp_2m_ref}
MIX = mixture_denoiser([0.3, 0.5, 0.2], [-0.8, 0.1, 0.9], [0.1, 0.2, 0.15])  # nonlinear in x and σ


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("num_steps", [2, 5, 18])
def test_heun_matches_edm_algorithm_1(num_steps):
    latents = torch.randn(3, 2, 4, dtype=F64)
    ref, t_steps = edm_sampler_ref(MIX, latents, num_steps)
    _close(solve(MIX, latents * t_steps[0], t_steps, "heun"), ref)
    # Our grid is EDM's grid (endpoints pinned exactly; interior identical up to rounding).
    torch.testing.assert_close(karras_sigmas(num_steps, dtype=F64), t_steps[:-1], rtol=1e-14, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grid_kind", ["to_zero", "to_sigma_min", "increasing"])
def test_matches_k_diffusion(method, grid_kind):
    sigmas = karras_sigmas(12, dtype=F64)
    if grid_kind == "to_zero":
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if grid_kind == "increasing":
        sigmas, x = sigmas.flip(0), torch.randn(4, 5, dtype=F64).clamp(-1, 1)
    else:
        x = 80.0 * torch.randn(4, 5, dtype=F64)
    _close(solve(MIX, x, sigmas, method), K_REFS[method](MIX, x, sigmas))


def test_step_into_zero_returns_denoised_for_dpmpp_and_euler():
    x, grid = torch.randn(2, 3, dtype=F64), [0.5, 0.0]
    expected = MIX(x, torch.full((2,), 0.5, dtype=F64), None)
    for method in METHODS:  # one step: heun's last step into 0 is Euler, Euler into 0 lands on D
        torch.testing.assert_close(solve(MIX, x, grid, method), expected, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Interface: NFE, callback, dtype/shape, gradients, errors.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grid_kind", ["to_zero", "to_sigma_min", "increasing"])
@pytest.mark.parametrize("n", [2, 3, 19])
def test_nfe_counts(method, grid_kind, n):
    if grid_kind == "to_zero":  # n points including the final 0
        head = karras_sigmas(n - 1, dtype=F64) if n > 2 else torch.tensor([1.0], dtype=F64)
        sigmas = torch.cat([head, head.new_zeros(1)])
    else:
        sigmas = karras_sigmas(n, dtype=F64)
        sigmas = sigmas.flip(0) if grid_kind == "increasing" else sigmas
    assert len(sigmas) == n
    calls, seen = [], []
    D = lambda x, sigma, labels: (calls.append(1), MIX(x, sigma, labels))[1]  # noqa: E731
    solve(D, torch.randn(2, 3, dtype=F64), sigmas, method, callback=lambda info: seen.append(info["nfe"]))
    expected = {"euler": n - 1, "dpmpp_2m": n - 1, "heun": 2 * (n - 1) - (grid_kind == "to_zero")}[method]
    assert len(calls) == nfe(method, sigmas) == nfe(method, sigmas.tolist()) == seen[-1] == expected
    assert len(seen) == n - 1 and seen == sorted(seen)
    if method == "heun" and grid_kind == "to_zero" and n == 19:
        assert expected == 35  # EDM's 18-step default: 35 NFE


def test_callback_contents_and_denoiser_arguments():
    x, labels, sigmas = torch.randn(3, 2, 2, dtype=torch.float32), torch.tensor([1, 0, 2]), [10.0, 1.0, 0.1, 0.0]
    got = []

    def D(x_, sigma, y):
        assert sigma.shape == (3,) and sigma.dtype == x_.dtype and y is labels
        return MIX(x_.double(), sigma.double(), y)  # returns float64: solve casts back to x's dtype
    out = solve(D, x, sigmas, "heun", labels=labels, callback=got.append)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert [info["i"] for info in got] == [0, 1, 2]
    assert [(info["sigma"], info["sigma_next"]) for info in got] == [(10.0, 1.0), (1.0, 0.1), (0.1, 0.0)]
    assert got[-1]["x"] is out and all(info["denoised"].shape == x.shape for info in got)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), method=st.sampled_from(METHODS))
def test_any_shape_is_batched_elementwise(shape, method):
    """Each batch element evolves independently of the others (shape (B, ...))."""
    x, sigmas = 5.0 * torch.randn(shape, dtype=F64), karras_sigmas(6, 0.01, 5.0, dtype=F64)
    full = solve(MIX, x, sigmas, method)
    assert full.shape == x.shape
    _close(full[-1:], solve(MIX, x[-1:], sigmas, method))


def test_gradients_flow_through_solve():
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    solve(gaussian_denoiser(0.0, 0.5), x, [0.002, 1.0, 80.0], "heun").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("sigmas, method, match", [
    ([80.0, 1.0, 5.0], "heun", "strictly monotone"),
    ([1.0, 1.0, 0.5], "heun", "strictly monotone"),
    ([0.0, 1.0, 80.0], "euler", "start of an increasing"),
    ([1.0, 0.5, -0.1], "euler", "> 0"),
    ([5.0, 0.0, -1.0], "dpmpp_2m", "> 0"),
    ([5.0], "heun", "at least 2"),
    ([5.0, float("nan")], "heun", "inf/nan"),
    ([5.0, 1.0], "rk4", "unknown method"),
    (torch.ones(2, 2), "heun", "1-D"),
])
def test_bad_input_one_line_error(sigmas, method, match):
    with pytest.raises(ValueError, match=match) as info:
        solve(MIX, torch.randn(2, 3, dtype=F64), sigmas, method)
    assert "\n" not in str(info.value)
    if method in METHODS and not isinstance(sigmas, torch.Tensor):
        with pytest.raises(SolverError):
            nfe(method, sigmas)


def test_bad_denoiser_output_and_bad_x():
    with pytest.raises(SolverError, match="shaped like x"):
        solve(lambda x, s, y: x[:, :1], torch.randn(2, 3), [1.0, 0.5])
    with pytest.raises(SolverError, match="batch"):
        solve(MIX, torch.tensor(1.0), [1.0, 0.5])


# ---------------------------------------------------------------------------------------------
# Karras grid.
# ---------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(2, 300), log10_min=st.floats(-4, -1), log10_max=st.floats(0, 3), rho=st.floats(1.0, 12.0))
def test_karras_sigmas(n, log10_min, log10_max, rho):
    sigma_min, sigma_max = 10**log10_min, 10**log10_max
    s = karras_sigmas(n, sigma_min, sigma_max, rho, dtype=F64)
    assert s.shape == (n,) and s.dtype == F64
    assert s[0].item() == sigma_max and s[-1].item() == sigma_min
    assert (s[1:] < s[:-1]).all()
    # σ^{1/ρ} is an arithmetic sequence: this is what ρ means.
    root = s ** (1 / rho)
    step = (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)) / (n - 1)
    torch.testing.assert_close(root[1:] - root[:-1], torch.full((n - 1,), step, dtype=F64), rtol=1e-9, atol=1e-12)


def test_karras_sigmas_defaults_and_errors():
    s = karras_sigmas(40)
    assert s.dtype == torch.float32 and len(s) == 40 and s[0] == 80.0 and s[-1] == torch.tensor(0.002)
    # larger ρ concentrates steps at low noise: the midpoint drops.
    assert karras_sigmas(11, rho=9.0)[5] < karras_sigmas(11, rho=3.0)[5]
    for bad in (dict(n=1), dict(n=10, sigma_min=0.0), dict(n=10, sigma_min=5.0, sigma_max=1.0), dict(n=10, rho=0.0)):
        with pytest.raises(ValueError):
            karras_sigmas(**bad)
