"""Tests for pagoda.data: Fashion-MNIST loading, ADM preprocessing, bad files, data sets, grids."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import time
import urllib.error
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader

from pagoda import data as D
from pagoda import images as IM

FMNIST = D.FASHION_MNIST_SYSTEM_DIR
NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _raw_idx(name: str) -> np.ndarray:
    """Independent reader: gunzip and skip the header (16 bytes for images, 8 for labels)."""
    raw = gzip.decompress((FMNIST / f"{name}.gz").read_bytes())
    return np.frombuffer(raw, np.uint8, offset=16 if "images" in name else 8)


def _copy_fmnist(dst: Path, replace: dict[str, bytes] | None = None) -> Path:
    """Symlink the four Debian files into dst, replacing some with given contents."""
    dst.mkdir(parents=True, exist_ok=True)
    for n in NAMES:
        if replace and n in replace:
            (dst / n).write_bytes(replace[n])  # plain (non-gz) file
        else:
            (dst / f"{n}.gz").symlink_to(FMNIST / f"{n}.gz")
    return dst


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No system copy, an empty cache, no env var, and a network that refuses every connection."""
    calls = []

    def refuse(url):
        calls.append(url)
        raise urllib.error.URLError("[Errno 101] Network is unreachable")
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PAGODA_FASHION_MNIST", raising=False)
    monkeypatch.setattr(D, "_fetch", refuse)
    return calls


# ---- Fashion-MNIST ---------------------------------------------------------------------------

def test_fashion_mnist_train_shapes_range_labels_padding():
    x, y = D.load_fashion_mnist("train")
    assert x.shape == (60000, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0, border] == -1.0).all()
    raw = torch.from_numpy(_raw_idx("train-images-idx3-ubyte").reshape(60000, 28, 28).copy())
    assert torch.equal((x[:, 0, 2:30, 2:30] + 1).mul_(127.5).round_().to(torch.uint8), raw)
    assert torch.equal(y, torch.from_numpy(_raw_idx("train-labels-idx1-ubyte").astype(np.int64)))
    assert len(D.FASHION_MNIST_CLASSES) == 10


def test_fashion_mnist_test_split_and_dataset_downsample():
    x, y = D.load_fashion_mnist("test")
    assert x.shape == (10000, 1, 32, 32) and torch.equal(torch.bincount(y), torch.full((10,), 1000))
    ds = D.make_dataset("FMNIST", 8, split="test")
    assert isinstance(ds, D.FashionMNIST) and len(ds) == 10000
    assert (ds.num_classes, ds.channels, ds.resolution, ds.class_names) == (10, 1, 8, D.FASHION_MNIST_CLASSES)
    block_mean = x.reshape(10000, 1, 8, 4, 8, 4).mean(dim=(3, 5))  # 32 -> 8 is exactly 4×4 means
    assert torch.allclose(ds.images, block_mean, atol=1e-6)
    img, label = ds[123]
    assert img.shape == (1, 8, 8) and isinstance(label, int) and label == int(y[123])
    with pytest.raises(D.DataError, match="1 channel"):
        D.make_dataset("fashion-mnist", 32, channels=3)
    with pytest.raises(D.DataError, match="split"):
        D.load_fashion_mnist("val")
    with pytest.raises(D.DataError, match="32 or lower"):
        D.FashionMNIST("test", resolution=64)


