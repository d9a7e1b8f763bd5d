"""One PaGoDA generator stage (paper §3.2-3.3): alternate G and D steps at one resolution.

    G step:  L_G = L_rec + λ·w·L_adv  [+ β·L_dstl] [+ 0.5·w·L_adv,rec] [+ a·L_anchor]  (rec on (x, z, y) from the
             cache; L_rec = d(G(E(x_lo), y), x_hi),  L_adv = −E D(G(z', y')),  adv on fresh z' ~ N(0, σ_max² I);
             growth stages: L_anchor = d(↓G(z', y'), G_R(z', y')), G_R the frozen stage-2 generator)
             w = ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + 1e-4) clipped to [0.01, 10], W = G's last-layer weight
    D step:  L_D = E relu(1 − D(x)) + E relu(1 + D(G(z')))              (separate real batch, h-flipped with p = 0.5;
             per-head hinge, mean over heads; the same DiffAugment draw for real sample i and fake sample i)
    probe:   margin = E D(x) − E D(G(z')) on a fixed held-out batch, no augmentation (logged, not trained on)

Randomness of step k is drawn from a generator seeded by (seed, stage, k): one *global* batch per step,
identical on every rank, of which each rank takes its slice. Hence `--resume` is bit-exact and N ranks
x batch B computes the same update as 1 rank x batch N·B (gradients are averaged over ranks). The real
images and latents of each step are read ahead by `data.loader` (worker processes for image files).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pagoda import dist
from pagoda.data import default_workers, loader
from pagoda.images import downsample, save_image_grid
from pagoda.decoder import Generator
from pagoda.discriminators import make_discriminator
from pagoda.encoder import LatentPairs
from pagoda.grow import StageConfig
from pagoda.io import load_checkpoint, load_state, save_checkpoint
from pagoda.losses import (MultiscaleDistance, TeacherSampleCache, adaptive_weight, d_hinge_loss, diff_augment,
                           g_hinge_loss, make_distance, margin)
from pagoda.loop import EMA, LoopSpec, check_finite, index_labels, run_loop, step_generator
from pagoda.rundir import CHECKPOINT_FILE, GENERATOR_FILE, grid_name, stage_dir_name
from pagoda.solvers import sample
from pagoda.teacher import Denoiser, guided

GUIDED_DISTILL = 3.0  # β of L_dstl for an ω-conditioned G when --distill is not given
DISTILL_POOL = 4096  # size of the fixed z pool whose teacher samples the distillation loss uses
TEACHER_SAMPLES = "teacher-samples.pt"  # that pool's cache, in the run directory (shared by the stages)
PROBE_BATCH, PROBE_EVERY = 64, 10  # the held-out batch of the D margin, and how often (steps) it is measured


def _opt(name: str, params, lr: float, betas=(0.9, 0.999)):
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[name]
    return cls(params, lr=lr, betas=betas, weight_decay=0.0)


def build_discriminators(stage: StageConfig, channels: int, num_classes: int | None, pretrained: bool = True,
                         resolution: int | None = None) -> tuple[nn.Module, nn.Module | None]:
    """(D, D_recon) of a stage (at `resolution`, default the stage's): the discriminator and the second one on
    reconstructions (official at 512, else None). The one builder of the stage and of the dry-run plan."""
    def make_D():
        return make_discriminator(stage.discriminator, resolution or stage.resolution, channels, num_classes,
                                  stage.d_channels, stage.d_input, pretrained)
    D_recon = make_D() if stage.rec_disc_weight > 0 else None
    return make_D(), D_recon


def continued_discriminators(stage: StageConfig, channels: int, num_classes: int | None, prev_ckpt: Path
                             ) -> tuple[nn.Module, nn.Module | None]:
    """D continuity: the previous stage's final discriminator(s) (its checkpoint), grown to this stage."""
    Ds = build_discriminators(stage, channels, num_classes, resolution=stage.resolution // 2)
    states = load_checkpoint(prev_ckpt)["D"]
    for D, sd in zip([D for D in Ds if D is not None], states):
        D.load_state_dict(sd)
    return tuple(None if D is None else D.grow() for D in Ds)


@dataclass
class Draws:
    """Everything random in one step (the global batch; each rank takes its slices)."""

    entries: torch.Tensor  # (B,) latent-cache entries of the reconstruction batch
    flips: torch.Tensor  # (B,) bool: use the h-flipped image and latent
    z_fresh: torch.Tensor  # (B, C, R0, R0) fresh z' for L_adv
    y_fresh: torch.Tensor | None  # (B,) their labels
    w_fresh: torch.Tensor | None  # (B,) their guidance scales ω' ~ U[1, ω_max] (None: an unguided G)
    aug_seed: int  # DiffAugment seed of this step
    pool: torch.Tensor  # (B,) distillation-pool indices
    d_batches: list[tuple]  # per D step: real entries, reconstruction-D entries, fresh z', their labels, their ω',
    # real h-flips


class StageTrainer:
    """Holds G, D (and D_recon), their optimisers, the EMA of G and the step; `run()` trains to the end."""

    def __init__(self, cfg, stage: StageConfig, k: int, teacher: Denoiser, G_prev: Generator | None,
                 pairs: LatentPairs, sdir: Path, info: dist.DistInfo):
        self.cfg, self.stage, self.k, self.teacher, self.pairs = cfg, stage, k, teacher, pairs
        self.sdir, self.info, self.dev = Path(sdir), info, info.device
        self.entries = len(pairs.indices)
        torch.manual_seed(step_generator(cfg.seed, 1000 + k).initial_seed())  # fresh blocks and D: f(seed, stage)
        # G: stage 2 copies the teacher network; stage 3 grows the previous stage's EMA generator.
        self.guidance_max = cfg.guidance_max if cfg.guidance_max > 1 else 0.0  # ω-conditioned G (PaGoDA §guidance)
        if not stage.grow:
            G = Generator.from_teacher(teacher, guidance=bool(self.guidance_max))
        else:
            if G_prev is None:
                G_prev = Generator.from_checkpoint(self.sdir.parent / stage_dir_name(stage.resolution // 2) / GENERATOR_FILE)
            G = G_prev.grow(stage.grow_channels, fade=stage.fade)
        self.G = G.to(self.dev).train()
        self.G.set_trainable(stage.activate_from)
        self.params_G = [p for p in self.G.parameters() if p.requires_grad]
        C, R, ncls = self.G.channels, stage.resolution, self.G.unet.config.num_classes
        self.C, self.R, self.ncls = C, R, ncls
        prev_ckpt = self.sdir.parent / stage_dir_name(stage.resolution // 2) / CHECKPOINT_FILE
        if stage.d_continue and not prev_ckpt.is_file():
            warnings.warn(f"{prev_ckpt} is missing: {self.sdir.name} starts a fresh discriminator", stacklevel=2)
        D, D_recon = (continued_discriminators(stage, C, ncls, prev_ckpt) if stage.d_continue and prev_ckpt.is_file()
                      else build_discriminators(stage, C, ncls))
        self.D, self.D_recon = D.to(self.dev), D_recon and D_recon.to(self.dev)
        self.distance = make_distance(stage.distance, C, stage.d_input).to(self.dev)
        self.G_base = None  # the anchor's target: the frozen stage-2 generator (the grown G's fresh samples stay on it)
        if stage.anchor > 0:
            base = self.sdir.parent / stage_dir_name(self.G.base_resolution) / GENERATOR_FILE
            self.G_base = Generator.from_checkpoint(base, map_location=self.dev).eval().requires_grad_(False)
            self.anchor_distance = MultiscaleDistance()  # at R px: the pseudo-Huber pixel distance (one level)
        self.opt_G = _opt(stage.optimizer, self.params_G, stage.lr_G)
        self.Ds = [self.D] + ([self.D_recon] if self.D_recon is not None else [])
        self.params_D = [p for D in self.Ds for p in D.parameters() if p.requires_grad]  # not a frozen backbone
        self.opt_D = _opt(stage.optimizer, self.params_D, stage.lr_D, betas=(0.0, 0.99))
        self.ema, self.step = EMA(self.G, stage.ema), 0
        self.rng = lambda *keys: step_generator(cfg.seed, 1000 + k, *keys)
        # Distillation: guided teacher ODE samples (Heun 35 NFE; ω = 1: plain) for a fixed pool of (z, y, ω), computed
        # once and kept on disk for every stage. On with --distill β, and always with --guidance-max (β = 3 if unset:
        # with β = 1, G hardly used ω; docs/benchmarks.md §10). Off in a growth stage with an anchor: the anchor holds
        # ↓G(z', y', ω') on the stage-2 G, which L_dstl trained; L_dstl there too fought the grown-resolution terms.
        beta = cfg.distill or (GUIDED_DISTILL if self.guidance_max else 0.0)
        self.distill = 0.0 if self.G_base is not None else beta
        self.cache = None
        if self.distill > 0:
            t_res = self.G.base_resolution

            def teacher_ode(z, y, omega):  # D_ω = D(x,σ,∅) + ω (D(x,σ,y) − D(x,σ,∅)), one batched call per step
                D = teacher if omega is None else guided(teacher, omega)
                return sample(D, z, 18, "heun", y, teacher.sigma_min, teacher.sigma_max)
            self.cache = TeacherSampleCache(teacher_ode, DISTILL_POOL, (C, t_res, t_res), ncls, self.G.sigma_max,
                                            seed=cfg.seed, path=self.sdir.parent / TEACHER_SAMPLES, device=self.dev,
                                            guidance_max=self.guidance_max or 1.0)
        W, A = info.world_size, cfg.accumulate
        if stage.batch % (W * A):
            raise ValueError(f"global batch {stage.batch} of {self.sdir.name} is not divisible by ranks {W} x "
                             f"accumulation {A}: change --accumulate or the number of processes")
        self.B, self.A = stage.batch // (W * A), A
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.dev.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        self.batches = None  # the data loader, started by run() (or the first train_step) at self.step
        self._probe = None  # the held-out batch of probe(), read on first use

    # ---- state -------------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.sdir / CHECKPOINT_FILE

    def state(self) -> dict:
        """The training state (docs/checkpoints.md): step, config, G, G_ema, opt_G, D (a list), opt_D."""
        return {"step": self.step, "config": asdict(self.stage), "G": self.G.state_dict(),
                "G_ema": self.ema.module.state_dict(), "opt_G": self.opt_G.state_dict(),
                "D": [D.state_dict() for D in self.Ds], "opt_D": self.opt_D.state_dict()}

    def load(self) -> bool:
        """Resume from sdir/checkpoint.pt if present (same stage config), else sync initial weights across ranks."""
        if not self.ckpt_path.exists():
            dist.broadcast_([t for m in [self.G, *self.Ds] for t in m.state_dict().values()], self.info)
            return False
        ck = load_state(self.ckpt_path, self.stage, self.dev, delete=self.sdir)
        self.G.load_state_dict(ck["G"])
        self.ema.module.load_state_dict(ck["G_ema"])
        for D, sd in zip(self.Ds, ck["D"]):
            D.load_state_dict(sd)
        self.opt_G.load_state_dict(ck["opt_G"])
        self.opt_D.load_state_dict(ck["opt_D"])
        self.step = ck["step"]
        return True

    def save(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.state(), self.ckpt_path)

    # ---- randomness and data -----------------------------------------------------------------------
    def _fresh(self, g: torch.Generator, n: int):
        """Fresh (z', y', ω') for the adversarial terms; ω' only for an ω-conditioned G (else None, nothing drawn)."""
        z = self.G.sigma_max * torch.randn(n, self.C, self.G.base_resolution, self.G.base_resolution, generator=g)
        y = torch.randint(0, self.ncls, (n,), generator=g) if self.ncls else None
        w = 1 + (self.guidance_max - 1) * torch.rand(n, generator=g) if self.guidance_max else None
        if w is not None and not self.cfg.guided_adv:  # the real data are the ω = 1 distribution: judge only that
            w = torch.ones_like(w)
        return z, y, w

    def draws(self, step: int) -> Draws:
        """The random draws of step k, from generators seeded by (seed, stage, k[, D step j + 1])."""
        st, N = self.stage, self.entries
        g = self.rng(step)
        entries, flips = torch.randint(0, N, (st.batch,), generator=g), torch.rand(st.batch, generator=g) < 0.5
        z_fresh, y_fresh, w_fresh = self._fresh(g, st.batch)
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        pool = torch.randint(0, DISTILL_POOL, (st.batch,), generator=g)
        d_batches = []
        for j in range(st.d_steps_per_g):
            gj = self.rng(step, j + 1)
            real, recon = torch.randint(0, N, (st.batch,), generator=gj), torch.randint(0, N, (st.batch,), generator=gj)
            z_d, y_d, w_d = self._fresh(gj, st.batch)
            d_batches.append((real, recon, z_d, y_d, w_d, torch.rand(st.batch, generator=gj) < 0.5))
        return Draws(entries, flips, z_fresh, y_fresh, w_fresh, aug_seed, pool, d_batches)

    def _slices(self) -> list[slice]:
        """This rank's micro-batches: slices of the global batch."""
        r, A, B = self.info.rank, self.A, self.B
        return [slice((r * A + a) * B, (r * A + a + 1) * B) for a in range(A)]

    def keys(self, step: int) -> torch.Tensor:
        """The LatentPairs keys (2·entry + flip) this rank reads in step k: the reconstruction batch, then the
        real batch of each D step (and the reconstruction-D batch), each as this rank's slices."""
        d, mine = self.draws(step), self._slices()
        groups = [2 * d.entries + d.flips.long()]
        for real, recon, _, _, _, flips in d.d_batches if self.adv_on(step) else []:
            groups += [2 * real + flips.long()] + ([2 * recon] if self.D_recon is not None else [])
        return torch.cat([grp[sl] for grp in groups for sl in mine])

    def adv_on(self, step: int) -> bool:
        """Whether step k trains with the adversarial term (and so takes D steps)."""
        return self.stage.lam > 0 and step >= self.stage.adv_start

    def _start_data(self) -> None:
        workers = self.cfg.workers if self.cfg.workers is not None else default_workers(self.pairs, self.info.world_size)
        steps = (self.keys(k).tolist() for k in range(self.step, self.stage.steps))
        self.batches = loader(self.pairs, steps, workers)

    def _micro_batches(self):
        """Next step's data, as (x_hi, z, y) per micro-batch for the G step, then per D step [(x, y) real, (x, z, y)
        reconstruction-D], on the device."""
        x, z, y = (t.to(self.dev) for t in next(self.batches))
        y = y if self.ncls else None
        A, B = self.A, self.B
        parts = [(x[i * B:(i + 1) * B], z[i * B:(i + 1) * B], None if y is None else y[i * B:(i + 1) * B])
                 for i in range(len(x) // B)]
        return parts[:A], parts[A:]

    def _aug(self, x: torch.Tensor, seed: int, first: int) -> torch.Tensor:
        """DiffAugment, sample i drawn from (seed, first + i), its index in the global batch: the same
        augmentation however the batch is split over ranks and accumulation steps."""
        if not self.cfg.augment:
            return x
        return diff_augment(x, self.cfg.augment, [step_generator(seed, first + i) for i in range(len(x))])

    # ---- one step ----------------------------------------------------------------------------------
    def _adv(self, z_f, y_f, w_f, x_rec, y, aug_seed: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_adv, a·L_anchor): L_adv = −E D(G(z', y'[, ω'])) on fresh z' (not the reconstruction) [+ the
        reconstruction D's term]; L_anchor = d(↓G(z'), G_R(z')) on the same fakes (0 when off)."""
        with self.amp:
            fake = self.G(z_f, y_f, w_f).float()
            adv = g_hinge_loss(self.D(self._aug(fake, aug_seed, first), y_f))
            if self.D_recon is not None:  # official 512 px: a 2nd discriminator judges reconstructions
                adv = adv + self.stage.rec_disc_weight * g_hinge_loss(self.D_recon(self._aug(x_rec, aug_seed + 7, first), y))
            anchor = torch.zeros((), device=fake.device)
            if self.G_base is not None:
                with torch.no_grad():
                    target = self.G_base(z_f, y_f, w_f).float()
                anchor = self.stage.anchor * self.anchor_distance(downsample(fake, target.shape[-1]), target).mean()
        return adv, anchor

    def _weight(self, rec, adv) -> torch.Tensor:
        """Adaptive weight w from ∇_W of both losses, averaged over ranks (so w is the global batch's)."""
        return adaptive_weight(rec, adv, self.G.last_layer_weight, max=self.stage.w_max,
                               reduce=lambda g: dist.all_reduce_mean_(g, self.info))

    def train_step(self) -> dict[str, float]:
        """One G step and d_steps_per_g D steps on the global batch of this step."""
        if self.batches is None:
            self._start_data()
        st, step, dev = self.stage, self.step, self.dev
        dist.fault_hook(self.info, self.sdir.name, step)  # no-op unless PAGODA_TEST_FAULT is set
        alpha = st.alpha(step)
        self.G.set_alpha(alpha)
        d = self.draws(step)
        g_parts, d_parts = self._micro_batches()
        adv_on = self.adv_on(step)
        stats = dict(rec=0.0, adv=0.0, w=0.0, d=0.0, alpha=alpha)
        # ---- G step
        self.opt_G.zero_grad(set_to_none=True)
        split = st.split_g_step and adv_on  # official 256/512 px: the rec and the adv updates are separate steps
        later = []  # (slice, z, y, w) of each micro-batch, for the adversarial pass of a split step
        for sl, (x_hi, z, y) in zip(self._slices(), g_parts):
            z_f, y_f, w_f = (None if t is None else t[sl].to(dev) for t in (d.z_fresh, d.y_fresh, d.w_fresh))
            with self.amp:
                x_rec = self.G(z, y).float()
                rec = self.distance(x_rec, x_hi).mean()  # L_rec = d(G(E(x_lo), y), x_hi)
                if self.cache is not None:  # L_dstl = d(↓G(z, y, ω), ODE_teacher,ω(z, y)) at the teacher resolution
                    zc, yc, wc, x0 = self.cache.get(d.pool[sl])
                    out = self.G(zc, yc, wc).float()
                    rec = rec + self.distill * self.distance(downsample(out, x0.shape[-1]), x0).mean()
            if not adv_on:
                loss, adv, anchor, w = rec, torch.zeros(()), torch.zeros(()), torch.zeros(())
            else:
                adv, anchor = self._adv(z_f, y_f, w_f, x_rec, y, d.aug_seed, sl.start)
                w = self._weight(rec, adv)
                loss = rec + st.lam * w * adv + anchor
            check_finite(step, rec=rec.item(), adv=adv.item(), anchor=anchor.item())
            if split:
                (rec / self.A).backward()
                later.append((sl, z, y, w, z_f, y_f, w_f))
            else:
                (loss / self.A).backward()
            stats["rec"] += rec.item() / self.A
            stats["adv"] += adv.item() / self.A
            stats["w"] += w.item() / self.A
            if self.G_base is not None and adv_on:
                stats["anchor"] = stats.get("anchor", 0.0) + anchor.item() / self.A
        if split:  # one rec update on the whole global batch, then the adversarial term through the new weights
            self._step_G()
            for sl, z, y, w, z_f, y_f, w_f in later:
                with self.amp:
                    x_rec = self.G(z, y).float() if self.D_recon is not None else None
                    adv, anchor = self._adv(z_f, y_f, w_f, x_rec, y, d.aug_seed, sl.start)
                    ((st.lam * w * adv + anchor) / self.A).backward()
        self._step_G()
        # ---- D steps, each on a separate real batch
        if adv_on:
            per_step = len(d_parts) // st.d_steps_per_g
            for j, (_, _, z_d, y_d, w_d, _) in enumerate(d.d_batches):
                parts = d_parts[j * per_step:(j + 1) * per_step]
                stats["d"] += self.d_step(parts, z_d, y_d, w_d, d.aug_seed + 100 * (j + 1)) / st.d_steps_per_g
        self.ema.update(self.G)
        self.step += 1
        if self.step % PROBE_EVERY == 0 or self.step == st.steps:
            stats["margin"] = self.probe()
        return stats

    def _step_G(self) -> None:
        if any(p.grad is not None for p in self.params_G):
            dist.average_gradients(self.params_G, self.info)
            self.opt_G.step()
            self.opt_G.zero_grad(set_to_none=True)

    def d_step(self, parts, z_d: torch.Tensor, y_d: torch.Tensor | None, w_d: torch.Tensor | None, aug_seed: int
               ) -> float:
        """L_D = E relu(1 − D(x)) + E relu(1 + D(G(z'[, ω']))) [+ the same for D_recon on reconstructions]."""
        dev, A = self.dev, self.A
        reals, recons = (parts[:A], parts[A:]) if self.D_recon is not None else (parts, [None] * A)
        self.opt_D.zero_grad(set_to_none=True)
        total = 0.0
        for sl, (x_r, _, y_r), recon in zip(self._slices(), reals, recons):
            yd, wd = (None if t is None else t[sl].to(dev) for t in (y_d, w_d))
            with torch.no_grad(), self.amp:
                fake = self.G(z_d[sl].to(dev), yd, wd).float()
            with self.amp:  # real sample i and fake sample i get the same DiffAugment draw (as the official code)
                loss = d_hinge_loss(self.D(self._aug(x_r, aug_seed, sl.start), y_r),
                                    self.D(self._aug(fake, aug_seed, sl.start), yd))
                if recon is not None:  # reconstructions of another real batch vs that batch
                    x_hi, z, y = recon
                    with torch.no_grad():
                        rec = self.G(z, y).float()
                    loss = loss + d_hinge_loss(self.D_recon(self._aug(x_hi, aug_seed + 2, sl.start), y),
                                               self.D_recon(self._aug(rec, aug_seed + 3, sl.start), y))
            check_finite(self.step, d=loss.item())
            (loss / A).backward()
            total += loss.item() / A
        dist.average_gradients(self.params_D, self.info)
        self.opt_D.step()
        return total

    def _probe_batch(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """A fixed held-out batch: real images of the data set outside the latent cache (the cache itself if it
        holds the whole data set) with their labels, and fixed fresh z' with labels."""
        images, cached = self.pairs.images, set(self.pairs.indices.tolist())
        g = step_generator(self.cfg.seed, 98)
        order = torch.randperm(len(images), generator=g).tolist()
        held = [i for i in order if i not in cached][:PROBE_BATCH] or order[:PROBE_BATCH]
        x, y = next(loader(images, [held], 0))
        z, y_f, _ = self._fresh(g, len(held))
        dev = self.dev
        return x.to(dev), (y.to(dev) if self.ncls else None), z.to(dev), (None if y_f is None else y_f.to(dev))

    @torch.no_grad()
    def probe(self) -> float:
        """margin = E D(x) − E D(G(z')) on the held-out batch, no augmentation, D and G in eval mode."""
        if self._probe is None:
            self._probe = self._probe_batch()
        x, y, z, y_f = self._probe
        for m in (self.G, *self.Ds):
            m.eval()
        try:
            with self.amp:
                return margin(self.D(x, y), self.D(self.G(z, y_f).float(), y_f))
        finally:
            for m in (self.G, *self.Ds):
                m.train()

    # ---- the loop ----------------------------------------------------------------------------------
    def grid(self, tag: str | int) -> None:
        """EMA samples at fixed z and labels (the same for every stage, so growth can be watched)."""
        if not self.info.is_main:
            return
        n = 100 if self.ncls == 10 else 64
        R0 = self.G.base_resolution
        zg = self.G.sigma_max * torch.randn(n, self.C, R0, R0, generator=step_generator(self.cfg.seed, 99))
        yg = index_labels(0, n, self.ncls)
        G = self.ema.module
        G.set_alpha(float(self.G.alpha))
        with torch.no_grad():
            x = G(zg.to(self.dev), None if yg is None else yg.to(self.dev))
        save_image_grid(x, self.sdir / grid_name(tag), nrow=10 if self.ncls == 10 else None, scale=max(1, 128 // self.R))

    def run(self, progress: bool = True) -> Generator:
        st, cfg, info = self.stage, self.cfg, self.info
        self.sdir.mkdir(parents=True, exist_ok=True)
        self.load()
        self._start_data()
        spec = LoopSpec(f"{self.sdir.name} ({self.R}px)", st.steps, st.batch, cfg.ckpt_every, every=cfg.grid_every)
        run_loop(self.train_step, self.save, spec, self.step, self.sdir if info.is_main else None, progress, self.grid)
        self.G.set_alpha(1.0)
        self.ema.module.set_alpha(1.0)  # fade-in over: the saved generator has the official layout only
        self.grid("final")
        if info.is_main:
            save_checkpoint(self.ema.module.to_checkpoint(), self.sdir / GENERATOR_FILE)  # marks the stage done
        dist.barrier(info)
        return self.ema.module
