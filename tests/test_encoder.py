"""Encoder: PF-ODE inversion with analytic denoisers, and the on-disk latent cache."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import TensorDataset

from pagoda.encoder import Encoder, LatentStore, build_latent_cache, psnr
from pagoda.io import load_checkpoint

from helpers import read_cache


def gaussian_denoiser(mu: float, s: float):
    """Posterior mean for data N(mu, s² I): D(x, σ) = mu + s²/(s²+σ²)(x − mu)."""
    def D(x, sigma, labels=None):
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s**2 / (s**2 + sig**2) * (x - mu)
    return D


def mixture_denoiser(means, s: float):
    """Posterior mean of a per-pixel Gaussian mixture sum_k N(m_k, s²) / K (equal weights)."""
    m = torch.tensor(means, dtype=torch.float64)

    def D(x, sigma, labels=None):
        sig2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).double() ** 2
        xd = x.double()[..., None]
        var = s**2 + sig2[..., None]
        logw = -(xd - m) ** 2 / (2 * var)
        w = torch.softmax(logw, dim=-1)
        post = m + s**2 / var * (xd - m)
        return (w * post).sum(-1).to(x.dtype)
    return D


class Dataset(TensorDataset):
    pass


@settings(max_examples=8, deadline=None)
@given(mu=st.floats(-0.5, 0.5), s=st.floats(0.2, 0.8), seed=st.integers(0, 1000),
       method=st.sampled_from(["heun", "dpmpp_2m", "euler"]))
def test_inversion_error_shrinks_with_steps(mu, s, seed, method):
    x = (torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1)
    errs = []
    for steps in (20, 40, 80):
        enc = Encoder(gaussian_denoiser(mu, s), 4, steps=steps, method=method, clamp=False)
        z = enc.encode(x)
        errs.append((enc.decode(z) - x).abs().max().item())
    # Round-trip error falls with the solver's order: ~2x per doubling (Euler), ~8x (Heun, DPM-Solver++).
    ratio = 1.6 if method == "euler" else 5.0
    assert errs[1] * ratio < errs[0] and errs[2] * ratio < errs[1]
    assert errs[2] < (0.2 if method == "euler" else 1e-3)


def test_encode_matches_closed_form_flow():
    mu, s = 0.1, 0.5
    x = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    exact = mu + (x - mu) * ((s**2 + 80.0**2) / (s**2 + 0.002**2)) ** 0.5
    errs = []
    for steps in (40, 80):  # the paper's grid (40 points, Heun) is within 1.5% of the exact flow
        z = Encoder(gaussian_denoiser(mu, s), 4, steps=steps, clamp=False).encode(x)
        errs.append(((z - exact).abs() / exact.abs().clamp_min(1)).max().item())
    assert errs[0] < 1.5e-2 and errs[1] < errs[0] / 3
    assert 60 < z.std() / x.std() * s < 100  # z lives at scale σ_max


def test_mixture_inversion_and_downsampling():
    D = mixture_denoiser([-0.8, 0.0, 0.7], 0.15)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    enc = Encoder(D, 8, steps=60, method="heun", clamp=False)
    z = enc.encode(x)  # 16px images are brought to the 8px teacher resolution first (2x2 means)
    assert z.shape == (2, 1, 8, 8)
    x8 = torch.nn.functional.avg_pool2d(x, 2)
    assert psnr(enc.decode(z), x8).min() > 40
    with pytest.raises(ValueError, match="smaller than the teacher"):
        enc.encode(torch.zeros(1, 1, 4, 4))


def test_latent_cache_build_resume_and_mismatch(tmp_path):
    D = gaussian_denoiser(0.0, 0.5)
    data = TensorDataset(torch.rand(10, 1, 8, 8) * 2 - 1, torch.arange(10) % 3)
    enc = Encoder(D, 8, steps=6, method="euler", clamp=False)
    calls = []
    info = build_latent_cache(enc, data, tmp_path, shard_size=4, batch_size=3, dtype="float32",
                              progress=lambda d, t, ips: calls.append(d))
    assert info.num_shards == 3 and calls[-1] == 10
    _, z, labels, idx = read_cache(tmp_path)
    assert z.shape == (10, 2, 1, 8, 8) and idx.tolist() == list(range(10))
    assert torch.equal(labels, torch.arange(10) % 3)
    x = torch.stack([data[i][0] for i in range(10)])
    torch.testing.assert_close(z[:, 0], enc.encode(x))
    torch.testing.assert_close(z[:, 1], enc.encode(x.flip(-1)))  # slot 1 = the horizontal flip
    # Resume: finished shards are not recomputed; a torn shard is.
    (tmp_path / "shard-00001.pt").write_bytes(b"torn")
    calls.clear()
    build_latent_cache(enc, data, tmp_path, shard_size=4, batch_size=3, dtype="float32",
                       progress=lambda d, t, ips: calls.append((d, t)))
    assert calls[-1] == (4, 4)
    _, z2, _, _ = read_cache(tmp_path)
    torch.testing.assert_close(z2, z)
    # Another encoder config on the same folder is refused, nothing overwritten.
    before = (tmp_path / "index.json").read_text()
    with pytest.raises(ValueError, match=r"index.json holds a latent cache of another config .*steps: 6 vs 7\): pass another --out, or delete"):
        build_latent_cache(Encoder(D, 8, steps=7, method="euler"), data, tmp_path, shard_size=4)
    assert (tmp_path / "index.json").read_text() == before
    assert json.loads(before)["steps"] == 6


def test_incomplete_cache_is_an_error(tmp_path):
    data = TensorDataset(torch.zeros(5, 1, 8, 8), torch.zeros(5))
    build_latent_cache(Encoder(gaussian_denoiser(0, .5), 8, steps=3, method="euler"), data, tmp_path, shard_size=2)
    (tmp_path / "shard-00002.pt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        LatentStore(tmp_path)


def test_latent_store_matches_full_load(tmp_path):
    data = TensorDataset(torch.rand(11, 1, 8, 8) * 2 - 1, torch.arange(11) % 2)
    build_latent_cache(Encoder(gaussian_denoiser(0, .5), 8, steps=4, method="euler"), data, tmp_path, shard_size=4)
    shards = [load_checkpoint(p) for p in sorted(tmp_path.glob("shard-*.pt"))]
    z, idx = torch.cat([s["z"] for s in shards]).float(), torch.cat([s["indices"] for s in shards])
    store = LatentStore(tmp_path)
    assert store.shape == z.shape and len(store) == 11 and torch.equal(store.indices, idx)
    i = torch.tensor([10, 0, 5, 3, 3, 7])
    slot = torch.tensor([1, 0, 1, 0, 1, 1])
    torch.testing.assert_close(store[i, slot], z[i, slot])
    torch.testing.assert_close(store[i, 0], z[i, 0])
