"""The training loops: the diffusion teacher (stage 1) and PaGoDA's generator stages (2 and 3).

    pagoda teacher train                     # Fashion-MNIST teacher at 8x8 (CPU, minutes)
    pagoda train                             # the whole method on Fashion-MNIST: teacher 8 -> G 8 -> 16 -> 32
    pagoda train --res 128 --data DIR --teacher edm_imagenet64_ema.pt --preset imagenet64 --gpus 8

Every random draw of step k comes from a generator seeded by (seed, stage, k), so data order, noise
and augmentation are a pure function of the step: `--resume` after a kill continues bit-identically,
and a global batch is the same whether it is computed by one rank or split over several.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pagoda import dist
from pagoda.data import make_dataset, save_image_grid
from pagoda.io import CheckpointError, load_checkpoint, save_checkpoint, save_json
from pagoda.solvers import karras_sigmas, solve
from pagoda.teacher import Denoiser, edm_loss
from pagoda.unet import PRESETS as UNET_PRESETS, UNet, UNetConfig


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, bad state); the message names the step and what to do."""


# --------------------------------------------------------------------------------------------------
# Shared pieces


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *keys): counter-based randomness, so resume is exact."""
    s = seed
    for k in keys:
        s = (s * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


class EMA:
    """Exponential moving average of a module's floating-point state (θ_ema ← d θ_ema + (1−d) θ)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int | None = None) -> None:
        """One EMA step; with `step`, the decay warms up as min(d, (1+step)/(10+step)) (short runs)."""
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.state_dict().values(), module.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p, 1 - d)
            else:
                e.copy_(p)


def check_finite(step: int, **losses: float) -> None:
    """Stop with a one-line error naming the step and the loss when a loss is NaN/inf."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        name, val = next(iter(bad.items()))
        raise TrainingError(f"loss {name} = {val} at step {step}: training diverged; the last good checkpoint is kept "
                            f"(lower the learning rate, then rerun with --resume)")


def batch_of(dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels for data-set indices (tensor data sets are indexed directly)."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        return dataset.images[idx], torch.as_tensor(dataset.labels)[idx]
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def progress_bar(enabled: bool):
    """A rich progress bar (or a silent stand-in)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)


def fixed_labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    """Grid labels: 0, 1, ..., C−1, 0, 1, ... (one class per column of a C-wide grid)."""
    return None if not num_classes else torch.arange(n) % num_classes


# --------------------------------------------------------------------------------------------------
# Stage 1: the teacher


@dataclass
class TeacherConfig:
    """`pagoda teacher train`: EDM teacher on low-resolution data."""

    data: str = "fashion-mnist"  # 'fashion-mnist', an image folder, or an EDM .zip
    resolution: int = 8  # teacher resolution (data downsampled the ADM way)
    unet: str = "demo8"  # UNet preset (pagoda.unet.PRESETS)
    steps: int = 1200  # optimiser steps
    batch: int = 128
    lr: float = 2e-3  # Adam learning rate (with warm-up over the first 200 steps)
    ema: float = 0.999  # EMA decay of the weights used for sampling
    label_dropout: float = 0.1  # drop the class with this probability (classifier-free guidance later)
    grid_every: int = 500  # write a sample grid every N steps (and at the end)
    ckpt_every: int = 500  # write a resumable checkpoint every N steps (and at the end)
    sample_steps: int = 18  # Heun grid points for the grids (35 NFE)
    seed: int = 0


TEACHER_PRESETS = {
    "demo": TeacherConfig(),  # ~10 min on 2 CPU cores
    "tiny": TeacherConfig(unet="tiny", steps=60, batch=64, grid_every=60, ckpt_every=30, sample_steps=6),
}


