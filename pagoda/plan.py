"""`pagoda train --dry-run`: the plan of a run (stages, batches, parameters, memory, disk) without data or GPUs.

    pagoda train --preset imagenet64 --res 512 --gpus 8 --dry-run       # plans for 8 ranks on any machine
    pagoda train --res 32 --dry-run --dry-run-width 32                  # the Fashion-MNIST demo

How each number is obtained:
- parameters: every stage's G, D (and the reconstruction D) built at true size on the meta device;
- activation memory per GPU: bytes of the tensors autograd saves for backward in one G step (the
  reconstruction and the adversarial forward, DiffAugment, D, the distance) at the per-rank micro-batch,
  run at true size on the meta device (fp32, each storage once, parameters excluded; LPIPS as its VGG-16
  trunk). bf16 autocast on CUDA keeps many of them in half precision, so this is an upper bound;
- state memory per GPU: G weights + EMA + the trainable part's grads and two RAdam moments, D likewise
  (16 bytes/param), plus the teacher (kept resident for the encoder and distillation);
- latent cache on disk: images × 2 flips (1 for text data) × C×R×R × 2 bytes (fp16) at the teacher resolution R;
- two real steps of every stage on random data at reduced width (all channel widths → `width`, batch 1;
  on a CUDA machine without a width: true size at the per-rank micro-batch, peak memory measured), in a
  temporary run directory that holds stage 2's generator for the growth stages, as in a run;
- captioned data (a text run): the teacher built as train_teacher builds it (UNet text_dim = the width of the
  --text-encoder's encoder, the encoder's parameters counted in the teacher's and every G's, trained with the teacher
  or frozen as the plan says); the meta G step and the real steps conditioned on text (meta embeddings at the
  encoder's width and context; the data's first captions) with the text-conditioned D.
Nothing is written to the run directory.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace
from typing import NamedTuple

import torch

import torchvision

from pagoda import dist
from pagoda.data import make_dataset
from pagoda.decoder import Generator
from pagoda.encoder import LatentPairs, check_captions
from pagoda.grow import get_preset
from pagoda.losses import DEFAULT_DISTANCE, LossConfigError, diff_augment, g_hinge_loss, make_distance
from pagoda.discriminators import build_discriminators
from pagoda.rundir import RunDir
from pagoda.stage import RunSpec, StageTrainer
from pagoda.teacher import Denoiser, load_teacher
from pagoda.text import TextEmbedding, text_params
from pagoda.train import TrainConfig, check_teacher_text, check_text_data, run_stages, run_teacher_config, teacher_network
from pagoda.unet import PRESETS as UNET_PRESETS, UNet, UNetConfig

DATASET_SIZES = {"imagenet64": 1_281_167, "fashion-mnist": 60_000}  # train images when no --data is given
GPU_MEMORY_GIB = 80.0  # budget for the "fits" column (H100 80 GB)


class TeacherPlan(NamedTuple):
    """The run's teacher as the plan sees it."""

    config: UNetConfig
    source: str
    text_encoder: torch.nn.Module | None = None  # captioned data: the teacher's encoder (real: the steps run it)
    text_trained: bool = False  # the run trains the encoder with the teacher (builtin); else it is frozen


def teacher_config(cfg: TrainConfig) -> TeacherPlan:
    """The teacher: from --teacher if given (its --text-encoder checked as train does), else the UNet preset of the
    growth preset's name (imagenet64: the ADM) unless --teacher-preset is given, else the teacher preset the run
    trains, built on --data as train_teacher builds it (channels, classes, text encoder)."""
    if cfg.teacher:
        T = load_teacher(cfg.teacher)
        check_teacher_text(cfg.text_encoder, T, cfg.teacher)
        return TeacherPlan(T.unet.config, str(cfg.teacher), T.text_encoder)
    name = cfg.preset if isinstance(cfg.preset, str) else cfg.preset.name
    if name in UNET_PRESETS and cfg.teacher_preset is None:  # e.g. imagenet64: the public ADM, at random
        return TeacherPlan(UNET_PRESETS[name], f"random {name} teacher (no --teacher)")
    tp = run_teacher_config(cfg)
    source = f"teacher preset {cfg.teacher_preset or get_preset(cfg.preset).teacher_preset!r} (trained by the run)"
    if cfg.data == "fashion-mnist":
        return TeacherPlan(replace(UNET_PRESETS[tp.unet], resolution=tp.resolution), source)
    data = make_dataset(cfg.data, tp.resolution)
    torch.manual_seed(tp.seed)  # as train_teacher: the same initial weights (the steps run the builtin encoder)
    T = teacher_network(tp, data)
    enc = T.text_encoder
    return TeacherPlan(T.unet.config, source, enc, enc is not None and any(p.requires_grad for p in enc.parameters()))


