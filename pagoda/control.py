"""Inverse problems and control with the one-step generator: super-resolution, class transfer, interpolation,
inpainting, the applications the PaGoDA paper shows for its encoder + one-step decoder.

Each starts from z = E(↓x, y) (pagoda.inference.encode_images: the teacher's PF-ODE at its resolution R, y given
or the class that reconstructs best) and decodes with G at G's resolution. Each `*_result` works on tensors and
returns a ToolOutput (numbers, result image, side-by-side panels; `pagoda serve` calls these); the file functions
read the images, call it, and write the result, the side-by-side PNG and a JSON of the numbers into `out`
(`_save`); `summary_line` is the line each command prints. docs/method.md §7 says why inpainting optimises z.

    pagoda superres low.png --reference high.png     # -> superres
    pagoda edit shirt.png --to-class 3                # -> edit_image (a text run: --to-prompt "green heart")
    pagoda interpolate a.png b.png --steps 8          # -> interpolate
    pagoda inpaint shirt.png --mask mask.png          # -> inpaint
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pagoda.images import downsample, load_mask, resample, tensor_to_pil
from pagoda.decoder import Generator
from pagoda.encoder import psnr
from pagoda.inference import ToolOutput, encode_images, load_models, read_image
from pagoda.io import save_json
from pagoda.prompts import check_condition, condition, named, rows


def _save(out: str, stem: str, name: str, r: ToolOutput, paths: dict) -> dict:
    """Write OUT/stem_name.png (the result), OUT/stem_name_side_by_side.png (panels, ×scale) and OUT/stem_name.json
    (the input `paths` and the numbers)."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, sbs = out_dir / f"{stem}_{name}.png", out_dir / f"{stem}_{name}_side_by_side.png"
    tensor_to_pil(r.image).save(path)
    r.side_by_side().save(sbs)
    result = {**paths, **r.numbers, "output": str(path), "side_by_side": str(sbs)}
    save_json(result, out_dir / f"{stem}_{name}.json")
    return result


@torch.no_grad()
def superres_result(G: Generator, D, x_lo: torch.Tensor, class_: int | None = None, steps: int = 40,
                    reference: torch.Tensor | None = None, prompt: str | None = None) -> ToolOutput:
    """x_lo (1×C×R×R, the teacher resolution R) -> G(E(x_lo, y), y) at G's resolution: one encode, one G call (y:
    encode_images'); with `reference` (1×C×H×H at G's resolution), PSNR against it of G's output and of bicubic."""
    z, y = encode_images(G, D, x_lo, class_, steps, prompt)
    sr = G(z, y).clamp(-1, 1)
    bicubic = resample(x_lo, G.resolution)
    numbers = {**named(y, prompt), "teacher_res": D.resolution, "full_res": G.resolution,
               "psnr_teacher_res": float(psnr(downsample(sr, D.resolution), x_lo)[0])}
    panels = [F.interpolate(x_lo, size=sr.shape[-2:], mode="nearest"), bicubic, sr]
    if reference is not None:
        numbers.update(psnr=float(psnr(sr, reference)[0]), psnr_bicubic=float(psnr(bicubic, reference)[0]))
        panels.append(reference)
    return ToolOutput(numbers, sr[0], panels)


def superres(image: str, checkpoint: str = "runs/demo", teacher: str | None = None, class_: int | None = None,
             reference: str | None = None, out: str = "superres", steps: int = 40, prompt: str | None = None) -> dict:
    """superres_result of an image file (any size: ADM resize to the teacher resolution), written by _save."""
    G, D = load_models(checkpoint, teacher)
    ref = None if reference is None else read_image(reference, G.resolution, G.channels)
    r = superres_result(G, D, read_image(image, D.resolution, D.channels), class_, steps, ref, prompt)
    paths = {"image": str(image), **({"reference": str(reference)} if reference is not None else {})}
    return _save(out, Path(image).stem, "superres", r, paths)


