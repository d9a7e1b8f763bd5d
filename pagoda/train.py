"""The training jobs: the diffusion teacher (stage 1) and the whole pipeline (teacher → latent cache → stages).

    pagoda teacher train                     # Fashion-MNIST teacher at 8x8 (CPU, minutes)
    pagoda train                             # the whole method on Fashion-MNIST: teacher 8 -> G 8 -> 16 -> 32
    pagoda train --res 128 --data DIR --teacher edm_imagenet64_ema.pt --preset imagenet64 --gpus 8
    pagoda train --data emoji --res 64 --preset emoji   # text to image: 8-px text teacher, G grown 8 -> 64

Captioned data (`dataset.captions`, e.g. --data emoji) trains a text teacher: UNet `text_dim` = the encoder's width,
the text encoder (`--text-encoder`: 'builtin', trained jointly, or 't5:PATH', frozen) a submodule of the Denoiser,
captions dropped to the empty (null) caption with `label_dropout`, no flips (pagoda/text.py has the interface).

    pagoda train --data emoji --res 64 --preset emoji --text-encoder t5:/models/t5-small   # a frozen local T5

Every random draw of step k comes from a generator seeded by (seed, stage, k) (pagoda/loop.py), so
`--resume` after a kill continues bit-identically. The run directory's layout is pagoda/rundir.py's.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pagoda import dist
from pagoda.data import default_workers, loader, make_dataset
from pagoda.images import save_image_grid
from pagoda.decoder import Generator
from pagoda.encoder import Encoder, LatentPairs, LatentStore, build_latent_cache
from pagoda.grow import StageConfig, get_preset, plan_stages
from pagoda.io import load_state, save_checkpoint, save_json
from pagoda.loop import EMA, LoopSpec, TIMING_FILE, check_finite, index_labels, progress_bar, run_loop, step_generator
from pagoda.rundir import CHECKPOINT_FILE, CONFIG_FILE, GENERATOR_FILE, TEACHER_FILE, RunDir, grid_name, is_finished
from pagoda.solvers import HEUN_POINTS, sample
from pagoda.stage import RunSpec, StageTrainer
from pagoda.teacher import Denoiser, edm_loss, load_teacher, teacher_checkpoint
from pagoda.text import canonical_spec, drop_captions, make_text_encoder
from pagoda.unet import PRESETS as UNET_PRESETS, UNet, UNetConfig


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
    label_dropout: float = 0.1  # drop the class (or caption) with this probability (classifier-free guidance later)
    text_encoder: str = "builtin"  # captioned data: 'builtin' (trained with the teacher) or 't5:PATH' (frozen); else unused
    grid_every: int = 500  # write a sample grid every N steps (and at the end)
    ckpt_every: int = 500  # write a resumable checkpoint every N steps (and at the end)
    sample_steps: int = HEUN_POINTS  # Heun grid points of the grids (35 NFE)
    seed: int = 0


OLD_TEACHER_KEYS = {"model": "teacher", "ema": "teacher_ema", "opt": "opt_teacher"}  # checkpoint.pt before docs/checkpoints.md

TEACHER_PRESETS = {
    "demo": TeacherConfig(),  # ~10 min on 2 CPU cores
    "demo32": TeacherConfig(resolution=32, unet="demo32"),  # the demo's recipe at 32 px (bench/pipeline_cost.py)
    "tiny": TeacherConfig(unet="tiny", steps=60, batch=64, grid_every=60, ckpt_every=30, sample_steps=6),
    "emoji": TeacherConfig(data="emoji", unet="emoji8", steps=1000, batch=64, lr=1e-3),  # text teacher, ≈ 13 min
}


def teacher_network(cfg: TeacherConfig, data) -> Denoiser:
    """The untrained teacher of `cfg` for `data`: channels and classes from the data; captioned data gets a text
    teacher, UNet text_dim = the width of the encoder `cfg.text_encoder` names (its `text_encoder` submodule)."""
    text_encoder = make_text_encoder(cfg.text_encoder) if getattr(data, "captions", None) else None
    unet_cfg = replace(UNET_PRESETS[cfg.unet], resolution=cfg.resolution, in_channels=data.channels,
                       out_channels=data.channels, num_classes=getattr(data, "num_classes", None),
                       text_dim=text_encoder and text_encoder.width)
    return Denoiser(UNet(unet_cfg), text_encoder=text_encoder)


def check_text_data(spec: str | None, data: str, resolution: int) -> None:
    """A --text-encoder given (not None) for data without captions: a one-line error naming the fix."""
    if spec is not None and not getattr(make_dataset(data, resolution), "captions", None):
        raise ValueError(f"--text-encoder {spec}: the data {data} has no captions, so it trains no text encoder; "
                         f"fix: drop --text-encoder, or pass captioned data (--data emoji)")


def train_teacher(cfg: TeacherConfig, out: str | Path, progress: bool = True, device: str = "auto",
                  workers: int | None = None) -> Path:
    """Train the EDM teacher; resumes from out/checkpoint.pt; returns out/teacher.pt (EMA weights).
    `workers`: DataLoader processes for image files (None = data.default_workers)."""
    out = Path(out)
    final = out / TEACHER_FILE
    if final.exists():
        return final
    dev = dist.pick_device(device)
    data = make_dataset(cfg.data, cfg.resolution)
    ncls, captions = getattr(data, "num_classes", None), getattr(data, "captions", None)
    torch.manual_seed(cfg.seed)
    denoiser = teacher_network(cfg, data).to(dev)
    unet_cfg = denoiser.unet.config
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    ema, step = EMA(denoiser, cfg.ema), 0
    ckpt_path = out / CHECKPOINT_FILE
    if ckpt_path.exists():
        ck = load_state(ckpt_path, cfg, dev, renamed=OLD_TEACHER_KEYS)
        denoiser.load_state_dict(ck["teacher"]), ema.module.load_state_dict(ck["teacher_ema"])
        opt.load_state_dict(ck["opt_teacher"])
        step = ck["step"]
    save_json({"teacher": asdict(cfg), "unet": unet_cfg.to_dict()}, out / CONFIG_FILE)
    n_grid = 10 * (ncls or 10) if ncls else 64
    zg = denoiser.sigma_max * torch.randn(n_grid, data.channels, cfg.resolution, cfg.resolution,
                                   generator=step_generator(cfg.seed, 7))
    yg = index_labels(0, n_grid, ncls)
    grid_captions = captions and [captions[i * len(captions) // n_grid] for i in range(n_grid)]  # spread over the set

    def draw(g: torch.Generator) -> torch.Tensor:  # the first draw of step k's generator: the batch's indices
        return torch.randint(0, len(data), (cfg.batch,), generator=g)
    workers = workers if workers is not None else default_workers(data)
    batches = loader(data, (draw(step_generator(cfg.seed, 1, k)).tolist() for k in range(step, cfg.steps)), workers)

    def train_step() -> dict[str, float]:
        nonlocal step
        dist.fault_hook(dist.DistInfo(), "teacher", step)  # no-op unless PAGODA_TEST_FAULT is set
        g = step_generator(cfg.seed, 1, step)
        draw(g)  # read ahead by the loader; drawn again so that g continues from the same state
        x, y = next(batches)
        flip = torch.rand(cfg.batch, 1, 1, 1, generator=g) < 0.5  # flip augmentation (never for text data)
        x = torch.where(flip, x.flip(-1), x) if getattr(data, "hflip", True) else x
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 200)
        noise_g = g if dev.type == "cpu" else torch.Generator(dev).manual_seed(step_generator(cfg.seed, 2, step).initial_seed())
        if captions:  # the encoder trains with the UNet (a t5: one is frozen); dropped captions = the null ""
            y = denoiser.encode_text(drop_captions([captions[i] for i in y.tolist()], cfg.label_dropout, g))
        loss = edm_loss(denoiser, x.to(dev), (y if captions else y.to(dev)) if ncls or captions else None,
                        label_dropout=cfg.label_dropout, generator=noise_g).mean()  # noise: f(seed, step)
        check_finite(step, loss=loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(denoiser, step)
        step += 1
        return {"loss": loss.item()}

    def save() -> None:
        save_checkpoint({"step": step, "config": asdict(cfg), "teacher": denoiser.state_dict(),
                         "teacher_ema": ema.module.state_dict(), "opt_teacher": opt.state_dict()}, ckpt_path)

    def grid(k: int) -> None:
        T = ema.module
        y = T.encode_text(grid_captions) if captions else None if yg is None else yg.to(dev)
        x = sample(T, zg.to(dev), cfg.sample_steps, "heun", y, T.sigma_min, T.sigma_max)
        save_image_grid(x, out / grid_name(k), nrow=10 if yg is not None else None, scale=4)

    spec = LoopSpec("teacher", cfg.steps, cfg.batch, cfg.ckpt_every, every=cfg.grid_every, at_end=True)
    run_loop(train_step, save, spec, step, out, progress, grid)
    save_checkpoint(teacher_checkpoint(ema.module, data=cfg.data, steps=cfg.steps), final)
    return final


# --------------------------------------------------------------------------------------------------
# Stages 2 and 3: the one-step generator, distilled at the teacher resolution, then grown


@dataclass
class TrainConfig:
    """`pagoda train`: the whole method, teacher to grown generator, in one run directory."""

    out: str = "runs/demo"  # run directory (layout: pagoda/rundir.py)
    data: str = "fashion-mnist"  # 'fashion-mnist', an image folder, or an EDM .zip
    res: int = 32  # target resolution: teacher_res * 2^k
    teacher: str | None = None  # teacher checkpoint; None = train one first (teacher_preset)
    teacher_preset: str | None = None  # TEACHER_PRESETS name, used when no teacher is given; None = the growth preset's
    preset: str = "demo"  # growth preset (pagoda.grow.PRESETS): steps, batches, lrs, λ, fade-in per stage
    encode_images: int | None = None  # data-set images to encode (each also flipped); None = preset's, 0 = all
    encode_steps: int | None = None  # encoder Karras grid points; None = preset's (paper: 40 -> 78 NFE, Heun)
    encode_method: str = "heun"
    distance: str | None = None  # reconstruction distance (pagoda.losses); None = the preset's
    discriminator: str | None = None  # 'projected' (frozen EfficientNet-Lite0) or 'multiscale'; None = the preset's
    grow_width: str | None = None  # width schedule of the grown blocks (pagoda.grow.grow_widths); None = the preset's
    augment: str = "color,translation,cutout"  # DiffAugment policy for D inputs ('' = none)
    distill: float = 0.0  # weight β of the distillation loss d(G(z), ODE_teacher(z)) (paper's ablation; 0 = off)
    guidance_max: float = 0.0  # > 1: ω-conditioned G(z, y, ω), distilled from the guided teacher for ω ~ U[1, ω_max]
    guided_adv: bool = True  # with guidance_max: the adversarial fakes draw ω' ~ U[1, ω_max] too; False: ω' = 1
    ckpt_every: int = 100  # resumable checkpoint every N steps
    grid_every: int = 0  # extra grids every N steps (0 = only at the end of a stage)
    seed: int = 0
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    accumulate: int = 1  # gradient accumulation: per-rank batch = global batch / (ranks * accumulate)
    workers: int | None = None  # DataLoader processes per rank for image files; None = data.default_workers
    max_stages: int | None = None  # stop after this many stages (tests, smoke runs)
    steps: str | None = None  # generator steps per stage, e.g. '1000,400,350,300' (one per stage); None = the preset's
    max_steps: int | None = None  # cap every stage's generator steps (rehearsals, smoke runs); None = the preset's
    max_batch: int | None = None  # cap every stage's global batch (rehearsals on a CPU); None = the preset's
    # captioned data: the text encoder of the teacher the run trains, 'builtin' or 't5:PATH'; None = the teacher
    # preset's ('builtin'). A run on a given (or already trained) teacher uses that teacher's encoder: naming
    # another one is refused, not ignored (G would be trained on an encoder other than the one asked for).
    text_encoder: str | None = None


def teacher_preset(cfg: TrainConfig) -> TeacherConfig:
    """The teacher preset a run trains: --teacher-preset, else the growth preset's (GrowPreset.teacher_preset)."""
    name = cfg.teacher_preset or get_preset(cfg.preset).teacher_preset
    if name not in TEACHER_PRESETS:
        raise ValueError(f"unknown teacher preset {name!r}: use one of {', '.join(TEACHER_PRESETS)}")
    return TEACHER_PRESETS[name]