def data_facts(cfg: TrainConfig, t_cfg: UNetConfig) -> dict:
    """Source and size of the data: the real --data folder/zip if given, else random data of the preset's shape."""
    name = cfg.preset if isinstance(cfg.preset, str) else cfg.preset.name
    if cfg.data == "fashion-mnist" and t_cfg.in_channels == 3:  # no --data for an RGB preset: ImageNet-shaped
        n = DATASET_SIZES.get(name, DATASET_SIZES["imagenet64"])
        return {"source": f"random data, {name} shape (no --data)", "images": n}
    if cfg.data == "fashion-mnist":
        return {"source": "fashion-mnist", "images": DATASET_SIZES["fashion-mnist"]}
    return {"source": cfg.data, "images": len(make_dataset(cfg.data, cfg.res, channels=t_cfg.in_channels))}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def saved_bytes(fn, modules) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs (each storage once, no parameters)."""
    skip = {_storage(t) for m in modules for t in [*m.parameters(), *m.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        key = _storage(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _distance_module(name: str, channels: int) -> torch.nn.Module:
    """The distance on the meta device; LPIPS as its VGG-16 trunk (no weights needed to count activations)."""
    if name == "lpips":
        with torch.device("meta"):
            trunk = torchvision.models.vgg16(weights=None).features[:30]

        class _Trunk(torch.nn.Module):  # LPIPS compares VGG activations of fake and real
            def __init__(self):
                super().__init__()
                self.trunk = trunk

            def forward(self, fake, real):
                x = torch.cat([fake, real]).expand(-1, 3, -1, -1)
                return self.trunk(x).mean()
        return _Trunk()
    return make_distance(name, channels, pretrained=False).to("meta")


def _meta_text(micro: int, text_encoder: torch.nn.Module) -> TextEmbedding:
    """`micro` encoded captions on the meta device (the frozen encoder runs without grad: nothing saved)."""
    L, D = text_encoder.context, text_encoder.width
    return TextEmbedding(*(torch.zeros(shape, dtype=dtype, device="meta") for shape, dtype in
                           (((micro, L, D), torch.float32), ((micro, L), torch.bool), ((micro, D), torch.float32))))


def _meta_stage(cfg: TrainConfig, stage, g_cfg: UNetConfig, micro: int, distance: str,
                text_encoder: torch.nn.Module | None = None) -> dict:
    """Parameter counts and the saved-activation bytes of one G step, at true size on the meta device; a text G
    (`text_encoder`: the teacher's, carried frozen) counts the encoder and is conditioned, with its D, on text."""
    C, R0, ncls, augment = g_cfg.in_channels, g_cfg.resolution, g_cfg.num_classes, cfg.augment
    with torch.device("meta"):
        G = Generator(UNet(g_cfg))
        Ds = [D for D in build_discriminators(stage, C, ncls, pretrained=False, text_dim=g_cfg.text_dim)
              if D is not None]  # as the stage does
    G.set_trainable(stage.activate_from)
    d = _distance_module(distance, C)
    text = 0 if text_encoder is None else text_params(text_encoder)
    out = {"G_params": sum(p.numel() for p in G.parameters()) + text,
           "G_trainable": sum(p.numel() for p in G.parameters() if p.requires_grad),
           "D_params": sum(p.numel() for D in Ds for p in D.parameters())}

    def g_step():  # L_rec on the reconstruction + L_adv on fresh z (and the reconstruction D at 512)
        y = torch.zeros(micro, ncls, device="meta") if ncls else None  # soft labels: no .item() on meta
        y_D = torch.zeros(micro, dtype=torch.long) if ncls else None  # D checks its labels' values: real ones, on the CPU
        if text_encoder is not None:
            y = y_D = _meta_text(micro, text_encoder)
        aug = (lambda x: diff_augment(x, augment, torch.Generator().manual_seed(0))) if augment else (lambda x: x)
        x_rec = G(torch.randn(micro, C, R0, R0, device="meta"), y)
        loss = d(x_rec, torch.randn_like(x_rec)).mean()
        loss = loss + g_hinge_loss(Ds[0](aug(G(torch.randn(micro, C, R0, R0, device="meta"), y)), y_D))
        if len(Ds) > 1:
            loss = loss + g_hinge_loss(Ds[1](aug(x_rec), y_D))
        return loss

    out["activation_bytes"] = saved_bytes(g_step, [G, d, *Ds]) if micro > 0 else 0
    g_state = 4 * out["G_params"] * 2 + 12 * out["G_trainable"]  # weights + EMA, grads + 2 RAdam moments
    out["state_bytes"] = g_state + 16 * out["D_params"]
    return out


class _RandomData:
    """Random in-memory images in [−1, 1] with labels, as data.loader reads them (the dry run needs no download);
    with `captions` (text data: label i = caption i, never mirrored) the first n of them."""

    in_memory = True

    def __init__(self, n: int, channels: int, res: int, num_classes: int | None, seed: int = 0,
                 captions: list[str] | None = None):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, channels, res, res, generator=g) * 2 - 1
        self.labels = torch.randint(0, num_classes or 1, (n,), generator=g) if not captions else torch.arange(n)
        self.channels, self.num_classes = channels, num_classes
        if captions:
            self.captions, self.hflip = captions[:n], False

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


