"""Using trained models: find them in a run directory, sample, invert an image, encode a data set.

Sits beside train.py (same layer): the CLI calls these; models are found by pagoda/rundir.py.

    pagoda sample --checkpoint runs/demo          # -> sample_grid
    pagoda invert photo.png                       # -> invert_image
"""
from __future__ import annotations

from pathlib import Path

import torch

from pagoda.data import default_workers, downsample, load_image, make_dataset, save_image_grid, tensor_to_pil
from pagoda.encoder import Encoder, build_latent_cache, psnr
from pagoda.io import save_json
from pagoda.loop import fixed_labels, progress_bar, step_generator
from pagoda.rundir import resolve_generator, resolve_teacher_path
from pagoda.solvers import karras_sigmas, nfe as count_nfe, sample
from pagoda.teacher import guided, load_teacher

CLASS_SEARCH_MAX = 16  # invert tries every class up to this many; beyond, --class is required


def _labels(n: int, num_classes: int | None, class_: int | None) -> torch.Tensor | None:
    if num_classes is None:
        if class_ is not None:
            raise ValueError("this model is unconditional: drop --class")
        return None
    if class_ is not None:
        if not 0 <= class_ < num_classes:
            raise ValueError(f"--class {class_} is out of range: the model has classes 0..{num_classes - 1}")
        return torch.full((n,), class_)
    return fixed_labels(n, num_classes)


@torch.no_grad()
def sample_grid(checkpoint: str, n: int = 64, class_: int | None = None, seed: int = 0, out: str = "samples.png") -> Path:
    """n one-step samples G(z), z ~ N(0, σ_max² I), as a PNG grid."""
    G = resolve_generator(checkpoint)
    C, R = G.channels, G.base_resolution
    z = G.sigma_max * torch.randn(n, C, R, R, generator=step_generator(seed, 3))
    y = _labels(n, G.unet.config.num_classes, class_)
    x = torch.cat([G(z[i:i + 256], None if y is None else y[i:i + 256]) for i in range(0, n, 256)])
    ncls = G.unet.config.num_classes
    return save_image_grid(x, out, nrow=ncls if (ncls and class_ is None and ncls <= 16) else None,
                           scale=max(1, 64 // G.resolution))


@torch.no_grad()
def teacher_grid(checkpoint: str, n: int = 100, steps: int = 18, method: str = "heun", class_: int | None = None,
                 seed: int = 0, out: str = "teacher_samples.png", guidance: float = 1.0):
    """Teacher samples with any solver and grid size, optionally classifier-free guided (ω = `guidance`; one
    batched call per step); returns (path, NFE per image)."""
    D = load_teacher(checkpoint)
    R, C = D.resolution, D.channels
    z = D.sigma_max * torch.randn(n, C, R, R, generator=step_generator(seed, 4))
    y = _labels(n, D.unet.config.num_classes, class_)
    if guidance != 1.0 and y is None:
        raise ValueError(f"--guidance {guidance} needs a class-conditional teacher: this one is unconditional")
    x = sample(guided(D, guidance), z, steps, method, y, D.sigma_min, D.sigma_max)
    nfe = count_nfe(method, torch.cat([karras_sigmas(steps, D.sigma_min, D.sigma_max), torch.zeros(1)]))
    ncls = D.unet.config.num_classes
    path = save_image_grid(x, out, nrow=ncls if (ncls and class_ is None and ncls <= 16) else None, scale=max(1, 64 // R))
    return path, nfe


@torch.no_grad()
def invert_image(image: str, checkpoint: str = "runs/demo", teacher: str | None = None, class_: int | None = None,
                 out: str = "inverted", steps: int = 40) -> dict:
    """Encode `image` with the teacher (at its resolution), decode with G at full resolution; write PNGs, return PSNRs."""
    if Path(image).is_dir():
        raise ValueError(f"{image} is a directory: pass one image file")
    G = resolve_generator(checkpoint)
    D = load_teacher(teacher or resolve_teacher_path(checkpoint))
    if D.resolution != G.base_resolution or D.channels != G.channels:
        raise ValueError(f"teacher ({D.resolution}px, {D.channels} ch) does not match the generator's latent "
                         f"({G.base_resolution}px, {G.channels} ch): pass the run's own teacher")
    x_full = load_image(image, G.resolution, G.channels)[None]  # any mode/size/aspect -> model channels, ADM crop
    x_lo = downsample(x_full, D.resolution)
    enc = Encoder(D, D.resolution, steps=steps, sigma_min=D.sigma_min, sigma_max=D.sigma_max)
    ncls = G.unet.config.num_classes
    if ncls is not None and class_ is None:
        if ncls > CLASS_SEARCH_MAX:
            raise ValueError(f"the model has {ncls} classes: pass --class C (0..{ncls - 1})")
        ys = torch.arange(ncls)  # try every class, keep the one that reconstructs best at the teacher resolution
        z = enc.encode(x_lo.expand(ncls, -1, -1, -1), ys)
        rec = G(z, ys).clamp(-1, 1)  # an image: PSNRs are those of the written PNG
        best = int(psnr(downsample(rec, D.resolution), x_lo.expand(ncls, -1, -1, -1)).argmax())
        label, z, rec = best, z[best:best + 1], rec[best:best + 1]
    else:
        y = _labels(1, ncls, class_)
        label = None if y is None else int(y[0])
        z = enc.encode(x_lo, y)
        rec = G(z, y).clamp(-1, 1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(image).stem
    rec_path = out_dir / f"{stem}_reconstruction.png"
    sbs_path = out_dir / f"{stem}_side_by_side.png"
    tensor_to_pil(rec[0]).save(rec_path)
    up = torch.nn.functional.interpolate(x_lo, size=x_full.shape[-2:], mode="nearest")
    save_image_grid(torch.cat([x_full, up, rec]), sbs_path, nrow=3, scale=max(1, 128 // G.resolution))
    result = {"image": str(image), "label": label, "teacher_res": D.resolution, "full_res": G.resolution,
              "psnr_teacher_res": float(psnr(downsample(rec, D.resolution), x_lo)[0]),
              "psnr_full_res": float(psnr(rec, x_full)[0]),
              "reconstruction": str(rec_path), "side_by_side": str(sbs_path)}
    save_json(result, out_dir / f"{stem}_psnr.json")
    return result


def encode_dataset(teacher: str, data: str, out: str, n: int | None = None, steps: int = 40, method: str = "heun",
                   batch: int = 256, dtype: str = "float16", resolution: int | None = None):
    """`pagoda encode`: the latent cache of a data set (image + flip), resumable, with a progress bar."""
    if dtype not in ("float16", "float32"):  # checked before the cache's index.json is written
        raise ValueError(f"--dtype {dtype} is not supported: use float16 or float32")
    D = load_teacher(teacher)
    ds = make_dataset(data, resolution or D.resolution, channels=D.channels)
    enc = Encoder(D, D.resolution, steps=steps, method=method, sigma_min=D.sigma_min, sigma_max=D.sigma_max)
    with progress_bar(True) as bar:
        task = bar.add_task("encode", total=None, info="")
        return build_latent_cache(enc, ds, out, n, batch_size=batch, dtype=dtype, workers=default_workers(ds),
                                  progress=lambda d, t, ips: bar.update(task, completed=d, total=t, info=f"{ips:.0f} img/s"))