def run_teacher_config(cfg: TrainConfig) -> TeacherConfig:
    """The teacher a run trains when it has none: the teacher preset on --data, with --text-encoder if given."""
    tcfg = replace(teacher_preset(cfg), data=cfg.data)
    return tcfg if cfg.text_encoder is None else replace(tcfg, text_encoder=cfg.text_encoder)


def check_teacher_text(spec: str | None, teacher: Denoiser, path: str | Path) -> None:
    """A --text-encoder that is not the encoder of the run's teacher: a one-line error naming the fix."""
    have = teacher.text_encoder.spec if teacher.text_encoder is not None else None
    if spec is not None and (have is None or canonical_spec(have) != canonical_spec(spec)):
        raise ValueError(f"--text-encoder {spec}: the teacher {path} has " + (f"the text encoder {have}" if have else
                         "no text encoder") + "; fix: drop --text-encoder (a run uses its teacher's encoder), or pass "
                         "a teacher trained with it (or another --out)")


def stage_steps(spec: str, n: int) -> tuple[int, ...]:
    """--steps '1000,400,350,300' -> one positive step count per stage; else a one-line ValueError naming the fix."""
    parts = str(spec).split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts) or len(parts) != n:
        raise ValueError(f"--steps {spec!r}: give {n} positive step counts separated by commas, one per stage of this "
                         f"run (e.g. {','.join(['500'] * n)}), or drop --steps for the preset's")
    return tuple(int(p) for p in parts)


