"""Using trained models: find them in a run directory, sample (grids, exports for external evaluators), invert an
image, encode a data set.

Sits beside train.py (same layer): the CLI calls these; models are found by pagoda/rundir.py and samples drawn
by `make_sampler` (image i from (seed, i), label i mod C; pagoda/evaluate.py scores the same sequence), so a grid
shows an export's first images; pagoda/control.py builds the inverse problems on `encode_images`.

    pagoda sample --checkpoint runs/demo                        # -> sample_grid
    pagoda sample --checkpoint runs/demo --npz s.npz --n 50000   # -> export_samples
    pagoda invert photo.png                                     # -> invert_image
"""
from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

from pagoda.data import default_workers, make_dataset
from pagoda.images import downsample, grid_image, load_image, resample, save_image_grid, tensor_to_pil, to_uint8
from pagoda.decoder import Generator, load_generator
from pagoda.encoder import Encoder, build_latent_cache, psnr, teacher_fingerprint
from pagoda.io import atomic_write_bytes, check_config, save_json
from pagoda.loop import index_labels, progress_bar, step_generator
from pagoda.rundir import PROMPT_GRID, RunDir, is_finished, model_file, resolve_teacher_path, run_of
from pagoda.solvers import HEUN_POINTS, karras_sigmas, nfe as count_nfe, sample, solver_steps
from pagoda.teacher import Denoiser, guided, load_teacher
from pagoda.text import TextEmbedding
from pagoda.prompts import EXAMPLES, check_condition, condition, named, run_captions, spread

CLASS_SEARCH_MAX = 16  # invert tries every class up to this many; beyond, --class is required
EXPORT_FILE = "export.json"  # an export folder's (or FILE.parts/') settings, checked on resume
SAMPLE_CALL = 64  # images per network call when sampling: image i always runs with images 64⌊i/64⌋ … 64⌊i/64⌋+63


# ---- sampling: grids and exports ------------------------------------------------------------------