def _reduced_steps(cfg: TrainConfig, stages, t_cfg: UNetConfig, width: int | None, steps: int, batch: int,
                   micro: list[int], device: torch.device, distance: str | None, report=None,
                   text_encoder: torch.nn.Module | None = None, captions: list[str] | None = None) -> list[dict]:
    """Run `steps` real steps of every stage on random data (reduced width, or true size on CUDA); a text run's
    with the teacher's encoder (true size) and the first captions of the data (no flip slot in the cache)."""
    if width is not None:
        t_cfg = replace(t_cfg, model_channels=width, num_head_channels=min(t_cfg.num_head_channels, width))
    torch.manual_seed(cfg.seed)
    teacher = Denoiser(UNet(t_cfg), text_encoder=text_encoder).to(device).eval().requires_grad_(False)
    C, R0, ncls = t_cfg.in_channels, t_cfg.resolution, t_cfg.num_classes
    z = teacher.sigma_max * torch.randn(16, 2, C, R0, R0, generator=torch.Generator().manual_seed(1))  # 'latent cache'
    labels = torch.randint(0, ncls or 1, (16,), generator=torch.Generator().manual_seed(2))
    if captions:
        z, labels = z[:, :1], torch.arange(16)
    rcfg = replace(cfg, accumulate=1)
    info, results, G = dist.DistInfo(device=device), [], None
    with tempfile.TemporaryDirectory(prefix="pagoda-dry-run-") as tmp:
        for k, stage in enumerate(stages):
            b = batch if width is not None else micro[k]
            rstage = replace(stage, batch=max(1, b), adv_start=0, distance=distance or stage.distance, d_continue=False,
                             grow_channels=width if (width is not None and stage.grow) else stage.grow_channels)
            res = {"batch": rstage.batch}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                pairs = LatentPairs(z, torch.arange(16), labels,
                                    _RandomData(16, C, stage.resolution, ncls, cfg.seed, captions))
                tr = StageTrainer(RunSpec.of(rcfg), rstage, k, teacher, G, pairs, RunDir(tmp).stage(stage.resolution),
                                  info)
                t0 = time.perf_counter()
                for _ in range(steps):
                    s = tr.train_step()
                res.update(seconds_per_step=(time.perf_counter() - t0) / max(steps, 1), rec=s["rec"], d=s["d"],
                           finite=all(math.isfinite(v) for v in s.values()))
                if device.type == "cuda":
                    res["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                G = tr.finish()  # as in a run: the generator on disk, where a growth stage's anchor reads stage 2's
                del tr
            except torch.cuda.OutOfMemoryError:
                res["error"] = f"out of GPU memory at micro-batch {rstage.batch}: raise --accumulate"
                break
            finally:
                results.append(res)
            if report:
                report(stage.name, res)
    return results


def dry_run(cfg: TrainConfig, ranks: int, width: int | None = None, steps: int = 2, batch: int = 1,
            gpu_memory_gib: float = GPU_MEMORY_GIB, report=None) -> dict:
    """The plan of `pagoda train` for `ranks` processes; runs `steps` steps per stage (see module docstring)."""
    if ranks < 1:
        raise ValueError(f"--dry-run plans for at least 1 rank, got {ranks}: pass --gpus N (N >= 1)")
    check_text_data(cfg.text_encoder, cfg.data, cfg.res)  # as train: before anything is built
    teacher = teacher_config(cfg)
    t_cfg, t_source, text_encoder = teacher.config, teacher.source, teacher.text_encoder
    stages = run_stages(cfg, t_cfg)
    data = data_facts(cfg, t_cfg)
    captions, flips = None, 2
    if text_encoder is not None:  # as the run's latent cache: a text teacher needs captioned data
        dataset = make_dataset(cfg.data, cfg.res, channels=t_cfg.in_channels)
        check_captions(text_encoder, dataset)
        captions, flips = dataset.captions, 1 + getattr(dataset, "hflip", True)
    n_enc = get_preset(cfg.preset).encode_images if cfg.encode_images is None else cfg.encode_images
    n_enc = min(n_enc or data["images"], data["images"])  # 0 = all
    per_image = flips * t_cfg.in_channels * t_cfg.resolution ** 2 * 2  # image (+ flip), fp16
    A = cfg.accumulate
    try:  # LPIPS needs local weights; the reduced steps then use the default distance (said in the plan)
        for s in stages:
            if "lpips" in s.distance:  # also inside a sum, e.g. 'lite0+lpips'
                make_distance("lpips")
        substitute = None
    except LossConfigError:
        substitute = DEFAULT_DISTANCE
    t_params = sum(p.numel() for p in _meta_unet(t_cfg).parameters())
    plan = {"ranks": ranks, "accumulate": A, "teacher": {"source": t_source, "resolution": t_cfg.resolution,
            "params": t_params + (0 if text_encoder is None else text_params(text_encoder))},
            "data": {**data, "encode_images": n_enc, "flips": flips}, "latent_cache_bytes": n_enc * per_image,
            "latent_cache_bytes_all": data["images"] * per_image, "gpu_memory_gib": gpu_memory_gib, "stages": []}
    if text_encoder is not None:  # what the run conditions on, and who trains the encoder
        plan["teacher"]["text"] = {"encoder": text_encoder.spec, "params": text_params(text_encoder),
                                   "width": text_encoder.width, "context": text_encoder.context,
                                   "trained": teacher.text_trained, "captions": len(captions)}
    teacher_bytes = 4 * plan["teacher"]["params"]
    g_cfg, micro = t_cfg, []
    for stage in stages:
        if stage.grow:
            g_cfg = g_cfg.grown(stage.grow_channels)
        divisible = stage.batch % (ranks * A) == 0
        m = stage.batch // (ranks * A) if divisible else 0
        micro.append(m)
        row = {"name": stage.name, "resolution": stage.resolution, "steps": stage.steps, "global_batch": stage.batch,
               "per_rank_batch": stage.batch // ranks if stage.batch % ranks == 0 else None, "micro_batch": m or None,
               "accumulate": A, "lr_G": stage.lr_G, "lr_D": stage.lr_D, "lam": stage.lam,
               "distance": stage.distance, "discriminator": stage.discriminator}
        row.update(_meta_stage(cfg, stage, g_cfg, m, row["distance"], text_encoder))
        row["total_bytes"] = row["activation_bytes"] + row["state_bytes"] + teacher_bytes
        row["fits"] = row["total_bytes"] <= gpu_memory_gib * 2**30
        row["min_accumulate"] = _min_accumulate(stage.batch, ranks, row, teacher_bytes, gpu_memory_gib)
        if not divisible:
            row["note"] = f"global batch {stage.batch} is not divisible by ranks {ranks} x accumulate {A}"
        plan["stages"].append(row)
        if report:
            report(stage.name, row)
    device = torch.device("cuda") if width is None and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and width is None:
        width = 32  # true size does not run on a CPU in reasonable time
    if any(m == 0 for m in micro) and width is None:
        raise ValueError("the global batch of some stage is not divisible by ranks x accumulate: fix --accumulate first")
    plan["reduced"] = {"width": width, "steps": steps, "batch": batch if width is not None else None,
                       "device": str(device), "distance_substitute": substitute}
    plan["reduced"]["stages"] = _reduced_steps(cfg, stages, t_cfg, width, steps, batch, micro, device, substitute,
                                               report, text_encoder, captions) if steps > 0 else []
    return plan


def _meta_unet(cfg: UNetConfig) -> UNet:
    with torch.device("meta"):
        return UNet(cfg)


def _min_accumulate(batch: int, ranks: int, row: dict, fixed: int, budget_gib: float) -> int | None:
    """Smallest accumulation (dividing the per-rank batch) whose activations fit the GPU budget; None = none does."""
    if batch % ranks or not row["activation_bytes"] or not row["micro_batch"]:
        return None
    per_rank, act_per_sample = batch // ranks, row["activation_bytes"] / row["micro_batch"]
    for a in range(1, per_rank + 1):
        if per_rank % a == 0 and act_per_sample * per_rank / a + row["state_bytes"] + fixed <= budget_gib * 2**30:
            return a
    return None