@torch.no_grad()
def teacher_sample(denoiser, z: torch.Tensor, labels=None, steps: int = 18, method: str = "heun") -> torch.Tensor:
    """x0 = PF-ODE solve from z ~ N(0, σ_max²) on a Karras grid of `steps` points plus a final 0."""
    sigmas = torch.cat([karras_sigmas(steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    return solve(denoiser, z, sigmas, method, labels).clamp(-1, 1)


def teacher_checkpoint(denoiser: Denoiser, **extra) -> dict:
    return {"kind": "teacher", "unet_config": denoiser.unet.config.to_dict(), "sigma_data": denoiser.sigma_data,
            "c_noise": denoiser.c_noise, "ema": denoiser.state_dict(), **extra}


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> Denoiser:
    """A teacher checkpoint of ours, or a raw ADM state dict (e.g. edm_imagenet64_ema.pt), as a Denoiser."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("kind") == "teacher":
        cfg = UNetConfig.from_dict(ckpt["unet_config"])
        D = Denoiser(UNet(cfg), ckpt.get("sigma_data", 0.5), ckpt.get("c_noise", "adm"))
        D.load_state_dict(ckpt["ema"])
        return D.to(device).eval().requires_grad_(False)
    if isinstance(ckpt.get("kind"), str):  # e.g. a generator: it has its teacher's UNet keys, would load silently
        raise CheckpointError(f"{path} is a {ckpt['kind']!r} checkpoint, not a teacher: pass RUN/teacher/teacher.pt "
                              f"or an ADM state dict")
    sd = ckpt.get("state_dict", ckpt)
    sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items() if torch.is_tensor(v)}
    for name, cfg in UNET_PRESETS.items():
        with torch.device("meta"):
            ref = UNet(cfg).state_dict()
        if ref.keys() == sd.keys() and all(ref[k].shape == sd[k].shape for k in ref):
            unet = UNet(cfg)
            unet.load_state_dict(sd, strict=True)
            return Denoiser(unet).to(device).eval().requires_grad_(False)
    kind = ckpt.get("kind", "a raw state dict")
    raise CheckpointError(f"{path} is {kind} that matches no teacher architecture (pagoda teacher checkpoint or an "
                          f"ADM state dict of a known preset: {', '.join(UNET_PRESETS)}); pass a teacher checkpoint")


def train_teacher(cfg: TeacherConfig, out: str | Path, progress: bool = True, device: str = "auto") -> Path:
    """Train the EDM teacher; resumes from out/checkpoint.pt; returns out/teacher.pt (EMA weights)."""
    out = Path(out)
    final = out / "teacher.pt"
    if final.exists():
        return final
    dev = dist.pick_device(device)
    data = make_dataset(cfg.data, cfg.resolution)
    unet_cfg = replace(UNET_PRESETS[cfg.unet], resolution=cfg.resolution, in_channels=data.channels,
                       out_channels=data.channels, num_classes=getattr(data, "num_classes", None))
    torch.manual_seed(cfg.seed)
    D = Denoiser(UNet(unet_cfg)).to(dev)
    opt = torch.optim.Adam(D.parameters(), lr=cfg.lr)
    ema, step = EMA(D, cfg.ema), 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=dev)
        if ck.get("config") != asdict(cfg):
            raise CheckpointError(f"{ckpt_path} was trained with another config; use another --out or delete it")
        D.load_state_dict(ck["model"]), ema.module.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        step = ck["step"]
    save_json({"teacher": asdict(cfg), "unet": unet_cfg.to_dict()}, out / "config.json")
    n_grid = 10 * (data.num_classes or 10) if getattr(data, "num_classes", None) else 64
    zg = 80.0 * torch.randn(n_grid, data.channels, cfg.resolution, cfg.resolution, generator=step_generator(cfg.seed, 7))
    yg = fixed_labels(n_grid, getattr(data, "num_classes", None))

    def save(step):
        save_checkpoint({"config": asdict(cfg), "step": step, "model": D.state_dict(), "ema": ema.module.state_dict(),
                         "opt": opt.state_dict()}, ckpt_path)

    def grid(step):
        x = teacher_sample(ema.module, zg.to(dev), None if yg is None else yg.to(dev), cfg.sample_steps)
        save_image_grid(x, out / f"grid-{step:06d}.png", nrow=10 if yg is not None else None, scale=4)

    log = (out / "metrics.jsonl").open("a")
    t0, c0, seen, start = time.perf_counter(), time.process_time(), 0, step
    with progress_bar(progress) as bar:
        task = bar.add_task("teacher", total=cfg.steps, completed=step, info="")
        while step < cfg.steps:
            dist.fault_hook(dist.DistInfo(), "teacher", step)  # no-op unless PAGODA_TEST_FAULT is set
            g = step_generator(cfg.seed, 1, step)
            idx = torch.randint(0, len(data), (cfg.batch,), generator=g)
            x, y = batch_of(data, idx)
            x = torch.where(torch.rand(cfg.batch, 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)  # flip augmentation
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / 200)
            loss = edm_loss(D, x.to(dev), y.to(dev) if unet_cfg.num_classes else None,
                            label_dropout=cfg.label_dropout, generator=g if dev.type == "cpu" else  # noise: f(seed, step)
                            torch.Generator(dev).manual_seed(step_generator(cfg.seed, 2, step).initial_seed())).mean()
            check_finite(step, loss=loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(D, step)
            step, seen = step + 1, seen + cfg.batch
            ips = seen / (time.perf_counter() - t0)
            bar.update(task, completed=step, info=f"loss {loss.item():.4f}  {ips:.0f} img/s")
            log.write(json.dumps({"step": step, "loss": loss.item(), "img_per_s": ips}) + "\n")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                log.flush()
                save(step)
            if step % cfg.grid_every == 0 or step == cfg.steps:
                grid(step)
    log.close()
    dt = time.perf_counter() - t0
    save_json({"seconds": dt, "cpu_seconds": time.process_time() - c0, "steps": cfg.steps - start,
               "img_per_s": seen / max(dt, 1e-9)}, out / "timing.json")
    save_checkpoint(teacher_checkpoint(ema.module, data=cfg.data, steps=cfg.steps), final)
    return final


# --------------------------------------------------------------------------------------------------
# Stages 2 and 3: the one-step generator, distilled at the teacher resolution, then grown


@dataclass
class TrainConfig:
    """`pagoda train`: the whole method, teacher to grown generator, in one run directory."""

    out: str = "runs/demo"  # run directory (see DESIGN.md: teacher/, latents/, stage-XX/, report)
    data: str = "fashion-mnist"  # 'fashion-mnist', an image folder, or an EDM .zip
    res: int = 32  # target resolution: teacher_res * 2^k
    teacher: str | None = None  # teacher checkpoint; None = train one first (teacher_preset)
    teacher_preset: str = "demo"  # TEACHER_PRESETS name, used when no teacher is given
    preset: str = "demo"  # growth preset (pagoda.grow.PRESETS): steps, batches, lrs, λ, fade-in per stage
    encode_images: int | None = None  # data-set images to encode (each also flipped); None = preset's, 0 = all
    encode_steps: int | None = None  # encoder Karras grid points; None = preset's (paper: 40 -> 78 NFE, Heun)
    encode_method: str = "heun"
    distance: str | None = None  # reconstruction distance (None = the preset's / losses.DEFAULT_DISTANCE)
    discriminator: str = "multiscale"  # 'multiscale' (offline default) or 'projected' (needs weights)
    augment: str = "color,translation,cutout"  # DiffAugment policy for D inputs ('' = none)
    distill: float = 0.0  # weight of the distillation loss d(G(z), ODE_teacher(z)) (paper's ablation)
    ckpt_every: int = 100  # resumable checkpoint every N steps
    grid_every: int = 0  # extra grids every N steps (0 = only at the end of a stage)
    seed: int = 0
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    accumulate: int = 1  # gradient accumulation: per-rank batch = global batch / (ranks * accumulate)
    max_stages: int | None = None  # stop after this many stages (tests, smoke runs)


def run_layout(out: Path) -> dict[str, Path]:
    return {"teacher": out / "teacher", "latents": out / "latents", "config": out / "config.json"}


def train(cfg: TrainConfig, progress: bool = True, info: dist.DistInfo | None = None) -> Path:
    """Teacher (load or train) → latent cache (build if absent) → one stage per resolution; returns the run dir."""
    from pagoda.decoder import Generator
    from pagoda.encoder import Encoder, LatentStore, build_latent_cache
    from pagoda.grow import get_preset, plan_stages, stage_dir_name
    from pagoda.stage import StageTrainer

    info = info or dist.init(cfg.device)
    out = Path(cfg.out)
    lay = run_layout(out)
    # 1. Teacher
    teacher_path = Path(cfg.teacher) if cfg.teacher else lay["teacher"] / "teacher.pt"
    if cfg.teacher is None and not teacher_path.exists():
        if cfg.teacher_preset not in TEACHER_PRESETS:
            raise ValueError(f"unknown teacher preset {cfg.teacher_preset!r}: use one of {', '.join(TEACHER_PRESETS)}")
        plan_stages(TEACHER_PRESETS[cfg.teacher_preset].resolution, cfg.res, cfg.preset)  # bad --res: fail before training
        if info.is_main:
            tcfg = replace(TEACHER_PRESETS[cfg.teacher_preset], data=cfg.data)
            train_teacher(tcfg, lay["teacher"], progress=progress, device=cfg.device)
        dist.barrier(info)
    teacher = load_teacher(teacher_path, info.device)
    t_res = teacher.resolution
    stages = plan_stages(t_res, cfg.res, cfg.preset)
    data = make_dataset(cfg.data, cfg.res, channels=teacher.channels)
    if data.channels != teacher.channels:
        raise ValueError(f"the data has {data.channels} channels but the teacher {teacher.channels}: pass matching --data")
    # 2. Latent cache: image and flip, encoded once (split across ranks)
    grow = get_preset(cfg.preset)
    n_enc = grow.encode_images if cfg.encode_images is None else cfg.encode_images
    encoder = Encoder(teacher, t_res, steps=cfg.encode_steps or grow.encode_steps, method=cfg.encode_method)
    encoded, t0, c0 = [0], time.perf_counter(), time.process_time()

    def on_batch(done: int, total: int, ips: float) -> None:
        encoded[0] = done
        bar.update(task, completed=done, total=total, info=f"{ips:.0f} img/s")
    with progress_bar(progress and info.is_main) as bar:
        task = bar.add_task("encode", total=None, info="")
        build_latent_cache(encoder, data, lay["latents"], n_enc or None, rank=info.rank,
                           world_size=info.world_size, progress=on_batch)
    dist.barrier(info)
    if info.is_main and encoded[0]:  # this build's cost (rank 0's share; a resumed build counts what it encoded)
        dt = time.perf_counter() - t0
        save_json({"seconds": dt, "cpu_seconds": time.process_time() - c0, "images": encoded[0], "flips": True,
                   "img_per_s": encoded[0] / max(dt, 1e-9)}, lay["latents"] / "timing.json")
    z = LatentStore(lay["latents"])  # memory-mapped: every rank reads only the entries it draws
    idx = z.indices
    if info.is_main:  # written once the inputs proved usable: a refused run leaves the old config.json
        save_json({"train": asdict(cfg), "teacher": teacher.unet.config.to_dict(),
                   "stages": [asdict(s) for s in stages]}, lay["config"])
    # 3. Stages
    G = None
    for k, stage in enumerate(stages[: cfg.max_stages]):
        sdir = out / stage_dir_name(stage.resolution)
        if (sdir / "generator.pt").exists():  # a finished stage is never redone
            G = Generator.from_checkpoint(sdir / "generator.pt", map_location=info.device)
            continue
        G = StageTrainer(cfg, stage, k, teacher, G, data, z, idx, sdir, info).run(progress)
    dist.barrier(info)
    if info.is_main:  # 4. The run report (RUN/report.html, report.md): a failure there only warns
        try:
            from pagoda.report import write_report
            write_report(out)
        except Exception as e:  # noqa: BLE001 - training is done and saved; never fail it over the report
            import warnings
            warnings.warn(f"run report not written ({type(e).__name__}: {e}); retry with `pagoda report {out}`", stacklevel=2)
    return out