def test_fashion_mnist_truncated_gzip_names_file(tmp_path):
    bad = (FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()[:1000]
    root = _copy_fmnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(bad)
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte\.gz.*truncated") as e:
        D.load_fashion_mnist("test", root)
    assert "\n" not in str(e.value)


def test_fashion_mnist_truncated_or_bad_magic_plain_idx_names_file(tmp_path):
    labels = gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    root = _copy_fmnist(tmp_path / "a", {"t10k-labels-idx1-ubyte": labels[:-1]})
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte: truncated"):
        D.load_fashion_mnist("test", root)
    root = _copy_fmnist(tmp_path / "b", {"t10k-labels-idx1-ubyte": struct.pack(">I", 0x0803) + labels[4:]})
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte: not an idx file"):
        D.load_fashion_mnist("test", root)
    wrong_count = labels[:4] + struct.pack(">I", 9999) + labels[8:-1]  # consistent file, count mismatch
    root = _copy_fmnist(tmp_path / "c", {"t10k-labels-idx1-ubyte": wrong_count})
    with pytest.raises(D.DataError, match="N labels"):
        D.load_fashion_mnist("test", root)


def test_fashion_mnist_missing_and_offline_names_both_fixes(offline, tmp_path):
    with pytest.raises(D.DataError) as e:
        D.load_fashion_mnist("test")
    msg = str(e.value)
    assert offline, "the download must have been tried"
    assert "apt-get install dataset-fashion-mnist" in msg and "--data DIR" in msg
    assert "PAGODA_FASHION_MNIST" in msg and "\n" not in msg
    with pytest.raises(D.DataError, match=r"nowhere.*apt-get install dataset-fashion-mnist.*PAGODA_FASHION_MNIST"):
        D.load_fashion_mnist("test", tmp_path / "nowhere")


def test_fashion_mnist_env_var_and_data_dir(offline, monkeypatch, tmp_path):
    root = _copy_fmnist(tmp_path / "fm")
    monkeypatch.setenv("PAGODA_FASHION_MNIST", str(root))
    x, y = D.load_fashion_mnist("test")
    assert x.shape == (10000, 1, 32, 32) and not offline, "no download when the env var names the files"
    monkeypatch.delenv("PAGODA_FASHION_MNIST")
    ds = D.make_dataset(str(root), 16, split="test")  # `--data DIR` pointing at the idx files
    assert isinstance(ds, D.FashionMNIST) and ds.images.shape == (10000, 1, 16, 16)


def test_fashion_mnist_download_verifies_checksum(offline, monkeypatch, tmp_path):
    served = {f"{n}.gz": (FMNIST / f"{n}.gz").read_bytes() for n in NAMES}
    monkeypatch.setattr(D, "_fetch", lambda url: served[url.rsplit("/", 1)[1]])
    x, y = D.load_fashion_mnist("test")
    cache = tmp_path / "cache" / "pagoda" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(served)
    x0, y0 = D.load_fashion_mnist("test", FMNIST)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    # a tampered file is refused and nothing is written
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    served["t10k-labels-idx1-ubyte.gz"] = gzip.compress(b"\0" * 10008)
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.load_fashion_mnist("test")
    assert not (tmp_path / "cache2" / "pagoda" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()


# ---- ADM preprocessing -----------------------------------------------------------------------

def center_crop_arr(pil_image, image_size):
    """openai/guided-diffusion image_datasets.center_crop_arr, verbatim (the reference)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _noise(w=48, h=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


PHOTOS = {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea()}


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("resolution", [16, 64, 100, 256])
def test_adm_resize_matches_guided_diffusion(name, resolution):
    img = Image.fromarray(PHOTOS[name])
    out = IM.adm_resize(img, resolution)
    assert out.size == (resolution, resolution) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), center_crop_arr(img, resolution))


def test_adm_resize_coffee_is_box_halving_then_center_crop():
    a = PHOTOS["coffee"].astype(np.float64)  # 400×600: halve to 200×300, scale 1, crop columns 50:250
    assert a.shape == (400, 600, 3)
    halved = a.reshape(200, 2, 300, 2, 3).mean(axis=(1, 3))
    out = np.asarray(IM.adm_resize(Image.fromarray(PHOTOS["coffee"]), 200)).astype(np.float64)
    assert np.abs(out - halved[:, 50:250]).max() <= 1.0  # uint8 rounding only
    assert np.abs(out - halved[:, 49:249]).max() > 10  # a one-pixel shift is detected


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), r=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_adm_resize_any_size_matches_reference(w, h, r, seed):
    img = _noise(w, h, seed)  # odd and even crop offsets, up- and down-scaling
    out = IM.adm_resize(img, r)
    assert out.size == (r, r) and np.array_equal(np.asarray(out), center_crop_arr(img, r))


@pytest.mark.parametrize("size,res,block", [(32, 8, 4), (64, 16, 4), (32, 16, 2), (16, 1, 16)])
def test_downsample_power_of_two_is_block_mean(size, res, block):
    x = torch.randn(3, 2, size, size)
    expect = x.reshape(3, 2, res, block, res, block).mean(dim=(3, 5))
    assert torch.allclose(IM.downsample(x, res), expect, atol=1e-6)
    assert torch.equal(IM.downsample(x, size), x)


def test_downsample_general_ratio_differentiable_deterministic():
    x = torch.randn(2, 3, 32, 32)
    out = IM.downsample(x, 12)  # 32 -> 16 (box) -> 12 (antialiased bicubic)
    expect = F.interpolate(F.avg_pool2d(x, 2), size=(12, 12), mode="bicubic", antialias=True)
    assert out.shape == (2, 3, 12, 12) and torch.allclose(out, expect, atol=1e-6)
    assert torch.equal(out, IM.downsample(x, 12))
    xd = torch.randn(1, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: IM.downsample(t, 5), (xd,))
    with pytest.raises(ValueError, match="square"):
        IM.downsample(torch.zeros(1, 1, 8, 16), 4)
    with pytest.raises(ValueError, match="lower"):
        IM.downsample(torch.zeros(1, 1, 8, 8), 16)


def test_downsample_agrees_with_pil_adm_path():
    img = PHOTOS["astronaut"]  # 512×512 -> 64: three box halvings either way
    ref = torch.from_numpy(np.array(IM.adm_resize(Image.fromarray(img), 64))).permute(2, 0, 1).float()
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    assert (IM.downsample(x, 64)[0] - ref).abs().max() <= 3.0  # PIL rounds to uint8 after each of 3 halvings


# ---- single images: modes and bad files ------------------------------------------------------

def _png_header(w: int, h: int) -> bytes:
    """A tiny PNG that declares w×h pixels (1-bit grayscale) with an empty IDAT: no pixels to decode."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("w,h,max_pixels", [(20000, 20000, IM.DEFAULT_MAX_PIXELS),  # PIL's bomb guard
                                            (8000, 8000, IM.DEFAULT_MAX_PIXELS),  # our size guard
                                            (100, 100, 5000)])