def run_stages(cfg: TrainConfig, teacher: UNetConfig) -> list[StageConfig]:
    """The stages `pagoda train` runs on `teacher`: the preset's plan with --discriminator/--distance/--grow-width,
    --steps, --max-steps/--max-batch caps."""
    plan = plan_stages(teacher.resolution, cfg.res, cfg.preset, cfg.discriminator, cfg.distance, cfg.grow_width,
                       teacher.top_width)
    if cfg.steps is not None:
        plan = [replace(s, steps=k) for s, k in zip(plan, stage_steps(cfg.steps, len(plan)))]
    return [replace(s, steps=min(s.steps, cfg.max_steps or s.steps), batch=min(s.batch, cfg.max_batch or s.batch))
            for s in plan]


def settle_steps(run: RunDir, stages: list[StageConfig], max_stages: int | None = None
                 ) -> tuple[list[StageConfig], dict[int, int]]:
    """The stages with the step counts this launch gives them, and {k: its count} for each finished stage that --steps
    lengthens. A finished stage asked for fewer steps than the run's config.json records is kept at its count; one
    asked for more is continued (the same run as that count from the start: draws are a function of the step),
    unless a later stage grew from it (a one-line refusal)."""
    if not run.config.is_file():
        return stages, {}
    recorded = {s["name"]: s["steps"] for s in json.loads(run.config.read_text()).get("stages", [])}
    settled, longer = list(stages), {}
    for k, stage in enumerate(stages):
        sdir, was = run.stage(stage.resolution), recorded.get(stage.name)
        if not is_finished(sdir) or was in (None, stage.steps):
            continue
        if was > stage.steps or k >= (max_stages or len(stages)):  # kept as trained
            settled[k] = replace(stage, steps=was)
            continue
        later = [run.stage(s.resolution).name for s in stages[k + 1:] if run.stage(s.resolution).exists()]
        if later:
            counts = ",".join(str(recorded.get(s.name, s.steps)) for s in stages)
            raise ValueError(f"--steps asks {stage.steps} steps of {sdir}, finished at {was}, and {later[0]} grew from "
                             f"it; fix: pass --steps {counts} to keep the run as it is, delete {sdir} and the stages "
                             f"after it to train it again, or pass another --out")
        longer[k] = was
    return settled, longer


