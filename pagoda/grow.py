"""The growth schedule: which stages a run trains, from (teacher resolution, target resolution, preset).

Stage 0 is PaGoDA's stage 2 (the one-step decoder at the teacher resolution R, every parameter trains);
each further stage is one doubling of stage 3 (R → 2R → 4R ...), initialised from the previous one.

    stages = plan_stages(8, 32, "demo")     # stage-08 (decoder), stage-16, stage-32
    [asdict(s) for s in stages]             # RUN/config.json; StageConfig.from_dict reads each back

Presets are named `GrowPreset` instances: `imagenet64` (official values, PAPER.md), `demo` (Fashion-MNIST
on a 2-core CPU), `emoji` (text to image: captioned colour emoji, 8 → 64 px, 2-core CPU), `tiny` (tests).
Per-stage lists are indexed by stage (0 = decoder at R, 1 = first doubling, ...); a stage beyond the end of a
list takes its last entry.

The width of the grown blocks follows a schedule (`grow_widths`; preset field `grow_width`, `pagoda train
--grow-width`), C = the teacher trunk's top-level width, R' = a doubling's output resolution:

    constant     every doubling at C (each takes the previous width; every preset's default)
    halve        C/2, C/4, ... (ProGAN / StyleGAN halve the width per doubling)
    B/R          min(C, C·B/R'): C up to B px, then halved per doubling (ProGAN's min(16384/R, 512) has this
                 shape; 256/R on ImageNet-64 is the official 192, 192, 96)
    W1,W2,...    explicit widths per doubling (the last repeats), e.g. 192,192,96
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

from pagoda.rundir import stage_dir_name

OPTIMIZERS = ("radam", "adam")  # pagoda/stage.py builds them
DISCRIMINATORS = ("projected", "multiscale")  # pagoda.discriminators.make_discriminator kinds
# Default reconstruction distance, offline: "features" = pseudo-Huber of (pyramid pixel MSE + MSE of a frozen
# random edge/texture filter bank); as sharp as l2 and sharper than pixels alone on a super-resolution proxy
# (docs/ablations.md, "Older measurements"); the GAN term does most of the sharpening.
DEFAULT_DISTANCE = "features"


@dataclass(frozen=True)
class StageConfig:
    """One training stage (one run-directory `stage-XX`)."""

    name: str  # run-directory name, "stage-08"
    resolution: int  # output resolution of G in this stage
    grow: bool  # False: stage 2 (G starts as the teacher copy); True: G = previous stage's G grown once
    steps: int  # generator steps
    batch: int  # global batch (all ranks together)
    lr_G: float  # generator learning rate
    lr_D: float  # discriminator learning rate
    lam: float  # λ of L_G = L_rec + λ·w·L_adv (paper: 0.2 in stage 2, 1.0 in stage 3)
    activate_from: int | None  # trunk output block from which G trains (Generator.set_trainable); None = all
    fade_steps: int  # steps over which the fade-in α ramps 0 → 1 (0 = no fade: official growth)
    ema: float  # EMA decay of the generator weights
    d_steps_per_g: int = 1  # discriminator steps per generator step
    distance: str = DEFAULT_DISTANCE  # reconstruction distance d (pagoda.losses.make_distance name)
    grow_channels: int | None = None  # width of this stage's doubling; None = the previous width
    optimizer: str = "radam"  # "radam" (official, weight decay 0) or "adam"
    adv_start: int = 0  # generator steps with L_rec only before the adversarial term starts (0 = from step 0)
    split_g_step: bool = False  # G takes the rec and the adv step separately (official at 256 and 512)
    rec_disc_weight: float = 0.0  # weight of a 2nd discriminator on reconstructions (official 0.5 at 512); 0 = off
    d_channels: int = 64  # discriminator width (projected: CCM base width; multiscale: first layer, doubling, max 4x)
    discriminator: str = "multiscale"  # "projected" (frozen EfficientNet-Lite0 features) or "multiscale" (scratch)
    d_input: int = 64  # backbone input size of the projected D and the lite0 distance (images resized to it)
    w_max: float = 10.0  # upper clip of the adaptive weight w (VQGAN / official: [0.01, 10])
    d_continue: bool = False  # a growth stage's D starts from the previous stage's final D (grown), not fresh
    anchor: float = 0.0  # growth stages: weight of d(↓G(z'), G_R(z')), fresh samples kept on the stage-2 G (0 = off)

    def __post_init__(self):
        checks = [
            (self.resolution > 0, f"resolution must be positive, got {self.resolution}"),
            (self.steps >= 0 and self.batch > 0, f"steps must be >= 0 and batch > 0, got {self.steps} and {self.batch}"),
            (self.lr_G >= 0 and self.lr_D >= 0, f"learning rates must be >= 0, got lr_G={self.lr_G} lr_D={self.lr_D}"),
            (0 <= self.ema < 1, f"ema decay must lie in [0, 1), got {self.ema}"),
            (self.fade_steps >= 0 and (self.grow or self.fade_steps == 0),
             f"fade_steps={self.fade_steps}: must be >= 0, and 0 in a stage that does not grow"),
            (self.d_steps_per_g >= 1, f"d_steps_per_g must be >= 1, got {self.d_steps_per_g}"),
            (self.activate_from is None or self.activate_from >= 0, f"activate_from must be None or >= 0, got {self.activate_from}"),
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} unknown: use one of {', '.join(OPTIMIZERS)}"),
            (self.discriminator in DISCRIMINATORS,
             f"discriminator {self.discriminator!r} unknown: use one of {', '.join(DISCRIMINATORS)}"),
            (self.w_max >= 0.01, f"w_max must be >= 0.01 (the lower clip), got {self.w_max}"),
            (self.anchor >= 0 and (self.grow or self.anchor == 0),
             f"anchor={self.anchor}: must be >= 0, and 0 in a stage that does not grow"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"stage {self.name}: {msg}")

    @property
    def fade(self) -> bool:
        """Whether this stage grows with a fade-in (Generator.grow(fade=...))."""
        return self.grow and self.fade_steps > 0

    def alpha(self, step: int) -> float:
        """Fade-in weight α at generator step `step` (linear ramp over fade_steps, then 1)."""
        return min(1.0, step / self.fade_steps) if self.fade else 1.0

    @classmethod
    def from_dict(cls, d: dict) -> StageConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown StageConfig fields {sorted(unknown)}: the config was written by another version")
        return cls(**d)


@dataclass(frozen=True)
class GrowPreset:
    """Named hyper-parameters from which plan_stages builds the stages; lists are per stage (last repeats)."""

    name: str  # preset name
    steps: tuple[int, ...]  # generator steps per stage
    batch: tuple[int, ...]  # global batch per stage
    lr_G: float  # generator learning rate
    lr_D: float  # discriminator learning rate
    lam: tuple[float, float]  # λ in stage 2 (decoder at R), λ in the growth stages
    activate_from: int | None  # growth stages' freezing (an output-block index of the teacher's trunk)
    fade_steps: tuple[int, ...]  # fade-in steps per stage (entry 0 unused: stage 2 does not grow)
    ema: float  # EMA decay
    grow_ema: float | None = None  # the growth stages' EMA decay; None = `ema`
    grow_lr_G: float | None = None  # the growth stages' generator learning rate; None = `lr_G`
    d_steps_per_g: int = 1  # discriminator steps per generator step
    distance: str = DEFAULT_DISTANCE  # reconstruction distance
    grow_distance: str | None = None  # the growth stages' distance; None = `distance`
    grow_width: str = "constant"  # width schedule of the grown blocks (module docstring, grow_widths)
    optimizer: str = "radam"  # optimizer for G and D
    grow_optimizer: str | None = None  # optimizer of the growth stages; None = `optimizer`
    adv_start: tuple[int, ...] = (0,)  # L_rec-only warm-up steps per stage (last repeats)
    split_g_from: int | None = None  # resolution from which G takes rec/adv steps separately; None = never
    rec_disc_from: int | None = None  # resolution from which the reconstruction discriminator is on; None = never
    rec_disc_weight: float = 0.5  # its weight there
    d_channels: int = 64  # discriminator width (StageConfig.d_channels)
    discriminator: str = "multiscale"  # discriminator kind (pagoda.discriminators)
    d_input: int = 64  # backbone input size of the projected D / lite0 distance
    w_max: float = 10.0  # upper clip of the adaptive weight
    d_continue: bool = False  # growth stages continue the previous stage's D
    anchor: float = 0.0  # growth stages: weight of the anchor d(↓G(z'), G_R(z')) (StageConfig.anchor)
    encode_images: int = 0  # data-set images in the latent cache (each also flipped); 0 = all (paper)
    encode_steps: int = 40  # encoder Karras grid points (paper: 40 with Heun = 78 NFE)
    teacher_preset: str = "demo"  # the teacher `pagoda train` trains when given none (train.TEACHER_PRESETS)


PRESETS: dict[str, GrowPreset] = {
    # Official ImageNet-64 → 512 values (PAPER.md "Official hyperparameters"): RAdam, weight decay 0,
    # lr_G 8e-6, lr_D 2e-3, EMA 0.999, global batch 96 (stage 2) / 256 (→128) / 360 (→256) / 512 (→512),
    # "up to 600k steps" (an upper bound, not a measured count), λ 0.2 then 1.0, activate_from 9, growth width 192
    # (constant; the official code's table has 96 at 512 px = `--grow-width 256/R`: docs/method.md §4),
    # G splits rec/adv steps at 256 and 512, a 2nd discriminator on reconstructions (0.5) at 512.
    # Projected D and distance on frozen features at a 224-px input (official: DeiT-B + EfficientNet-Lite0; the DeiT
    # weights are not obtainable offline, so both use Lite0 alone). Not official: fade_steps (ours; official growth
    # has no fade-in, = 0).
    "imagenet64": GrowPreset(
        name="imagenet64", steps=(600_000,), batch=(96, 256, 360, 512), lr_G=8e-6, lr_D=2e-3, lam=(0.2, 1.0),
        activate_from=9, fade_steps=(0, 5_000), ema=0.999, distance="lite0",
        split_g_from=256, rec_disc_from=512, rec_disc_weight=0.5, discriminator="projected", d_input=224,
    ),
    # Fashion-MNIST demo, teacher `unet.PRESETS["demo8"]` (6 trunk output blocks; activate_from 3 trains the
    # 8-px level + growth): 8 (decoder) → 16 → 32, ≈ 22 min for the whole `pagoda train` on 2 CPU cores. Where it
    # departs from `imagenet64`, a few hundred steps per stage is why (docs/ablations.md, FID at n = 2000):
    # - a projected D on frozen Lite0 features at a 32-px input, lr_D = 10 lr_G: a D from scratch stays near chance
    #   for a stage's length (G32 240.8 → 178.5); the Lite0 distance sharpens, the pixel pyramid beside it keeps
    #   objects in place;
    # - Adam, not RAdam: RAdam's warm-up spends the first few hundred steps (G8 12.2 → 10.5);
    # - EMA 0.995 in stage-08, 0.99 in the growth stages, whose adversarial term runs only for their last steps;
    # - growth stages: L_rec alone for 450 steps, then the adversarial term (adv_start; a GAN step costs ≈ 2 L_rec
    #   steps); the pyramid weighed 4× and the anchor on the stage-2 G (consistency PSNR at 32 px 24.1 → 29.9 dB);
    #   the previous stage's D continued; lr_G 4e-4, as the grown blocks start from scratch (G32 78.4 → 57.3);
    # - grown blocks 16 channels wide (the trunk's top level is 32), stage-32 1000 steps: at about the training CPU
    #   time of 32-channel blocks and 600 steps, G32 FID 58.8 → 44.0 — constant width needs ≈ 15 % more CPU for the
    #   same FID (800 steps: 43.5) — and G32 costs 1.73× G8's FLOPs instead of 3.78× (docs/benchmarks.md §3b).
    "demo": GrowPreset(
        name="demo", steps=(700, 800, 1000), batch=(64, 64, 32), lr_G=2e-4, grow_lr_G=4e-4, lr_D=2e-3, lam=(0.2, 1.0),
        activate_from=3, fade_steps=(0, 60), ema=0.995, grow_ema=0.99, d_channels=32, encode_images=2000,
        encode_steps=20,
        optimizer="adam", discriminator="projected", d_input=32, distance="lite0+multiscale", adv_start=(0, 450),
        grow_distance="lite0+4*multiscale", anchor=4.0, d_continue=True, grow_width="16",
    ),
    # Text to image on captioned colour emoji (issue 21), teacher preset `emoji` (RGB text teacher at 8 px,
    # `unet.PRESETS["emoji8"]`), 8 → 16 → 32 → 64 (8×, the paper's growth factor) in ≈ 54 min on 2 CPU cores. The
    # demo's recipe (projected D, Lite0 + pyramid distance, anchor, D continued, L_rec warm-up) with:
    # - constant width (64 channels in every grown block): at equal steps G64 FID 103.9 against 123.2 at 32 channels
    #   and 141.9 at `halve` (32, 16, 8: the 8-channel 64-px blocks lose the colours), subgroup accuracy 0.181 / 0.168
    #   / 0.062, for a stage-64 of 465 s against 258 s and 193 s (docs/benchmarks.md §3b, §13b);
    # - the projected D at a 64-px input (the images are 64 px; Lite0's maps at 32-px input are too coarse for them);
    # - every image in the latent cache (each caption has one image), L_rec alone for 150 steps per growth stage;
    # - stage-08 1250 steps: G8 FID 46.3 / 44.4 / 42.1 / 39.6 / 38.1 after 500 / 750 / 1000 / 1250 / 1500 steps,
    #   against the teacher's 41.5 (docs/benchmarks.md §13b).
    # Measured on 2 cores alone: teacher 8m55s, cache 5m07s, stage-08 0.94 s/step (≈ 19m40s), stage-32 4m08s,
    # stage-64 7m45s; stage-16 ≈ 8-9 min (8m47s at 1 thread beside other jobs): ≈ 54 min, summed from parts.
    "emoji": GrowPreset(
        name="emoji", steps=(1250, 400, 350, 300), batch=(32, 32, 16, 16), lr_G=2e-4, grow_lr_G=4e-4, lr_D=2e-3,
        lam=(0.2, 1.0), activate_from=3, fade_steps=(0, 40), ema=0.995, grow_ema=0.99, d_channels=32,
        encode_images=0, encode_steps=20, optimizer="adam", discriminator="projected",
        d_input=64, distance="lite0+multiscale", adv_start=(0, 150), grow_distance="lite0+4*multiscale", anchor=4.0,
        d_continue=True, teacher_preset="emoji",
    ),
    # Tests: teacher `unet.PRESETS["tiny"]` (4 trunk output blocks), a handful of steps.
    "tiny": GrowPreset(
        name="tiny", steps=(3,), batch=(4,), lr_G=1e-3, lr_D=1e-3, lam=(0.2, 1.0),
        activate_from=2, fade_steps=(0, 2), ema=0.9, d_channels=32, encode_images=64, encode_steps=8,
    ),
}


def get_preset(preset: str | GrowPreset) -> GrowPreset:
    """A GrowPreset by name (or the preset itself)."""
    if isinstance(preset, GrowPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown growth preset {preset!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def doublings(teacher_res: int, target_res: int) -> int:
    """k with target_res = teacher_res·2^k; one-line ValueError otherwise."""
    if teacher_res <= 0:
        raise ValueError(f"teacher resolution must be positive, got {teacher_res}")
    k, r = 0, teacher_res
    while r < target_res:
        r, k = r * 2, k + 1
    if r != target_res:
        options = ", ".join(str(teacher_res * 2**i) for i in range(4))
        raise ValueError(f"--res {target_res} is not {teacher_res}·2^k: use one of {options}, ...")
    return k


def _at(values: tuple, i: int):
    return values[min(i, len(values) - 1)]


WIDTH_FORMS = "constant, halve, B/R (e.g. 256/R) or widths per doubling (e.g. 192,192,96)"


def check_width(schedule: str) -> str:
    """The width schedule itself when it is one (module docstring), else a one-line ValueError naming the forms."""
    s = str(schedule).strip()
    if s in ("constant", "halve") or re.fullmatch(r"[1-9]\d*/R", s) or re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", s):
        return s
    raise ValueError(f"--grow-width {schedule!r} is not a width schedule: use {WIDTH_FORMS}")


def grow_widths(schedule: str, teacher_res: int, n: int, top_width: int | None = None) -> tuple[int | None, ...]:
    """Width of each of `n` doublings of a teacher at `teacher_res` whose trunk's top level is `top_width` wide
    (None = the previous width: `constant`). Every width >= 1 is valid (pagoda.unet.GroupNorm32)."""
    s = check_width(schedule)
    if s == "constant":
        return (None,) * n
    if "/" not in s and s != "halve":
        return tuple(_at(tuple(int(w) for w in s.split(",")), i) for i in range(n))
    if top_width is None:
        raise ValueError(f"the width schedule {s!r} needs the teacher's top-level width: pass top_width")
    base = teacher_res if s == "halve" else int(s[:-2])
    return tuple(max(1, min(top_width, top_width * base // (teacher_res * 2**k))) for k in range(1, n + 1))


def plan_stages(teacher_res: int, target_res: int, preset: str | GrowPreset, discriminator: str | None = None,
                distance: str | None = None, width: str | None = None, top_width: int | None = None) -> list[StageConfig]:
    """Stage 2 at the teacher resolution, then one growth stage per doubling up to target_res; `discriminator`,
    `distance` and `width` (--discriminator, --distance, --grow-width) replace the preset's; `top_width` = the
    teacher trunk's top-level width (UNetConfig.top_width), needed by the `halve` and `B/R` schedules."""
    p = get_preset(preset)
    k = doublings(teacher_res, target_res)
    widths = (None,) + grow_widths(width or p.grow_width, teacher_res, k, top_width)
    stages = []
    for i in range(k + 1):
        res, grows = teacher_res * 2**i, i > 0

        def own(field: str):  # a growth stage's `grow_<field>` where set, else `<field>`
            value = getattr(p, f"grow_{field}") if grows else None
            return getattr(p, field) if value is None else value
        stages.append(StageConfig(
            name=stage_dir_name(res), resolution=res, grow=grows, steps=_at(p.steps, i), batch=_at(p.batch, i),
            lr_G=own("lr_G"), lr_D=p.lr_D, lam=p.lam[1] if grows else p.lam[0],
            activate_from=p.activate_from if grows else None,  # stage 2: every parameter trains
            fade_steps=_at(p.fade_steps, i) if grows else 0,
            ema=own("ema"), d_steps_per_g=p.d_steps_per_g, distance=distance or own("distance"),
            grow_channels=widths[i],
            optimizer=own("optimizer"),
            adv_start=_at(p.adv_start, i),
            split_g_step=p.split_g_from is not None and res >= p.split_g_from,
            rec_disc_weight=p.rec_disc_weight if p.rec_disc_from is not None and res >= p.rec_disc_from else 0.0,
            d_channels=p.d_channels, discriminator=discriminator or p.discriminator, d_input=p.d_input, w_max=p.w_max,
            d_continue=p.d_continue and grows, anchor=p.anchor if grows else 0.0,
        ))
    return stages