def test_huge_image_refused_before_decoding(tmp_path, w, h, max_pixels):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(w, h))
    assert path.stat().st_size < 100
    t = time.perf_counter()
    with pytest.raises(IM.ImageError, match=r"huge\.png.*refused before decoding") as e:
        IM.load_image(path, 32, 3, max_pixels=max_pixels)
    assert time.perf_counter() - t < 1.0 and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated_png", "truncated_jpeg", "zero_size"])
def test_bad_files_name_the_file(tmp_path, kind):
    buf = io.BytesIO()
    _noise().save(buf, "JPEG" if "jpeg" in kind else "PNG")
    content = {"garbage": np.random.default_rng(1).bytes(500), "empty": b"",
               "truncated_png": buf.getvalue()[: len(buf.getvalue()) // 2],
               "truncated_jpeg": buf.getvalue()[: len(buf.getvalue()) // 2],
               "zero_size": _png_header(0, 5)}[kind]
    path = tmp_path / f"{kind}.{'jpg' if 'jpeg' in kind else 'png'}"
    path.write_bytes(content)
    with pytest.raises(IM.ImageError, match=f"{kind}.*fix:") as e:
        IM.load_image(path, 16, 3)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_rgba_composited_over_white_and_la(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[0, :, 3] = 0      # transparent row -> white
    a[1, :, 3] = 255    # opaque red
    a[2:, :, 3] = 128   # half red over white
    x = IM.load_image(_save(Image.fromarray(a, "RGBA"), tmp_path / "a.png"), 4, 3)
    assert torch.allclose(x[:, 0], torch.ones(3, 4)) and torch.allclose(x[:, 1], torch.tensor([[1.0], [-1], [-1]]))
    assert x[1, 2].sub(127 / 127.5 - 1).abs().max() < 0.02  # green of half red over white
    la = np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 0, np.uint8)], -1)  # black, transparent
    x = IM.load_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"), 4, 1)
    assert x.shape == (1, 4, 4) and (x == 1.0).all()


