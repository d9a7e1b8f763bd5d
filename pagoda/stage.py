"""One PaGoDA generator stage (paper §3.2-3.3): alternate G and D steps at one resolution.

    G step:  L_G = L_rec + β·L_dstl + λ·w·L_adv + a·L_anchor      (losses.generator_loss; per micro-batch)
             L_rec   = d(G(E(x_lo), y), x_hi)                   on (x, z, y) from the latent cache
             L_dstl  = d(↓G(z, y, ω), ODE_teacher,ω(z, y))      on a fixed pool of teacher samples (β > 0)
             L_adv   = −E D(G(z', y', ω'))                      on fresh z' ~ N(0, σ_max² I)
             L_anchor = d(↓G(z', y'), G_R(z', y'))              growth stages: G_R the frozen stage-2 generator
             w = ‖∇_W (L_rec + β·L_dstl)‖ / (‖∇_W L_adv‖ + 1e-4) clipped to [0.01, w_max], W = G's last-layer weight
    D step:  L_D = E relu(1 − D(x)) + E relu(1 + D(G(z')))       (separate real batch, h-flipped with p = 0.5;
             per-head hinge, mean over heads; the same DiffAugment draw for real sample i and fake sample i)
    probe:   margin = E D(x) − E D(G(z')) on a fixed held-out batch, no augmentation (logged, not trained on)

Randomness of step k is drawn from a generator seeded by (seed, stage, k): one *global* batch per step,
identical on every rank, of which each rank takes its slice. Hence `--resume` is bit-exact and N ranks
x batch B computes the same update as 1 rank x batch N·B (gradients are averaged over ranks). The real
images and latents of each step are read ahead by `data.loader` (worker processes for image files).
A text run (G with a text encoder, data with `captions`) conditions G, D and the teacher on the caption's
embedding where a class run passes class labels (y: a caption index until `labels` encodes it).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from pagoda import dist
from pagoda.data import default_workers, loader
from pagoda.decoder import Generator
from pagoda.discriminators import build_discriminators, continued_discriminators
from pagoda.draws import DISTILL_POOL, Fresh, Pairs, StageDraws, StepDraw, augment, caption_condition
from pagoda.encoder import LatentPairs
from pagoda.grow import StageConfig
from pagoda.images import downsample, save_image_grid
from pagoda.io import load_state, save_checkpoint
from pagoda.loop import EMA, LoopSpec, check_finite, index_labels, run_loop, step_generator
from pagoda.losses import (MultiscaleDistance, TeacherSampleCache, d_hinge_loss, g_hinge_loss,
                           generator_loss, make_distance, margin)
from pagoda.rundir import CHECKPOINT_FILE, GENERATOR_FILE, RunDir, grid_name
from pagoda.solvers import HEUN_POINTS, sample
from pagoda.teacher import Denoiser, guided

GUIDED_DISTILL = 3.0  # β of L_dstl for an ω-conditioned G when --distill is not given (docs/ablations.md)
PROBE_BATCH, PROBE_EVERY = 64, 10  # the held-out batch of the D margin, and how often (steps) it is measured


@dataclass(frozen=True)
class RunSpec:
    """What every stage of one run shares: train.TrainConfig's fields that a stage reads."""

    seed: int
    augment: str  # DiffAugment policy of D's inputs ('' = none)
    distill: float  # β of L_dstl (0 = off, unless guidance_max)
    guidance_max: float  # > 1: ω-conditioned G(z, y, ω), ω ~ U[1, ω_max]
    guided_adv: bool  # the adversarial fakes draw ω' ~ U[1, ω_max] too (else ω' = 1)
    accumulate: int  # micro-batches per rank and step
    workers: int | None  # DataLoader processes per rank (None = data.default_workers)
    ckpt_every: int
    grid_every: int

    @classmethod
    def of(cls, config) -> RunSpec:
        """The spec of a train.TrainConfig (or any object with these fields)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def _opt(name: str, params, lr: float, betas=(0.9, 0.999)):
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[name]
    return cls(params, lr=lr, betas=betas, weight_decay=0.0)


class StageTrainer:
    """Holds G, D (and D_recon), their optimisers, the EMA of G and the step; `run()` trains to the end."""

    def __init__(self, spec: RunSpec, stage: StageConfig, k: int, teacher: Denoiser, G_prev: Generator | None,
                 pairs: LatentPairs, sdir: Path, info: dist.DistInfo):
        self.spec, self.stage, self.pairs = spec, stage, pairs
        self.sdir, self.info, self.dev = Path(sdir), info, info.device
        run = RunDir(self.sdir.parent)
        torch.manual_seed(step_generator(spec.seed, 1000 + k).initial_seed())  # fresh blocks and D: f(seed, stage)
        # G: stage 2 copies the teacher network; stage 3 grows the previous stage's EMA generator.
        self.guidance_max = spec.guidance_max if spec.guidance_max > 1 else 0.0  # ω-conditioned G (PaGoDA §guidance)
        if not stage.grow:
            G = Generator.from_teacher(teacher, guidance=bool(self.guidance_max))
        else:
            if G_prev is None:
                G_prev = Generator.from_checkpoint(run.generator(stage.resolution // 2))
            G = G_prev.grow(stage.grow_channels, fade=stage.fade)
        self.G = G.to(self.dev).train()
        self.G.set_trainable(stage.activate_from)
        self.params_G = [p for p in self.G.parameters() if p.requires_grad]
        self.C, self.R, self.ncls = self.G.channels, stage.resolution, self.G.unet.config.num_classes
        captions = getattr(pairs.images, "captions", None) if self.G.text_encoder is not None else None
        self.condition = caption_condition(self.G, captions) if captions else None  # caption index -> text
        self.ncond = self.ncls or (len(captions) if captions else None)  # classes, or captions, y is drawn from
        R0, text_dim = self.G.base_resolution, self.G.config.text_dim
        self.draws = StageDraws(spec.seed, k, stage.batch, len(pairs.indices), stage.d_steps_per_g, (self.C, R0, R0),
                                self.G.sigma_max, self.ncond, self.guidance_max, spec.guided_adv)
        prev_ckpt = run.checkpoint(stage.resolution // 2)
        if stage.d_continue and not prev_ckpt.is_file():
            warnings.warn(f"{prev_ckpt} is missing: {self.sdir.name} starts a fresh discriminator", stacklevel=2)
        D, D_recon = (continued_discriminators(stage, self.C, self.ncls, prev_ckpt, text_dim)
                      if stage.d_continue and prev_ckpt.is_file()
                      else build_discriminators(stage, self.C, self.ncls, text_dim=text_dim))
        self.D, self.D_recon = D.to(self.dev), D_recon and D_recon.to(self.dev)
        self.Ds = [self.D] + ([self.D_recon] if self.D_recon is not None else [])
        self.distance = make_distance(stage.distance, self.C, stage.d_input).to(self.dev)
        self.G_base = None  # the anchor's target: the frozen stage-2 generator (the grown G's fresh samples stay on it)
        if stage.anchor > 0:
            base = run.generator(self.G.base_resolution)
            self.G_base = Generator.from_checkpoint(base, map_location=self.dev).eval().requires_grad_(False)
            self.anchor_distance = MultiscaleDistance()  # at R px: the pseudo-Huber pixel distance (one level)
        self.opt_G = _opt(stage.optimizer, self.params_G, stage.lr_G)
        self.params_D = [p for D in self.Ds for p in D.parameters() if p.requires_grad]  # not a frozen backbone
        self.opt_D = _opt(stage.optimizer, self.params_D, stage.lr_D, betas=(0.0, 0.99))
        self.ema, self.step = EMA(self.G, stage.ema), 0
        # L_dstl: guided teacher ODE samples for a fixed pool of (z, y, ω), computed once, kept on disk for every
        # stage. On with --distill β, and always with --guidance-max (β = GUIDED_DISTILL if unset). Off in a growth
        # stage with an anchor: the anchor holds ↓G(z', y', ω') on the stage-2 G, which L_dstl trained.
        beta = spec.distill or (GUIDED_DISTILL if self.guidance_max else 0.0)
        self.beta = 0.0 if self.G_base is not None else beta
        self.teacher_samples = None
        if self.beta > 0:
            def teacher_ode(z, y, omega):  # D_ω = D(x,σ,∅) + ω (D(x,σ,y) − D(x,σ,∅)), one batched call per step
                denoiser = teacher if omega is None else guided(teacher, omega)
                return sample(denoiser, z, HEUN_POINTS, "heun", self.labels(y), teacher.sigma_min, teacher.sigma_max)
            t_res = self.G.base_resolution
            self.teacher_samples = TeacherSampleCache(
                teacher_ode, DISTILL_POOL, (self.C, t_res, t_res), self.ncond, self.G.sigma_max, seed=spec.seed,
                path=run.teacher_samples, device=self.dev, guidance_max=self.guidance_max or 1.0)
        W, A = info.world_size, spec.accumulate
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
        ck = load_state(self.ckpt_path, self.stage, self.dev, delete=self.sdir, total="steps")
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
    def labels(self, y: torch.Tensor | None):
        """The condition slot of drawn or read labels y: class labels, a text run's caption embedding, or None."""
        if y is None or not self.ncond:
            return None
        return self.condition(y) if self.condition is not None else y

    def slices(self) -> list[slice]:
        """This rank's micro-batches: slices of the global batch."""
        r, A, B = self.info.rank, self.A, self.B
        return [slice((r * A + a) * B, (r * A + a + 1) * B) for a in range(A)]

    def keys(self, step: int) -> torch.Tensor:
        """The LatentPairs keys (2·entry + flip) this rank reads in step k: the reconstruction batch, then the
        real batch of each D step (and the reconstruction-D batch), each as this rank's slices."""
        d = self.draws(step)
        groups = [2 * d.entries + d.flips.long()]
        for ds in d.d_steps if self.adv_on(step) else []:
            groups += [2 * ds.real + ds.flips.long()] + ([2 * ds.recon] if self.D_recon is not None else [])
        return torch.cat([grp[sl] for grp in groups for sl in self.slices()])

    def adv_on(self, step: int) -> bool:
        """Whether step k trains with the adversarial term (and so takes D steps)."""
        return self.stage.lam > 0 and step >= self.stage.adv_start

    def _start_data(self) -> None:
        workers = self.spec.workers if self.spec.workers is not None else default_workers(self.pairs, self.info.world_size)
        steps = (self.keys(k).tolist() for k in range(self.step, self.stage.steps))
        self.batches = loader(self.pairs, steps, workers)

    def next_batches(self) -> tuple[list[Pairs], list[Pairs]]:
        """Next step's data in micro-batches: those of the G step, then those of the D steps (each D step's real
        batch, then its reconstruction-D batch), on the device."""
        x, z, y = (t.to(self.dev) for t in next(self.batches))
        B = self.B
        parts = [Pairs(x[i:i + B], z[i:i + B], self.labels(y[i:i + B])) for i in range(0, len(x), B)]
        return parts[:self.A], parts[self.A:]

    # ---- the losses of one micro-batch ---------------------------------------------------------------
    def adversarial_terms(self, fresh: Fresh, x_rec, y, aug_seed: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_adv, a·L_anchor) on the fresh fakes G(z', y', ω') [+ the reconstruction D's term on x_rec]."""
        with self.amp:
            fake = self.G(fresh.z, fresh.y, fresh.omega).float()
            adv = g_hinge_loss(self.D(augment(fake, self.spec.augment, aug_seed, first), fresh.y))
            if self.D_recon is not None:  # official 512 px: a 2nd discriminator judges reconstructions
                adv = adv + self.stage.rec_disc_weight * g_hinge_loss(
                    self.D_recon(augment(x_rec, self.spec.augment, aug_seed + 7, first), y))
            anchor = None
            if self.G_base is not None:
                with torch.no_grad():
                    target = self.G_base(fresh.z, fresh.y, fresh.omega).float()
                anchor = self.stage.anchor * self.anchor_distance(downsample(fake, target.shape[-1]), target).mean()
        return adv, anchor

    def reconstruction_terms(self, pairs: Pairs, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(G(z, y), L_rec, L_dstl or None) of one micro-batch."""
        with self.amp:
            x_rec = self.G(pairs.z, pairs.y).float()
            rec = self.distance(x_rec, pairs.x).mean()
            dstl = None
            if self.teacher_samples is not None:
                z, y, omega, x0 = self.teacher_samples.get(pool)
                y = self.labels(y)
                dstl = self.distance(downsample(self.G(z, y, omega).float(), x0.shape[-1]), x0).mean()
        return x_rec, rec, dstl

    def generator_loss(self, pairs: Pairs, fresh: Fresh, d: StepDraw, sl: slice, adv_on: bool):
        """losses.generator_loss of one micro-batch (and G(z, y) for the reconstruction D)."""
        x_rec, rec, dstl = self.reconstruction_terms(pairs, d.pool[sl])
        adv, anchor = self.adversarial_terms(fresh, x_rec, pairs.y, d.aug_seed, sl.start) if adv_on else (None, None)
        reduce = lambda g: dist.all_reduce_mean_(g, self.info)  # noqa: E731  w of the global batch
        loss = generator_loss(rec, dstl, adv, anchor, beta=self.beta, lam=self.stage.lam,
                              last_layer_weight=self.G.last_layer_weight, w_max=self.stage.w_max, reduce=reduce)
        check_finite(self.step, rec=loss.rec.item(), dstl=loss.dstl.item(), adv=loss.adv.item(),
                     anchor=loss.anchor.item())
        return loss

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One G step and d_steps_per_g D steps on the global batch of this step."""
        if self.batches is None:
            self._start_data()
        st, step, A = self.stage, self.step, self.A
        dist.fault_hook(self.info, self.sdir.name, step)  # no-op unless PAGODA_TEST_FAULT is set
        alpha = st.alpha(step)
        self.G.set_alpha(alpha)
        d = self.draws(step)
        g_batches, d_batches = self.next_batches()
        adv_on = self.adv_on(step)
        stats = dict(rec=0.0, **({"dstl": 0.0} if self.beta > 0 else {}), adv=0.0, w=0.0, d=0.0, alpha=alpha,
                     **({"anchor": 0.0} if self.G_base is not None and adv_on else {}))  # terms that are on
        # ---- G step; official 256/512 px (split_g_step): the L_rec update first, then L_adv through the new weights
        split = st.split_g_step and adv_on
        weights = []  # w of each micro-batch, for the adversarial pass of a split step
        self.opt_G.zero_grad(set_to_none=True)
        for sl, pairs in zip(self.slices(), g_batches):
            loss = self.generator_loss(pairs, d.fresh.part(sl, self.dev, self.labels), d, sl, adv_on)
            ((loss.reconstruction if split else loss.total) / A).backward()
            weights.append(loss.w)
            for name in stats.keys() & {"rec", "dstl", "adv", "w", "anchor"}:
                stats[name] += getattr(loss, name).item() / A
        if split:
            self._step_G()
            for sl, pairs, w in zip(self.slices(), g_batches, weights):
                with self.amp:
                    x_rec = self.G(pairs.z, pairs.y).float() if self.D_recon is not None else None
                fresh = d.fresh.part(sl, self.dev, self.labels)
                adv, anchor = self.adversarial_terms(fresh, x_rec, pairs.y, d.aug_seed, sl.start)
                ((st.lam * w * adv + (0 if anchor is None else anchor)) / A).backward()
        self._step_G()
        # ---- D steps, each on a separate real batch
        if adv_on:
            per_step = len(d_batches) // st.d_steps_per_g
            for j, ds in enumerate(d.d_steps):
                stats["d"] += self.d_step(d_batches[j * per_step:(j + 1) * per_step], ds.fresh,
                                          d.aug_seed + 100 * (j + 1)) / st.d_steps_per_g
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

    def d_step(self, batches: list[Pairs], fresh: Fresh, aug_seed: int) -> float:
        """L_D = E relu(1 − D(x)) + E relu(1 + D(G(z'[, ω']))) [+ the same for D_recon on reconstructions]."""
        A = self.A
        reals, recons = (batches[:A], batches[A:]) if self.D_recon is not None else (batches, [None] * A)
        self.opt_D.zero_grad(set_to_none=True)
        total = 0.0
        for sl, real, recon in zip(self.slices(), reals, recons):
            def aug(x, seed):  # real sample i and fake sample i get the same DiffAugment draw (as the official code)
                return augment(x, self.spec.augment, seed, sl.start)
            f = fresh.part(sl, self.dev, self.labels)
            with torch.no_grad(), self.amp:
                fake = self.G(f.z, f.y, f.omega).float()
            with self.amp:
                loss = d_hinge_loss(self.D(aug(real.x, aug_seed), real.y), self.D(aug(fake, aug_seed), f.y))
                if recon is not None:  # reconstructions of another real batch vs that batch
                    with torch.no_grad():
                        x_rec = self.G(recon.z, recon.y).float()
                    loss = loss + d_hinge_loss(self.D_recon(aug(recon.x, aug_seed + 2), recon.y),
                                               self.D_recon(aug(x_rec, aug_seed + 3), recon.y))
            check_finite(self.step, d=loss.item())
            (loss / A).backward()
            total += loss.item() / A
        dist.average_gradients(self.params_D, self.info)
        self.opt_D.step()
        return total

    # ---- the held-out probe and the grids ---------------------------------------------------------------
    def _probe_batch(self) -> tuple[Pairs, Fresh]:
        """A fixed held-out batch: real images of the data set outside the latent cache (the cache itself if it
        holds the whole data set) with their labels, and fixed fresh (z', y')."""
        images, cached = self.pairs.images, set(self.pairs.indices.tolist())
        g = step_generator(self.spec.seed, 98)
        order = torch.randperm(len(images), generator=g).tolist()
        held = [i for i in order if i not in cached][:PROBE_BATCH] or order[:PROBE_BATCH]
        x, y = next(loader(images, [held], 0))
        fresh = self.draws.fresh(g, len(held))
        real = Pairs(x.to(self.dev), None, self.labels(y.to(self.dev)))
        return real, Fresh(fresh.z.to(self.dev), self.labels(None if fresh.y is None else fresh.y.to(self.dev)), None)

    @torch.no_grad()
    def probe(self) -> float:
        """margin = E D(x) − E D(G(z')) on the held-out batch, no augmentation, D and G in eval mode."""
        if self._probe is None:
            self._probe = self._probe_batch()
        real, fresh = self._probe
        for m in (self.G, *self.Ds):
            m.eval()
        try:
            with self.amp:
                return margin(self.D(real.x, real.y), self.D(self.G(fresh.z, fresh.y).float(), fresh.y))
        finally:
            for m in (self.G, *self.Ds):
                m.train()

    def grid(self, tag: str | int) -> None:
        """EMA samples at fixed z and labels (the same for every stage, so growth can be watched)."""
        if not self.info.is_main:
            return
        n = 100 if self.ncls == 10 else 64
        R0 = self.G.base_resolution
        zg = self.G.sigma_max * torch.randn(n, self.C, R0, R0, generator=step_generator(self.spec.seed, 99))
        yg = index_labels(0, n, self.ncond)
        G = self.ema.module
        G.set_alpha(float(self.G.alpha))
        with torch.no_grad():
            x = G(zg.to(self.dev), self.labels(None if yg is None else yg.to(self.dev)))
        save_image_grid(x, self.sdir / grid_name(tag), nrow=10 if self.ncls == 10 else None, scale=max(1, 128 // self.R))

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> Generator:
        st, spec, info = self.stage, self.spec, self.info
        self.sdir.mkdir(parents=True, exist_ok=True)
        self.load()
        self._start_data()
        loop = LoopSpec(f"{self.sdir.name} ({self.R}px)", st.steps, st.batch, spec.ckpt_every, every=spec.grid_every)
        run_loop(self.train_step, self.save, loop, self.step, self.sdir if info.is_main else None, progress, self.grid)
        G = self.finish()
        self.grid("final")
        dist.barrier(info)
        return G

    def finish(self) -> Generator:
        """The fade-in is over (the saved generator has the official layout only); rank 0 writes the EMA generator to
        sdir/generator.pt, which marks the stage done."""
        self.G.set_alpha(1.0)
        self.ema.module.set_alpha(1.0)
        if self.info.is_main:
            self.sdir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.ema.module.to_checkpoint(), self.sdir / GENERATOR_FILE)
        return self.ema.module