@torch.no_grad()
def edit_result(G: Generator, D, x: torch.Tensor, to_class: int | None = None, class_: int | None = None,
                steps: int = 40, prompt: str | None = None, to_prompt: str | None = None) -> ToolOutput:
    """Class transfer: z = E(↓x, y) under the image's class y (given or best), decoded as G(z, to_class); a text
    model: encoded under the caption `prompt` (default the empty caption: an unconditional encode), decoded under
    `to_prompt`."""
    text = getattr(G, "text_encoder", None) is not None
    if G.unet.config.num_classes is None and not text:
        raise ValueError("this generator is unconditional: class transfer needs a class-conditional run")
    check_condition(G, class_, None if prompt is None else [prompt])  # the source, then the target
    check_condition(G, to_class, None if to_prompt is None else [to_prompt])
    if (to_prompt if text else to_class) is None:
        raise ValueError('pass --to-prompt "green heart" (a text model)' if text else "pass --to-class N")
    z, y = encode_images(G, D, x, class_, steps, prompt)
    target = condition(G, len(x), to_class, to_prompt) if text else torch.full_like(y, to_class)
    rec, edited = G(z, y).clamp(-1, 1), G(z, target).clamp(-1, 1)
    numbers = {**named(y, prompt), **({"to_prompt": to_prompt} if text else {"to_class": to_class}),
               "psnr_reconstruction": float(psnr(rec, x)[0]), "psnr_edit_vs_input": float(psnr(edited, x)[0]),
               "psnr_edit_vs_reconstruction": float(psnr(edited, rec)[0])}
    return ToolOutput(numbers, edited[0], [x, rec, edited])