def test_16bit_png_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257 * 100, 65535, 30000]], np.uint16).repeat(4, 0)
    img = Image.fromarray(v)
    assert img.mode == "I;16"
    x = IM.load_image(_save(img, tmp_path / "deep.png"), 4, 1)
    # resize to 4 is a bicubic no-op; columns map to 0, 100, 255, round(30000/257)=117
    expect = torch.tensor([0, 100, 255, 117]) / 127.5 - 1
    assert torch.allclose(x[0], expect.expand(4, 4), atol=1e-6)
    for mode_arr in (v.astype(">u2"), v.astype(np.int32)):  # I;16B and I in memory
        out = np.asarray(IM.to_channels(Image.fromarray(mode_arr), 3))
        assert out.shape == (4, 4, 3) and (out[0, :, 0] == [0, 100, 255, 117]).all()


def test_palette_mono_float_cmyk_modes(tmp_path):
    p = Image.new("P", (6, 6), 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    x = IM.load_image(_save(p, tmp_path / "p.png"), 6, 3)
    assert torch.allclose(x[:, 0, 0], torch.tensor([-1.0, -1, 1]))  # blue, no transparency
    x = IM.load_image(_save(p, tmp_path / "pt.png", transparency=1), 6, 3)
    assert (x == 1.0).all()  # transparent palette entry -> white
    assert np.asarray(IM.to_channels(Image.new("1", (3, 3), 1), 1)).max() == 255
    f = Image.fromarray(np.full((3, 3), 0.5, np.float32))
    assert (np.asarray(IM.to_channels(f, 1)) == 128).all()
    cmyk = IM.to_channels(Image.new("CMYK", (3, 3), (0, 0, 0, 0)), 3)
    assert cmyk.mode == "RGB" and (np.asarray(cmyk) == 255).all()
    with pytest.raises(ValueError, match="channels"):
        IM.to_channels(p, 2)


def test_one_pixel_and_non_square(tmp_path):
    x = IM.load_image(_save(Image.new("RGB", (1, 1), (255, 0, 0)), tmp_path / "one.bmp"), 8, 3)
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.tensor([1.0, -1, -1])[:, None, None].expand(3, 8, 8))
    x = IM.load_image(_save(_noise(50, 30), tmp_path / "wide.webp"), 16, 1)
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1


# ---- data sets ---------------------------------------------------------------------------------

