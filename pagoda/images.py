"""Images in and out: one file decoded (size checked before decoding, ADM centre crop), masks, tensors resized the
ADM way, and uint8 / PNG grids written. The data sets built on these: pagoda/data.py.

Bad files give a one-line `ImageError` naming the file and the fix. Transparent pixels are composited over white;
16-bit images are scaled by 255/65535 (not clipped). `downsample` is ADM's resize on tensors: 2×2 box halving while
≥ 2R, then antialiased bicubic.
"""
from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pagoda.io import atomic_write_bytes


class DataError(ValueError):
    """A data set that cannot be used: the message names the problem and the fix."""


class ImageError(DataError):
    """One image file that cannot be used: the message names the file and the fix."""


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 44_739_242  # a quarter of PIL's hard limit (2 * 89_478_485), about 6700×6700


def adm_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Center crop to R×R as guided-diffusion `center_crop_arr`: BOX-halve while ≥ 2R, BICUBIC, crop."""
    # Box-downsample by 2 while the short side is at least twice the target
    while min(*img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    # Scale so that the short side equals the target, bicubic
    scale = resolution / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    # Center crop (floor offsets, as the numpy slicing in center_crop_arr)
    left, top = (img.size[0] - resolution) // 2, (img.size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def downsample(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """B×C×H×H -> B×C×R×R the ADM way on tensors: 2×2 means while H ≥ 2R, then antialiased bicubic."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"downsample expects square B×C×H×H tensors, got {tuple(x.shape)}; fix: center-crop first")
    if not 1 <= resolution <= x.shape[-1]:
        raise ValueError(f"downsample target {resolution} not in 1..{x.shape[-1]}; fix: pass a lower resolution")
    while x.shape[-1] >= 2 * resolution:
        x = F.adaptive_avg_pool2d(x, x.shape[-1] // 2)  # exact 2×2 means for even sizes
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    return x


def resample(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Images to size×size: bicubic up-sampling (clamped to [−1, 1]) or ADM down-sampling; None = unchanged."""
    if size is None or size == x.shape[-1]:
        return x
    if size < x.shape[-1]:
        return downsample(x, size)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> "L" (channels=1) or "RGB" (3); alpha over white, 16-bit (I;16*, I) scaled by 1/257."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}; fix: pass 1 (grayscale) or 3 (RGB)")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # 16-bit 0..65535, or float in [0, 1]
        a = np.nan_to_num(np.asarray(img).astype(np.float64)) * (255.0 if img.mode == "F" else 1 / 257)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):  # composite over white, as most viewers do
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, zipfile.BadZipFile)
BAD_FILE_FIX = "fix: re-export or delete the file (or pass skip_bad=True to skip it)"


def _open(source: str | os.PathLike | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """Lazy PIL open that checks the size from the header, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused before decoding: {first_line(e)}; "
                         f"fix: downscale or delete the file") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found; fix: check the path") from None
    except _DECODE_ERRORS:
        raise ImageError(f"{name}: not a readable PNG/JPEG/WebP/BMP image; {BAD_FILE_FIX}") from None
    w, h = img.size
    if w * h == 0 or w * h > max_pixels:
        img.close()
        why = "empty image" if w * h == 0 else f"more than max_pixels={max_pixels}"
        raise ImageError(f"{name}: {w}×{h} image refused before decoding ({why}); "
                         f"fix: downscale or delete the file, or raise max_pixels")
    return img


def decode_image(source: str | os.PathLike | io.BytesIO, name: str, resolution: int, channels: int,
            max_pixels: int, check_only: str = "") -> torch.Tensor | None:
    """Open (size-checked), decode, convert and ADM-resize; check_only='header'|'full' just validates."""
    with _open(source, name, max_pixels) as img:
        try:
            img.verify() if check_only == "header" else img.load()
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name}: corrupt or truncated image ({first_line(e)}); {BAD_FILE_FIX}") from None
        if check_only:
            return None
        img = adm_resize(to_channels(img, channels), resolution)
    a = np.asarray(img, dtype=np.float32).reshape(resolution, resolution, channels)
    return torch.from_numpy(a).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def load_image(path: str | os.PathLike, resolution: int, channels: int = 3,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """One image file -> C×R×R float32 in [-1, 1] (size checked before decoding, ADM center crop)."""
    return decode_image(path, str(path), resolution, channels, max_pixels)


def load_mask(path: str | os.PathLike, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A mask image file (white = known pixel, black = hole; any mode, size, aspect) -> 1×R×R in {0, 1} (decode_mask)."""
    if Path(path).is_dir():
        raise ImageError(f"{path} is a directory; fix: pass one mask image file")
    return decode_mask(path, str(path), resolution, max_pixels)


def decode_mask(source: str | os.PathLike | io.BytesIO, name: str, resolution: int,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Open (size-checked) and decode a mask -> 1×R×R in {0, 1}: the centre square (the ADM crop's), nearest-resized
    to R, grey > 127 = known."""
    with _open(source, name, max_pixels) as img:
        try:
            img.load()
        except _DECODE_ERRORS as e:
            raise ImageError(f"{name}: corrupt or truncated mask ({first_line(e)}); fix: pass a readable "
                             f"PNG/JPEG/WebP/BMP mask") from None
        img = to_channels(img, 1)
    s = min(img.size)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((resolution, resolution), resample=Image.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127).float()[None]


# Writing images ----------------------------------------------------------------------------------

def to_uint8(x: torch.Tensor | np.ndarray, channels: int | None = None) -> np.ndarray:
    """Images (…, C, H, W) in [-1, 1] (or already uint8) -> uint8 (…, H, W, C): round((x + 1)·127.5), NaN as 0;
    `channels=3` repeats a grey channel (Inception's input, `--rgb` exports). The one quantisation of every PNG,
    export and FID."""
    x = torch.as_tensor(x).detach().cpu()
    if x.dtype != torch.uint8:
        x = ((torch.nan_to_num(x.float()).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if channels is not None and x.shape[-3] != channels:
        x = x.expand(*x.shape[:-3], channels, *x.shape[-2:])
    return x.movedim(-3, -1).contiguous().numpy()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """One C×H×W (C = 1 or 3) or H×W tensor in [-1, 1] -> an 8-bit L or RGB image."""
    x = x[None] if x.ndim == 2 else x
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"tensor_to_pil expects C×H×W with C in (1, 3), got {tuple(x.shape)}")
    a = to_uint8(x)
    return Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int = 1) -> Image.Image:
    """N×C×H×W in [-1, 1] -> one 8-bit image, `nrow` images per row (default ⌈√N⌉), nearest-upscaled ×scale."""
    x = images.detach().float().cpu()
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"grid_image expects a non-empty N×C×H×W batch, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    x = torch.cat([x, x.new_full((rows * nrow - n, c, h, w), -1.0)])  # empty cells are black
    img = tensor_to_pil(x.reshape(rows, nrow, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, nrow * w))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    return img


def label_rows(img: Image.Image, labels: list[str], width: int = 160) -> Image.Image:
    """`img` with a white margin of `width` px on its left holding labels[j] beside row j (rows of equal height)."""
    out = Image.new(img.mode, (img.width + width, img.height), "white" if img.mode == "RGB" else 255)
    out.paste(img, (width, 0))
    draw, h = ImageDraw.Draw(out), img.height / max(1, len(labels))
    for j, label in enumerate(labels):
        draw.text((4, int(j * h + h / 2) - 5), label if len(label) <= width // 6 else label[: width // 6 - 1] + "…",
                  fill="black" if img.mode == "RGB" else 0)
    return out


def png_bytes(img: Image.Image) -> bytes:
    """An image encoded as PNG, in memory."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    scale: int = 1, row_labels: list[str] | None = None) -> Path:
    """grid_image(images, nrow, scale) as one PNG (rows labelled with `row_labels`), written atomically."""
    img = grid_image(images, nrow, scale)
    img = label_rows(img, row_labels) if row_labels else img
    return atomic_write_bytes(path, lambda f: img.save(f, format="PNG"))