def edit_image(image: str, to_class: int | None, checkpoint: str = "runs/demo", teacher: str | None = None,
               class_: int | None = None, out: str = "edited", steps: int = 40, prompt: str | None = None,
               to_prompt: str | None = None) -> dict:
    """edit_result of an image file, written by _save (OUT/STEM_toN.*, or STEM_to_prompt.* for a text model)."""
    G, D = load_models(checkpoint, teacher)
    r = edit_result(G, D, read_image(image, G.resolution, G.channels), to_class, class_, steps, prompt, to_prompt)
    return _save(out, Path(image).stem, "to_prompt" if to_prompt is not None else f"to{to_class}", r,
                 {"image": str(image)})


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two latents at times t (T,): slerp of z/σ_max, times σ_max (σ_max cancels: the
    coefficients sin((1−t)θ)/sin θ, sin(tθ)/sin θ only see the angle θ); t = 0 gives a and t = 1 gives b exactly."""
    theta = torch.arccos(F.cosine_similarity(a.flatten(), b.flatten(), dim=0).clamp(-1, 1))
    t = t.reshape(-1, *[1] * a.ndim).to(a.dtype)
    if theta < 1e-4:  # (anti)parallel: the straight line
        return (1 - t) * a + t * b
    return torch.sin((1 - t) * theta) / torch.sin(theta) * a + torch.sin(t * theta) / torch.sin(theta) * b


@torch.no_grad()
def interpolate_result(G: Generator, D, x: torch.Tensor, frames: int = 8, class_: int | None = None, steps: int = 40,
                       prompt: str | None = None) -> ToolOutput:
    """Frames G(slerp(z_a, z_b, t), y_t), t = 0 … 1, z = E(↓x, y) of the two images x (2×C×H×H) under each one's
    class (or `class_`; a text model: both under `prompt`, default the empty caption). Different classes:
    y_t = (1 − t)·onehot(y_a) + t·onehot(y_b), soft labels (the UNet embeds a label row as its weighted mix of class
    embeddings). The end frames are the two reconstructions, exactly."""
    if frames < 2:
        raise ValueError(f"--steps {frames}: an interpolation needs at least 2 frames")
    z, y = encode_images(G, D, x, class_, steps, prompt)
    t = torch.linspace(0, 1, frames)
    zt = slerp(z[0], z[1], t)
    if not torch.is_tensor(y) or y[0] == y[1]:  # one condition for every frame (None, one class, one prompt)
        yt = lambda k: rows(y, slice(0, 1))  # noqa: E731
    else:
        onehot = F.one_hot(y, G.unet.config.num_classes).float()
        mix = (1 - t)[:, None] * onehot[0] + t[:, None] * onehot[1]
        yt = lambda k: mix[k:k + 1]  # noqa: E731
    # one frame per call: a frame's pixels do not depend on how many frames there are
    xt = torch.cat([G(zt[k:k + 1], yt(k)) for k in range(frames)]).clamp(-1, 1)
    rec = torch.cat([G(z[k:k + 1], rows(y, slice(k, k + 1))) for k in range(2)]).clamp(-1, 1)
    said = named(y, prompt) if not torch.is_tensor(y) else {"labels": [int(y[0]), int(y[1])]}
    numbers = {**said, "frames": frames, "psnr_reconstruction": [float(p) for p in psnr(rec, x)]}
    strip = xt.permute(1, 2, 0, 3).reshape(1, xt.shape[1], xt.shape[2], -1)[0]  # C × H × (frames·W)
    return ToolOutput(numbers, strip, [x[:1], *xt.split(1), x[1:]])


def interpolate(a: str, b: str, frames: int = 8, checkpoint: str = "runs/demo", teacher: str | None = None,
                class_: int | None = None, out: str = "interpolated", steps: int = 40, prompt: str | None = None) -> dict:
    """interpolate_result of two image files, written by _save."""
    G, D = load_models(checkpoint, teacher)
    x = torch.cat([read_image(p, G.resolution, G.channels) for p in (a, b)])
    r = interpolate_result(G, D, x, frames, class_, steps, prompt)
    return _save(out, f"{Path(a).stem}_{Path(b).stem}", "interpolation", r, {"images": [str(a), str(b)]})


def blur_fill(x: torch.Tensor, m: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """Baseline fill of the hole (m = 0) from its border: coarse to fine over 2× pyramids, at each level `iters`
    Jacobi sweeps of 3×3 means (≈ the harmonic fill); known pixels are kept exactly."""
    if x.shape[-1] % 2 == 0 and x.shape[-1] > 4:
        ms = F.avg_pool2d(m, 2)
        coarse = blur_fill(F.avg_pool2d(x * m, 2) / ms.clamp_min(1e-8), (ms > 0).float(), iters)
        y = F.interpolate(coarse, scale_factor=2, mode="nearest")
    else:
        y = ((x * m).sum((-2, -1), keepdim=True) / m.sum((-2, -1), keepdim=True).clamp_min(1)).expand_as(x)
    for _ in range(iters):
        y = m * x + (1 - m) * F.avg_pool2d(F.pad(m * x + (1 - m) * y, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return m * x + (1 - m) * y


def hole_psnr(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, images in [−1, 1]) over the hole pixels (m = 0) only."""
    h = (1 - m).expand_as(a)
    mse = ((a.float() - b.float()) ** 2 * h).flatten(1).sum(1) / h.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def inpaint_images(G: Generator, D, x: torch.Tensor, m: torch.Tensor, class_: int | None = None, iters: int = 50,
                   lr: float = 0.05, steps: int = 40, prompt: str | None = None):
    """(m ⊙ x + (1 − m) ⊙ G(z*, y), y): z* = argmin_z ½‖m ⊙ (G(z, y) − x)‖² + ½‖z/σ_max‖² (MAP under the
    latent prior N(0, σ_max² I)), Adam(lr) for `iters` steps from z₀ = E(↓blur_fill(x), y), y = `class_` or the
    best class of the filled image (a text model: `prompt`'s embedding, encode_images'). Known pixels (m = 1) come out
    exactly as given."""
    z, y = encode_images(G, D, blur_fill(x, m), class_, steps, prompt)
    u = (z / G.sigma_max).requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            loss = ((m * (G(G.sigma_max * u, y) - x)).square().sum() + u.square().sum()) / 2  # images independent
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return m * x + (1 - m) * G(G.sigma_max * u, y).clamp(-1, 1), y