def _folder(root: Path) -> Path:
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog" / "deep" / "er").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / "cat" / ".thumbs").mkdir()
    _save(_noise(seed=6), root / "cat" / ".thumbs" / "t.png")
    _save(_noise(seed=1), root / "cat" / "a.png")
    _save(_noise(seed=2), root / "cat" / "sub" / "b.JPG", format="JPEG")
    _save(_noise(seed=3), root / "dog" / "c.webp")
    _save(_noise(seed=4), root / "dog" / "deep" / "er" / "d.bmp")
    _save(_noise(seed=5), root / ".cache" / "x.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_classes_nested(tmp_path):
    ds = D.make_dataset(_folder(tmp_path / "imgs"), 16)
    assert isinstance(ds, D.ImageFolderDataset)
    assert (ds.class_names, ds.num_classes, ds.channels, ds.resolution) == (["cat", "dog"], 2, 3, 16)
    assert ds.labels == [0, 0, 1, 1] and len(ds) == 4
    img, label = ds[3]
    assert img.shape == (3, 16, 16) and label == 1
    assert torch.equal(img, IM.load_image(tmp_path / "imgs" / "dog" / "deep" / "er" / "d.bmp", 16, 3))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _save(_noise(seed=i), flat / f"{i}.png")
    ds = D.ImageFolderDataset(flat, 8, channels=1)
    assert ds.num_classes is None and ds.class_names is None and ds[2][1] == 0 and ds[2][0].shape == (1, 8, 8)


def test_image_folder_bad_file_error_and_skip(tmp_path):
    root = _folder(tmp_path / "imgs")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(IM.ImageError, match="broken.png"):
        D.ImageFolderDataset(root, 8)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable.*broken\.png"):
        ds = D.ImageFolderDataset(root, 8, skip_bad=True)
    assert len(ds) == 4 and str(bad) not in ds.files
    buf = io.BytesIO()
    _noise().save(buf, "PNG")
    bad.write_bytes(buf.getvalue()[:-40])  # valid header, truncated data: found by the header scan
    with pytest.raises(IM.ImageError, match=r"broken\.png: corrupt or truncated"):
        D.ImageFolderDataset(root, 8)


def test_truncated_jpeg_found_at_load_or_full_scan(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    buf = io.BytesIO()
    _noise(64, 64).save(buf, "JPEG")
    (root / "0.jpg").write_bytes(buf.getvalue()[:-300])  # passes the header scan
    _save(_noise(seed=9), root / "1.png")
    ds = D.ImageFolderDataset(root, 8)
    with pytest.raises(IM.ImageError, match=r"0\.jpg: corrupt or truncated"):
        ds[0]
    ds = D.ImageFolderDataset(root, 8, skip_bad=True)
    with pytest.warns(UserWarning, match=r"0\.jpg.*next image"):
        img, _ = ds[0]
    assert torch.equal(img, ds[1][0])
    with pytest.raises(IM.ImageError, match=r"0\.jpg"):
        D.ImageFolderDataset(root, 8, scan="full")


def test_folder_errors_are_one_line(tmp_path):
    for make, match in [(lambda p: None, "no such folder"), (lambda p: p.mkdir(), "no PNG/JPEG"),
                        (lambda p: (p / "empty_class").mkdir(parents=True), "class folder without images")]:
        path = tmp_path / f"case{match[:5]}"
        make(path)
        with pytest.raises(D.DataError, match=match) as e:
            D.ImageFolderDataset(path, 8)
        assert "\n" not in str(e.value) and "fix:" in str(e.value)
    mixed = _folder(tmp_path / "mixed")
    _save(_noise(), mixed / "loose.png")
    with pytest.raises(D.DataError, match="loose images and sub-folders"):
        D.ImageFolderDataset(mixed, 8)
    with pytest.raises(D.DataError, match=r"nope\.zip: no such folder or \.zip.*fashion-mnist"):
        D.make_dataset(tmp_path / "nope.zip", 8)


def _zip(path: Path, labels=True, n=6) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i in range(n):
            buf = io.BytesIO()
            _noise(seed=i).save(buf, "PNG")
            zf.writestr(f"{i // 4:05d}/img{i:08d}.png", buf.getvalue())
        if labels is not None:
            table = [[f"{i // 4:05d}/img{i:08d}.png", i % 3] for i in range(n)] if labels else None
            zf.writestr("dataset.json", json.dumps({"labels": table}))
    return path


def test_zip_dataset_labels_pickling_and_errors(tmp_path):
    ds = D.make_dataset(_zip(tmp_path / "d.zip"), 16)
    assert isinstance(ds, D.ZipDataset) and len(ds) == 6 and ds.num_classes == 3
    assert ds.labels == [0, 1, 2, 0, 1, 2] and ds.class_names == ["0", "1", "2"]
    img, label = ds[4]
    ref = IM.adm_resize(IM.to_channels(_noise(seed=4), 3), 16)
    assert label == 1 and torch.allclose(img, torch.from_numpy(np.asarray(ref, np.float32)).permute(2, 0, 1) / 127.5 - 1)
    clone = pickle.loads(pickle.dumps(ds))  # after the zip was opened in this process
    assert torch.equal(clone[4][0], img)
    for labels in (False, None):
        ds = D.ZipDataset(_zip(tmp_path / f"u{labels}.zip", labels=labels), 8)
        assert ds.num_classes is None and ds[0][1] == 0
    path = _zip(tmp_path / "m.zip")
    with zipfile.ZipFile(path, "a") as zf:
        buf = io.BytesIO()
        _noise().save(buf, "PNG")
        zf.writestr("extra.png", buf.getvalue())
    with pytest.raises(D.DataError, match="no label for extra.png"):
        D.ZipDataset(path, 8)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(D.DataError, match=r"junk\.zip: unreadable zip"):
        D.ZipDataset(tmp_path / "junk.zip", 8)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("a.png", b"\x89PNG garbage")
    with pytest.raises(IM.ImageError, match=r"bad\.zip:a\.png"):
        D.ZipDataset(tmp_path / "bad.zip", 8)


def test_dataloader_two_workers(tmp_path):
    folder = D.make_dataset(_folder(tmp_path / "imgs"), 8)
    archive = D.make_dataset(_zip(tmp_path / "d.zip"), 8)
    archive[0]  # the parent has the zip open before the workers fork
    for ds in (folder, archive):
        loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
        images, labels = zip(*loader)
        images, labels = torch.cat(images), torch.cat(labels)
        assert images.shape == (len(ds), 3, 8, 8) and labels.tolist() == ds.labels
        assert torch.equal(images[-1], ds[len(ds) - 1][0])


def test_step_loader_same_batches_in_order_for_any_workers(tmp_path):
    """data.loader: the batches of the given index lists, in that order, whether 0 or 2 processes decode them (so a
    run and its resume do not depend on --workers); in-memory data gathers each batch at once."""
    folder = D.make_dataset(_folder(tmp_path / "imgs"), 8)
    steps = [[3, 0, 0], [1, 2], [2, 3, 1, 0]]
    ref = [(torch.stack([folder[i][0] for i in b]), torch.tensor([folder.labels[i] for i in b])) for b in steps]
    for workers in (0, 2):
        got = list(D.loader(folder, iter(steps), workers))
        assert len(got) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, ref))
    fm = D.make_dataset("fashion-mnist", 16)
    assert D.default_workers(fm) == 0 and D.default_workers(folder, ranks=1) >= 1
    x, y = next(D.loader(fm, [[5, 7]], 0))
    assert torch.equal(x, fm.images[[5, 7]]) and torch.equal(y, fm.labels[[5, 7]])
    with pytest.raises(ValueError, match="workers"):
        D.loader(fm, [[0]], -1)


