"""PaGoDA's frozen encoder: downsample to the teacher resolution, solve the teacher's PF-ODE forward.

    z = ODE_solve(D_teacher, x_R, σ_min → σ_max)     (paper §3.1; z stays at scale σ_max)

`Encoder.decode` integrates the same grid backward (σ_max → σ_min): the inversion check.
`build_latent_cache` encodes a data set once, image *and* horizontal flip (as the paper; text data, whose
`hflip` is False, never mirrored: image only), into sharded, atomically written files that a killed run resumes without recomputing finished shards;
`LatentStore` memory-maps a finished cache and `LatentPairs` serves the training triples (x at a stage's
resolution, its z, its label) to a DataLoader.

    pagoda encode --teacher RUN/teacher/teacher.pt --out RUN/latents     # the CLI wrapper
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from pagoda.data import loader
from pagoda.images import downsample
from pagoda.dist import update_threads
from pagoda.io import CheckpointError, check_config, load_checkpoint, save_checkpoint, save_json
from pagoda.rundir import INDEX_FILE, shard_name
from pagoda.solvers import SIGMA_MAX, SIGMA_MIN, karras_sigmas, nfe, solve


class Encoder:
    """x → z by the teacher's PF-ODE, σ_min → σ_max on a Karras grid of `steps` points (paper: 40, Heun)."""

    def __init__(self, denoiser, resolution: int, steps: int = 40, method: str = "heun", sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, clamp: bool = True):
        self.denoiser, self.resolution, self.steps, self.method = denoiser, resolution, steps, method
        self.sigma_min, self.sigma_max, self.clamp = sigma_min, sigma_max, clamp
        self.sigmas = karras_sigmas(steps, sigma_min, sigma_max, dtype=torch.float64).flip(0)  # increasing
        self.nfe = nfe(method, self.sigmas)

    def _D(self, x, sigma, labels):
        """The teacher's denoiser, output clamped to the data range [−1, 1] (as the official encoder)."""
        out = self.denoiser(x, sigma, labels)
        return out.clamp(-1, 1) if self.clamp else out

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, H) in [−1, 1] → teacher resolution, the ADM way (2×2 means, then bicubic)."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"encode expects square (B, C, H, H) images, got {tuple(images.shape)}")
        if images.shape[-1] < self.resolution:
            raise ValueError(f"images are {images.shape[-1]}px, smaller than the teacher's {self.resolution}px: "
                             f"upsample them first or use a lower-resolution teacher")
        return downsample(images, self.resolution) if images.shape[-1] > self.resolution else images

    @torch.no_grad()
    def encode(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Data → latent: solve dx/dσ = (x − D(x, σ, y))/σ from σ_min to σ_max (z at scale σ_max)."""
        x = self.prepare(images).float()
        return solve(self._D, x, self.sigmas, self.method, labels)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Latent → data along the same grid backward (σ_max → σ_min): encode's inverse up to solver error."""
        return solve(self._D, z.float(), self.sigmas.flip(0), self.method, labels)


@dataclass
class CacheInfo:
    """What a latent cache holds; written to `index.json` and checked on resume."""

    num_images: int  # data-set images encoded (each also flipped)
    shard_size: int  # images per shard
    resolution: int  # latent (teacher) resolution
    channels: int
    steps: int
    method: str
    sigma_min: float
    sigma_max: float
    dtype: str  # "float16" | "float32"
    teacher: str  # fingerprint of the teacher weights, so a cache of another teacher is never reused
    flips: bool = True  # slot 1 holds the h-flipped image's latent (False for data that must not be mirrored)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)


def teacher_fingerprint(module) -> str:
    """A cheap, deterministic fingerprint of a denoiser's weights (sums of a few tensors; name if no weights)."""
    if not isinstance(module, torch.nn.Module):
        return getattr(module, "__qualname__", type(module).__name__)
    tensors = list(module.state_dict().values())
    vals = [float(t.double().sum()) for t in tensors[:: max(1, len(tensors) // 16)]]
    return f"{len(tensors)}:" + ",".join(f"{v:.6e}" for v in vals)


def _shard_path(root: Path, i: int) -> Path:
    return root / shard_name(i)


def check_captions(text_encoder: torch.nn.Module | None, dataset: Dataset) -> None:
    """A text teacher (its `text_encoder` not None) encodes captioned data: a one-line error for data without captions."""
    if text_encoder is not None and not hasattr(dataset, "captions"):
        raise ValueError("a text teacher encodes captioned data (e.g. --data emoji); this data set has no captions")


def build_latent_cache(encoder: Encoder, dataset: Dataset, root: str | Path, num_images: int | None = None,
                       shard_size: int = 1024, batch_size: int = 256, dtype: str = "float16", rank: int = 0,
                       world_size: int = 1, progress: Callable[[int, int, float], None] | None = None,
                       workers: int = 0) -> CacheInfo:
    """Encode dataset[:num_images] and its flips into `root/shard-*.pt`; shard i is done by rank i % world_size.

    Each shard: {"z": (n, 2, C, R, R) [image, flip], "labels": (n,), "indices": (n,)}; (n, 1, C, R, R) [image] for a
    data set whose `hflip` is False (text data; a text teacher encodes each image under its own caption,
    `dataset.captions[label]`, and the shard keeps the caption index as its label). Finished shards
    (present and readable) are skipped, so a killed run resumes; each shard is written atomically. Images
    are read by `workers` DataLoader processes (data.loader). `progress(done, total, images_per_s)` after every batch.
    """
    root = Path(root)
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    if n <= 0:
        raise ValueError("the data set is empty: nothing to encode; check --data")
    x0, _ = dataset[0]
    info = CacheInfo(n, shard_size, encoder.resolution, int(x0.shape[0]), encoder.steps, encoder.method,
                     encoder.sigma_min, encoder.sigma_max, dtype, teacher_fingerprint(encoder.denoiser),
                     getattr(dataset, "hflip", True))
    index = root / INDEX_FILE
    if index.exists():
        check_config(json.loads(index.read_text()), info, index, what="a latent cache", delete=root)
    elif rank == 0:
        save_json(asdict(info), index)
    store = {"float16": torch.float16, "float32": torch.float32}[dtype]
    conditional = getattr(getattr(getattr(encoder.denoiser, "unet", None), "config", None), "num_classes", None) is not None
    text = getattr(encoder.denoiser, "text_encoder", None)
    check_captions(text, dataset)
    text = text is not None
    todo = [s for s in range(info.num_shards) if s % world_size == rank and not _shard_ok(_shard_path(root, s))]
    shards = [list(range(s * shard_size, min(n, (s + 1) * shard_size))) for s in todo]
    batches = [ids[b:b + batch_size] for ids in shards for b in range(0, len(ids), batch_size)]
    batch_iter = loader(dataset, batches, workers)
    total, done, t0 = sum(map(len, shards)), 0, time.perf_counter()
    for s, ids in zip(todo, shards):
        zs, labels = [], []
        for b in range(0, len(ids), batch_size):
            x, y = next(batch_iter)
            xx = torch.cat([x, x.flip(-1)]) if info.flips else x  # image and its horizontal flip, one batch
            y2 = y.repeat(1 + info.flips)
            cond = encoder.denoiser.encode_text([dataset.captions[i] for i in y2.tolist()]) if text else y2
            z = encoder.encode(xx, cond if conditional or text else None)
            zs.append(torch.stack(z.chunk(1 + info.flips), dim=1).to(store))
            labels.append(y)
            done += len(y)
            update_threads()
            if progress:
                progress(done, total, done / max(time.perf_counter() - t0, 1e-9))
        save_checkpoint({"z": torch.cat(zs), "labels": torch.cat(labels), "indices": torch.tensor(ids)},
                        _shard_path(root, s))
    return info


def _shard_ok(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        d = load_checkpoint(path)
        return {"z", "labels", "indices"} <= set(d)
    except CheckpointError:
        return False  # torn or corrupt: recompute


class LatentStore:
    """A finished cache, memory-mapped shard by shard (ImageNet's 59 GiB never sit in RAM, and ranks
    on one node share the page cache). `store[idx, slot]` gathers latents (slot 0 = image, 1 = flip)
    as float32; `store.shape` = (N, 2, C, R, R) ((N, 1, C, R, R) without flips); `store.indices` maps entries to data-set indices and
    `store.labels` holds their class labels."""

    def __init__(self, root: str | Path):
        root = Path(root)
        index = root / INDEX_FILE
        if not index.exists():
            raise ValueError(f"{root} is not a latent cache (no {INDEX_FILE}); build it with `pagoda encode`")
        self.info = CacheInfo(**json.loads(index.read_text()))
        self.shards, ids, labels = [], [], []
        for i in range(self.info.num_shards):
            p = _shard_path(root, i)
            if not p.exists():
                raise ValueError(f"latent cache {root} is incomplete ({p.name} missing); rerun `pagoda encode` to finish it")
            d = load_checkpoint(p, mmap=True)
            self.shards.append(d["z"])
            ids.append(d["indices"].clone())
            labels.append(d["labels"].clone())
        self.indices, self.labels = torch.cat(ids), torch.cat(labels)
        self.starts = torch.tensor([0] + [len(z) for z in self.shards]).cumsum(0)
        self.shape = torch.Size((int(self.starts[-1]), *self.shards[0].shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        idx, slot = key
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        slot = torch.as_tensor(slot, dtype=torch.long).expand(idx.shape)
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        out = torch.empty(len(idx), *self.shape[2:])
        for s in shard.unique().tolist():  # one gather per shard touched
            m = shard == s
            out[m] = self.shards[s][idx[m] - self.starts[s], slot[m]].float()
        return out


class LatentPairs(Dataset):
    """The training triples of a stage: item 2e + f -> (x, z, y) for cache entry e and flip f (0 or 1): the real
    image at the stage's resolution (`images`, the data set built at that resolution; entry e is its image
    indices[e]), h-flipped when f = 1, the latent of that orientation z[e, f] (a LatentStore or an (N, 2, C, R, R)
    tensor) and the entry's label (the one stored in the cache). A cache without flips ((N, 1, C, R, R), text data)
    serves items 2e and 2e + 1 alike: the image as it is, never mirrored."""

    def __init__(self, z, indices: torch.Tensor, labels: torch.Tensor, images: Dataset):
        self.z, self.indices, self.labels, self.images = z, indices, labels, images
        self.in_memory = getattr(images, "in_memory", False)

    @classmethod
    def from_cache(cls, store: LatentStore, images: Dataset) -> LatentPairs:
        return cls(store, store.indices, store.labels, images)

    def __len__(self) -> int:
        return 2 * len(self.indices)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t[0] for t in self._gather(torch.tensor([int(key)]), lambda i: _stack(self.images, i)))

    def batch(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, z, y) of many keys in one gather (in-memory images)."""
        return self._gather(keys, lambda i: self.images.batch(i)[0])

    def _gather(self, keys: torch.Tensor, images_of) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e, f = keys // 2, keys % 2 * (self.z.shape[1] > 1)
        x = images_of(self.indices[e])
        return torch.where(f.bool()[:, None, None, None], x.flip(-1), x), self.z[e, f].float(), self.labels[e]


def _stack(dataset: Dataset, idx: torch.Tensor) -> torch.Tensor:
    return torch.stack([dataset[int(i)][0] for i in idx])


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [−1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)