def make_sampler(kind: str, model: torch.nn.Module, solver: str = "heun", nfe: int = 35, resize: int | None = None,
                 seed: int = 0, device: str | torch.device = "cpu", class_: int | None = None,
                 guidance: float = 1.0, call_size: int = SAMPLE_CALL, prompts: list[str] | None = None,
                 per_prompt: int = 1) -> Callable[[int, int], torch.Tensor]:
    """generate(i, b) -> images i … i+b−1 (CPU, [−1, 1]); image i has z ~ N(0, σ_max² I) seeded by (seed, i) and
    label index_labels(i). The network always runs on the aligned call of images call_size·⌊i/call_size⌋ … (a
    network's output changes in its last bits with its batch), so image i's bytes depend on (seed, i, call_size)
    only, however the sequence is cut into batches or split across ranks (exports keep SAMPLE_CALL; `pagoda serve`
    calls its n images at once: the same z and labels, equal up to the last bits). Guidance ω = `guidance` (1 = off):
    a teacher samples with classifier-free guidance (pagoda.teacher.guided), a generator trained with --guidance-max
    is called once as G(z, y, ω). A text model with `prompts`: image i has caption prompts[i // per_prompt] (cycling)."""
    cfg = model.unet.config
    R, C, ncls = cfg.resolution, cfg.in_channels, cfg.num_classes
    steps = solver_steps(solver, nfe) if kind == "teacher" else 0
    sigma_max = model.sigma_max  # the generator's or the teacher's
    D = guided(model, guidance) if kind == "teacher" else None
    if guidance != 1.0 and ncls is None and not prompts:
        raise ValueError(f"--guidance {guidance} needs a class-conditional model: this one is unconditional")

    @torch.no_grad()
    def call(i: int) -> torch.Tensor:  # images i … i+call_size−1 in one network call (i aligned)
        b = call_size
        z = torch.stack([torch.randn(C, R, R, generator=step_generator(seed, 5, k)) for k in range(i, i + b)])
        z = (sigma_max * z).to(device)
        y = index_labels(i, b, ncls, class_)
        y = None if y is None else y.to(device)
        if prompts:
            y = model.encode_text([prompts[k // per_prompt % len(prompts)] for k in range(i, i + b)])
        if kind == "generator":
            x = model(z, y) if guidance == 1.0 else model(z, y, torch.full((b,), float(guidance), device=device))
        else:
            x = sample(D, z, steps, solver, y, model.sigma_min, sigma_max)
        return resample(x.float().clamp(-1, 1), resize).cpu()

    last: dict[int, torch.Tensor] = {}  # the latest call, kept: consecutive batches that share a call run it once

    def generate(i: int, b: int) -> torch.Tensor:
        parts = []
        for k in range(i // call_size * call_size, i + b, call_size):
            if k not in last:
                last.clear()
                last[k] = call(k)
            parts.append(last[k][max(i - k, 0):i + b - k])
        return torch.cat(parts)

    return generate


def _sampler(kind: str, checkpoint: str, class_: int | None, seed: int, steps: int = HEUN_POINTS, method: str = "heun",
             guidance: float = 1.0, prompts: list[str] | None = None, per_prompt: int = 1):
    """(model, generate, NFE per image) of a generator ("generator") or a teacher ("teacher") checkpoint."""
    if kind == "generator":
        model, nfe = load_generator(model_file(checkpoint)), 1
    else:
        model = load_teacher(checkpoint)
        nfe = count_nfe(method, torch.cat([karras_sigmas(steps, model.sigma_min, model.sigma_max), torch.zeros(1)]))
    check_condition(model, class_, prompts, need_prompt=True)
    return model, make_sampler(kind, model, method, nfe, seed=seed, class_=class_, guidance=guidance, prompts=prompts,
                               per_prompt=per_prompt), nfe


def _blocks(generate, indices: Iterable[int], batch: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(k·batch, images k·batch … (k+1)·batch − 1) of each batch-aligned block holding one of `indices` (an export
    writes whole blocks; the images' bytes depend on (seed, i) only, see make_sampler)."""
    for k in sorted({i // batch for i in indices}):
        yield k * batch, generate(k * batch, batch)


def _grid(model, generate, n: int, batch: int, class_: int | None, out: str, prompts: list[str] | None = None,
          upsample: int | None = None) -> Path:
    """n images as a grid: one row per prompt (labelled; n per prompt), else one column per class (≤ 16 classes);
    `upsample`: bicubic to that size first."""
    total = n * len(prompts) if prompts else n
    x = resample(torch.cat([x for _, x in _blocks(generate, range(total), min(batch, total))])[:total], upsample)
    ncls = model.unet.config.num_classes
    nrow = n if prompts else ncls if (ncls and class_ is None and ncls <= 16) else None
    return save_image_grid(x, out, nrow=nrow, scale=max(1, 64 // x.shape[-1]), row_labels=prompts)


@torch.no_grad()
def sample_grid(checkpoint: str, n: int = 64, class_: int | None = None, seed: int = 0, out: str = "samples.png",
                batch: int = 64, guidance: float = 1.0, prompts: list[str] | None = None) -> Path:
    """n one-step samples G(z, y[, ω]), z ~ N(0, σ_max² I), as a PNG grid (export_samples' z and labels); a text G
    with `prompts`: n per prompt, one labelled row each (image k of prompt j is image j·n + k)."""
    G, generate, _ = _sampler("generator", checkpoint, class_, seed, guidance=guidance, prompts=prompts, per_prompt=n)
    return _grid(G, generate, n, batch, class_, out, prompts)


@torch.no_grad()
def teacher_grid(checkpoint: str, n: int = 100, steps: int = HEUN_POINTS, method: str = "heun", class_: int | None = None,
                 seed: int = 0, out: str = "teacher_samples.png", guidance: float = 1.0, batch: int = 64,
                 prompts: list[str] | None = None, upsample: int | None = None):
    """Teacher samples with any solver and grid size, optionally classifier-free guided (ω = `guidance`; one
    batched call per step; a text teacher's null condition is the empty caption); `prompts` as sample_grid's;
    `upsample`: bicubic to that size (the floor growth must beat); returns (path, NFE per image)."""
    D, generate, nfe = _sampler("teacher", checkpoint, class_, seed, steps, method, guidance, prompts, n)
    return _grid(D, generate, n, batch, class_, out, prompts, upsample), nfe


def prompt_grids(run_dir: str, n: int = 4, seed: int = 0) -> list[Path]:
    """A text run's grids of the same prompts (EXAMPLES spread over its training captions; n samples each, one
    labelled row per prompt): the teacher's (Heun 35 NFE, bicubic-upsampled to the last stage's resolution) and every
    finished stage's, as RUN/…/prompts.png; [] for a class run. `pagoda report` shows them."""
    stages = RunDir(run_dir).finished()
    last = load_generator(model_file(stages[-1])) if stages else None
    if last is None or last.text_encoder is None:
        return []
    prompts = spread(run_captions(run_dir) or [], EXAMPLES)
    if not prompts:
        raise ValueError(f"{run_dir}: its config.json names no captioned data: cannot choose prompts for the report")
    tdir = RunDir(run_dir).teacher_dir
    tdir.mkdir(parents=True, exist_ok=True)
    teacher = [teacher_grid(str(resolve_teacher_path(run_dir)), n, seed=seed, out=str(tdir / PROMPT_GRID),
                            prompts=prompts, upsample=last.resolution)[0]]
    return teacher + [sample_grid(str(s), n, seed=seed, out=str(s / PROMPT_GRID), prompts=prompts) for s in stages]


class _Export:
    """One export target's folder, holding export.json (the settings): a folder of another export is refused."""

    def __init__(self, folder: Path, settings: dict, shape: tuple[int, int, int]):
        self.folder, self.shape = folder, shape  # shape: (H, W, C) of one image
        meta = folder / EXPORT_FILE
        if meta.is_file():  # resume only the same export
            check_config(json.loads(meta.read_text()), settings, meta, what="an export", option="output",
                         delete=folder)
        elif folder.is_dir() and any(folder.glob("[0-9]*.png")):
            raise ValueError(f"{folder} holds PNGs that `pagoda sample` did not write: pass an empty or new --outdir")
        save_json(settings, meta)


class PngExport(_Export):
    """DIR/000000.png, 000001.png, … (written atomically); a PNG that decodes to the right size is finished."""

    def missing(self, n: int) -> list[int]:
        return [i for i in range(n) if not self._ok(self.folder / f"{i:06d}.png")]

    def _ok(self, path: Path) -> bool:
        try:
            with Image.open(path) as im:
                im.load()
                return im.size == self.shape[1::-1] and len(im.getbands()) == self.shape[2]
        except (OSError, ValueError, SyntaxError):
            return False  # absent, torn or foreign: written again

    def write(self, i: int, images: np.ndarray, todo: set[int]) -> None:
        for k, a in enumerate(images):
            if i + k in todo:
                img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
                atomic_write_bytes(self.folder / f"{i + k:06d}.png", lambda f, img=img: img.save(f, format="PNG"))

    def finish(self, n: int, labels: torch.Tensor | None) -> None:
        pass


class NpzExport(_Export):
    """FILE (arr_0 uint8 NHWC; arr_1 int64 labels if the model is conditional), assembled at the end from FILE.parts/block-*.npz
    (one per network block, written atomically), which is then removed."""

    def __init__(self, path: Path, settings: dict, shape: tuple[int, int, int]):
        self.path = path
        super().__init__(path.with_name(path.name + ".parts"), settings, shape)

    def _parts(self) -> dict[int, np.ndarray]:
        """{first index: images} of the readable parts (a part's labels follow from its indices)."""
        parts = {}
        for p in sorted(self.folder.glob("block-*.npz")):
            try:
                with np.load(p) as d:
                    x = d["x"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                continue  # torn or foreign: its block is computed again
            if x.dtype == np.uint8 and x.shape[1:] == self.shape:
                parts[int(p.stem.split("-")[1])] = x
        return parts

    def missing(self, n: int) -> list[int]:
        have = {i + k for i, x in self._parts().items() for k in range(len(x))}
        return [i for i in range(n) if i not in have]

    def write(self, i: int, images: np.ndarray, todo: set[int]) -> None:
        atomic_write_bytes(self.folder / f"block-{i:09d}.npz", lambda f: np.savez(f, x=images))

    def finish(self, n: int, labels: torch.Tensor | None) -> None:
        x = np.empty((n, *self.shape), np.uint8)
        for i, part in self._parts().items():  # together they hold every image < n: missing(n) was written
            x[i:i + len(part)] = part[:max(0, n - i)]
        arrays = {"arr_0": x} if labels is None else {"arr_0": x, "arr_1": labels.numpy().astype(np.int64)}
        atomic_write_bytes(self.path, lambda f: np.savez(f, **arrays))
        shutil.rmtree(self.folder)


@torch.no_grad()
def export_samples(checkpoint: str, kind: str = "generator", n: int = 64, outdir: str | None = None,
                   npz: str | None = None, class_: int | None = None, seed: int = 0, batch: int = 64, rgb: bool = False,
                   steps: int = HEUN_POINTS, method: str = "heun", guidance: float = 1.0, progress: bool = False,
                   prompts: list[str] | None = None) -> dict:
    """Images 0 … n−1 of a generator or a teacher as numbered PNGs (`outdir`) and/or the ADM evaluator's .npz
    (arr_0 uint8 N×H×W×C, C = the model's channels or 3 with `rgb`; arr_1 int64 labels), resumable; a text model with
    `prompts`: n per prompt, image j·n + k = image k of prompt j (export.json records the prompts, n per prompt and
    each image's prompt: a resume with another n is refused)."""
    if outdir is None and npz is None:
        raise ValueError("nothing to write: pass --outdir DIR and/or --npz FILE")
    model, generate, nfe = _sampler(kind, checkpoint, class_, seed, steps, method, guidance, prompts, n)
    ncls, n = model.unet.config.num_classes, n * len(prompts) if prompts else n
    shape = (model.resolution, model.resolution, 3 if rgb else model.channels)
    settings = {"kind": kind, "model": teacher_fingerprint(model), "seed": seed, "class": class_,
                "channels": shape[2], "guidance": guidance, **({"method": method, "nfe": nfe} if kind == "teacher" else {}),
                **({"prompts": prompts, "per_prompt": n // len(prompts),
                    "image_prompts": [prompts[i * len(prompts) // n] for i in range(n)]} if prompts else {})}
    sinks = ([PngExport(Path(outdir), settings, shape)] if outdir else []) + \
            ([NpzExport(Path(npz), settings, shape)] if npz else [])
    todo = set().union(*(s.missing(n) for s in sinks))
    t0, done = time.perf_counter(), 0
    with progress_bar(progress) as bar:
        task = bar.add_task("export", total=len(todo), info="")
        for i, x in _blocks(generate, todo, batch):
            a = to_uint8(x[:n - i], channels=shape[2])  # --rgb on a grey model: the grey channel thrice
            for s in sinks:
                s.write(i, a, todo)
            done += len(todo.intersection(range(i, i + len(a))))
            bar.update(task, completed=done, info=f"{done / (time.perf_counter() - t0):.1f} img/s")
    seconds = time.perf_counter() - t0
    for s in sinks:
        s.finish(n, index_labels(0, n, ncls, class_))
    return {"n": n, "new": len(todo), "seconds": seconds, "images_per_s": len(todo) / max(seconds, 1e-9), "nfe": nfe,
            "written": [str(p) for p in (outdir, npz) if p]}


# ---- inversion ------------------------------------------------------------------------------------

def load_models(checkpoint: str, teacher: str | None = None) -> tuple[Generator, Denoiser]:
    """The generator of `checkpoint` and its teacher (`teacher`, else the run's), checked to share the latent shape."""
    G = load_generator(model_file(checkpoint))
    return G, load_teacher_of([G], checkpoint, teacher)


def load_stages(checkpoint: str, teacher: str | None = None) -> tuple[list[Generator], Denoiser]:
    """Every finished stage's generator of a run directory, lowest resolution first (a checkpoint file or a stage
    directory: just its generator), and their teacher (`teacher`, else the run's)."""
    path = Path(checkpoint)
    stages = RunDir(path).finished() if path.is_dir() and not is_finished(path) else []
    Gs = [load_generator(model_file(p)) for p in stages] or [load_generator(model_file(checkpoint))]  # the latter: its one-line error
    return Gs, load_teacher_of(Gs, checkpoint, teacher)


def guidance_range(G: Generator, checkpoint: str) -> list[float | None] | None:
    """[1, ω_max] of an ω-conditioned generator (ω_max from its run's config.json, else None), None if unguided."""
    if not G.unet.config.guidance_embed:
        return None
    run = run_of(checkpoint)
    train = json.loads(run.config.read_text()).get("train", {}) if run and run.config.is_file() else {}
    return [1.0, train.get("guidance_max")]


def load_teacher_of(Gs: list[Generator], checkpoint: str, teacher: str | None = None) -> Denoiser:
    """The teacher of the generators `Gs` (`teacher`, else the run's), checked to share their latent shape."""
    D = load_teacher(teacher or resolve_teacher_path(checkpoint))
    for G in Gs:
        if D.resolution != G.base_resolution or D.channels != G.channels:
            raise ValueError(f"teacher ({D.resolution}px, {D.channels} ch) does not match the generator's latent "
                             f"({G.base_resolution}px, {G.channels} ch): pass the run's own teacher")
    return D


def read_image(image: str, resolution: int, channels: int) -> torch.Tensor:
    """One image file (any mode/size/aspect, ADM centre crop) as a 1×C×R×R batch in [−1, 1]."""
    if Path(image).is_dir():
        raise ValueError(f"{image} is a directory: pass one image file")
    return load_image(image, resolution, channels)[None]


@torch.no_grad()
def encode_images(G: Generator, D: Denoiser, x: torch.Tensor, class_: int | None = None, steps: int = 40,
                  prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor | TextEmbedding | None]:
    """(z, y): z = E(↓x, y) by the teacher's PF-ODE at its resolution, y = `class_` or, per image, the class whose
    G(z, y) reconstructs ↓x best there (every class encoded in one batch); a text model: y = the embedding of
    `prompt` (None: the empty caption, an unconditional encode)."""
    R, ncls, B = D.resolution, G.unet.config.num_classes, len(x)
    y = condition(G, B, class_, prompt)  # checked: the class or the prompt fits the model
    x_lo = downsample(x, R)
    enc = Encoder(D, R, steps=steps, sigma_min=D.sigma_min, sigma_max=D.sigma_max)
    if ncls is None or class_ is not None:
        return enc.encode(x_lo, y), y
    if ncls > CLASS_SEARCH_MAX:
        raise ValueError(f"the model has {ncls} classes: pass --class C (0..{ncls - 1})")
    ys, xs = torch.arange(ncls).repeat(B), x_lo.repeat_interleave(ncls, 0)  # image b, class c at b·ncls + c
    z = enc.encode(xs, ys)
    best = psnr(downsample(G(z, ys).clamp(-1, 1), R), xs).view(B, ncls).argmax(1)
    return z[torch.arange(B) * ncls + best], best


class ToolOutput(NamedTuple):
    """What an inverse problem shows: its numbers, the result image (C×H×W) and the side-by-side panels."""
    numbers: dict
    image: torch.Tensor
    panels: list[torch.Tensor]

    def side_by_side(self) -> Image.Image:
        """The panels in one row, nearest-upscaled to ≥ 128 px high."""
        x = torch.cat(self.panels)
        return grid_image(x, nrow=len(x), scale=max(1, 128 // x.shape[-1]))


@torch.no_grad()
def invert_result(G: Generator, D: Denoiser, x: torch.Tensor, class_: int | None = None, steps: int = 40,
                  prompt: str | None = None) -> ToolOutput:
    """Encode x (1×C×H×H at G's resolution) with the teacher at its resolution, decode with G at full resolution
    (both under `class_` or the best class; a text model: under `prompt`, default the empty caption): PSNRs at both;
    panels x | ↓x (nearest up) | G(z, y)."""
    x_lo = downsample(x, D.resolution)
    z, y = encode_images(G, D, x, class_, steps, prompt)
    rec = G(z, y).clamp(-1, 1)  # an image: PSNRs are those of the written PNG
    up = torch.nn.functional.interpolate(x_lo, size=x.shape[-2:], mode="nearest")
    numbers = {**named(y, prompt), "teacher_res": D.resolution, "full_res": G.resolution,
               "psnr_teacher_res": float(psnr(downsample(rec, D.resolution), x_lo)[0]),
               "psnr_full_res": float(psnr(rec, x)[0])}
    return ToolOutput(numbers, rec[0], [x, up, rec])


def invert_image(image: str, checkpoint: str = "runs/demo", teacher: str | None = None, class_: int | None = None,
                 out: str = "inverted", steps: int = 40, prompt: str | None = None) -> dict:
    """invert_result of an image file; writes the reconstruction, the side-by-side PNG and the PSNRs' JSON."""
    G, D = load_models(checkpoint, teacher)
    x_full = read_image(image, G.resolution, G.channels)  # any mode/size/aspect -> model channels, ADM crop
    r = invert_result(G, D, x_full, class_, steps, prompt)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(image).stem
    rec_path = out_dir / f"{stem}_reconstruction.png"
    sbs_path = out_dir / f"{stem}_side_by_side.png"
    tensor_to_pil(r.image).save(rec_path)
    r.side_by_side().save(sbs_path)
    result = {"image": str(image), **r.numbers, "reconstruction": str(rec_path), "side_by_side": str(sbs_path)}
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