def test_latent_pairs_flip_image_and_latent_together():
    """LatentPairs key 2e + f: the stage-resolution image of entry e (h-flipped when f = 1), latent z[e, f], label."""
    from pagoda.encoder import LatentPairs
    fm = D.make_dataset("fashion-mnist", 16)
    z, idx, labels = torch.randn(4, 2, 1, 8, 8), torch.tensor([10, 3, 7, 0]), torch.tensor([1, 2, 3, 4])
    pairs = LatentPairs(z, idx, labels, fm)
    keys = torch.tensor([0, 3, 5, 5, 6])
    x, zz, y = pairs.batch(keys)
    assert torch.equal(x[0], fm.images[10]) and torch.equal(x[1], fm.images[3].flip(-1)) and torch.equal(x[3], x[2])
    assert torch.equal(zz[1], z[1, 1]) and torch.equal(zz[4], z[3, 0]) and y.tolist() == [1, 2, 3, 3, 4]
    item = pairs[3]
    assert torch.equal(item[0], x[1]) and torch.equal(item[1], zz[1]) and int(item[2]) == 2 and len(pairs) == 8


# ---- writing images ----------------------------------------------------------------------------

def test_save_image_grid_and_tensor_to_pil(tmp_path):
    x = (torch.randint(0, 256, (10, 3, 8, 8)).float() / 127.5 - 1)
    path = IM.save_image_grid(x, tmp_path / "out" / "grid.png", nrow=4, scale=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * 8 * 3, 4 * 8 * 3, 3) and list(path.parent.iterdir()) == [path]
    tile = grid[8 * 3: 16 * 3, 8 * 3: 16 * 3]  # row 1, column 1 = image 5, upscaled ×3
    assert np.array_equal(tile[::3, ::3], np.asarray(IM.tensor_to_pil(x[5]))) and np.array_equal(tile[1::3, 2::3], tile[::3, ::3])
    assert (grid[16 * 3:, 16 * 3:] == 0).all()  # cells past the 10th image are black
    assert torch.allclose(torch.from_numpy(np.asarray(IM.tensor_to_pil(x[0]), np.float32)).permute(2, 0, 1) / 127.5 - 1, x[0])
    gray = IM.save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "g.png")
    assert Image.open(gray).mode == "L" and Image.open(gray).size == (16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert IM.tensor_to_pil(torch.full((1, 2, 2), float("nan"))).getpixel((0, 0)) == 128