def inpaint_result(G: Generator, D, x: torch.Tensor, m: torch.Tensor, class_: int | None = None, iters: int = 50,
                   steps: int = 40, mask_name: str = "the mask", prompt: str | None = None) -> ToolOutput:
    """inpaint_images of one image x (1×C×H×H) and mask m (1×1×H×H, 1 = known) at G's resolution; PSNRs over the
    hole are against the input's own pixels there (meaningful when the input is complete)."""
    if m.min() == 1 or m.max() == 0:
        raise ValueError(f"{mask_name} is all {'white' if m.min() == 1 else 'black'} at {G.resolution}px: paint the "
                         f"hole black and the pixels to keep white")
    filled, y = inpaint_images(G, D, x, m, class_, iters, steps=steps, prompt=prompt)
    blurred = blur_fill(x, m)
    numbers = {**named(y, prompt), "resolution": G.resolution, "hole_fraction": float(1 - m.mean()), "iters": iters,
               "psnr_hole": float(hole_psnr(filled, x, m)[0]), "psnr_hole_blur_fill": float(hole_psnr(blurred, x, m)[0])}
    return ToolOutput(numbers, filled[0], [m * x, blurred, filled, x])


def inpaint(image: str, mask: str, checkpoint: str = "runs/demo", teacher: str | None = None,
            class_: int | None = None, out: str = "inpainted", iters: int = 50, steps: int = 40,
            prompt: str | None = None) -> dict:
    """Fill the black pixels of `mask` (any size: nearest-resized to G's resolution) in `image` by inpaint_result."""
    G, D = load_models(checkpoint, teacher)
    x = read_image(image, G.resolution, G.channels)
    r = inpaint_result(G, D, x, load_mask(mask, G.resolution)[None], class_, iters, steps, str(mask), prompt)
    return _save(out, Path(image).stem, "inpainted", r, {"image": str(image), "mask": str(mask)})


# ---- the one line each command prints ------------------------------------------------------------

def _on(r: dict) -> str:
    """The condition a result was decoded under: 'class 3' or 'prompt "red apple"' ("" = the null caption)."""
    return f"prompt {r['prompt']!r}" if "prompt" in r else f"class {r['label']}"


SUMMARIES = {
    "invert": lambda r: f"{_on(r)}  PSNR {r['psnr_teacher_res']:.2f} dB at {r['teacher_res']}px, "
                        f"{r['psnr_full_res']:.2f} dB at {r['full_res']}px",
    "superres": lambda r: f"{_on(r)}  {r['teacher_res']}px -> {r['full_res']}px" + (
        f", PSNR {r['psnr']:.2f} dB vs bicubic {r['psnr_bicubic']:.2f} dB" if "psnr" in r else ""),
    "edit": lambda r: f"{_on(r)} -> " + (f"prompt {r['to_prompt']!r}" if "to_prompt" in r else str(r["to_class"]))
                      + f"  PSNR vs input {r['psnr_edit_vs_input']:.2f} dB (reconstruction "
                        f"{r['psnr_reconstruction']:.2f} dB)",
    "interpolate": lambda r: (_on(r) if "prompt" in r else f"classes {r['labels'][0]} -> {r['labels'][1]}")
                             + f"  {r['frames']} frames",
    "inpaint": lambda r: f"{_on(r)}  hole {100 * r['hole_fraction']:.0f}%  PSNR in the hole "
                         f"{r['psnr_hole']:.2f} dB (blur fill {r['psnr_hole_blur_fill']:.2f} dB)",
}


def summary_line(tool: str, numbers: dict) -> str:
    """The numbers of a tool's result as the one line `pagoda TOOL` prints (and the page of `pagoda serve` shows)."""
    return SUMMARIES[tool](numbers)