def train(cfg: TrainConfig, progress: bool = True, info: dist.DistInfo | None = None) -> Path:
    """Teacher (load or train) → latent cache (build if absent) → one stage per resolution; returns the run dir."""
    info = info or dist.init(cfg.device)
    run = RunDir(Path(cfg.out))
    # 1. Teacher
    teacher_path = Path(cfg.teacher) if cfg.teacher else run.teacher
    check_text_data(cfg.text_encoder, cfg.data, cfg.res)  # refused before anything trains
    if cfg.teacher is None and not teacher_path.exists():
        tcfg = run_teacher_config(cfg)
        run_stages(cfg, replace(UNET_PRESETS[tcfg.unet], resolution=tcfg.resolution))  # bad --res: fail before training
        if info.is_main:
            train_teacher(tcfg, run.teacher_dir, progress=progress, device=cfg.device, workers=cfg.workers)
        dist.barrier(info)
    teacher = load_teacher(teacher_path, info.device)
    check_teacher_text(cfg.text_encoder, teacher, teacher_path)
    t_res = teacher.resolution
    stages = run_stages(cfg, teacher.unet.config)
    stages, longer = settle_steps(run, stages, cfg.max_stages)  # read before rank 0 rewrites config.json below
    data = make_dataset(cfg.data, cfg.res, channels=teacher.channels)
    if data.channels != teacher.channels:
        raise ValueError(f"the data has {data.channels} channels but the teacher {teacher.channels}: pass matching --data")
    # 2. Latent cache: image and flip, encoded once (split across ranks)
    grow = get_preset(cfg.preset)
    n_enc = grow.encode_images if cfg.encode_images is None else cfg.encode_images
    encoder = Encoder(teacher, t_res, steps=cfg.encode_steps or grow.encode_steps, method=cfg.encode_method,
                      sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max)
    encoded, t0, c0 = [0], time.perf_counter(), time.process_time()

    def on_batch(done: int, total: int, ips: float) -> None:
        encoded[0] = done
        bar.update(task, completed=done, total=total, info=f"{ips:.0f} img/s")
    with progress_bar(progress and info.is_main) as bar:
        task = bar.add_task("encode", total=None, info="")
        workers = cfg.workers if cfg.workers is not None else default_workers(data, info.world_size)
        build_latent_cache(encoder, data, run.latents, n_enc or None, rank=info.rank, world_size=info.world_size,
                           progress=on_batch, workers=workers)
    dist.barrier(info)
    if info.is_main and encoded[0]:  # this build's cost (rank 0's share; a resumed build counts what it encoded)
        dt = time.perf_counter() - t0
        save_json({"seconds": dt, "cpu_seconds": time.process_time() - c0, "images": encoded[0],
                   "flips": getattr(data, "hflip", True), "img_per_s": encoded[0] / max(dt, 1e-9)}, run.latents / TIMING_FILE)
    store = LatentStore(run.latents)  # memory-mapped: every rank reads only the entries it draws
    if info.is_main:  # written once the inputs proved usable: a refused run leaves the old config.json
        save_json({"train": asdict(cfg), "teacher": teacher.unet.config.to_dict(),
                   "stages": [asdict(s) for s in stages]}, run.config)
    # 3. Stages, each reading its targets at its own resolution
    G = None
    for k, stage in enumerate(stages[: cfg.max_stages]):
        sdir = run.stage(stage.resolution)
        if k in longer:  # continued: the shorter stage's generator is kept beside it
            if info.is_main:
                (sdir / GENERATOR_FILE).rename(sdir / GENERATOR_FILE.replace(".pt", f"-{longer[k]}.pt"))
        elif is_finished(sdir):  # a finished stage is never redone
            G = Generator.from_checkpoint(sdir / GENERATOR_FILE, map_location=info.device)
            continue
        images = make_dataset(cfg.data, stage.resolution, channels=teacher.channels)
        pairs = LatentPairs.from_cache(store, images)
        G = StageTrainer(RunSpec.of(cfg), stage, k, teacher, G, pairs, sdir, info).run(progress)
    dist.barrier(info)
    return run.root
