"""One PaGoDA generator stage (paper §3.2-3.3): alternate G and D steps at one resolution.

    G step:  L_G = L_rec + λ·w·L_adv  [+ β·L_dstl] [+ 0.5·w·L_adv,rec]   (rec on (x, z, y) from the cache;
             L_rec = d(G(E(x_lo), y), x_hi),  L_adv = −E D(G(z', y')),    adv on fresh z' ~ N(0, σ_max² I))
             w = ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + 1e-4) clipped to [0.01, 10], W = G's last conv weight
    D step:  L_D = E relu(1 − D(x)) + E relu(1 + D(G(z')))              (separate real batch, DiffAugment)

Randomness of step k is drawn from a generator seeded by (seed, stage, k): one *global* batch per step,
identical on every rank, of which each rank takes its slice. Hence `--resume` is bit-exact and N ranks
x batch B computes the same update as 1 rank x batch N·B (gradients are averaged over ranks).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pagoda import dist
from pagoda.data import downsample, save_image_grid
from pagoda.decoder import Generator
from pagoda.grow import StageConfig, stage_dir_name
from pagoda.io import load_checkpoint, save_checkpoint, save_json
from pagoda.losses import (DEFAULT_DISTANCE, Discriminator, TeacherSampleCache, adaptive_weight, d_hinge_loss,
                           diff_augment, g_hinge_loss, make_discriminator, make_distance)
from pagoda.teacher import Denoiser

DISTILL_POOL = 4096  # size of the fixed z pool whose teacher samples the distillation loss uses


def _opt(name: str, params, lr: float, betas=(0.9, 0.999)):
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[name]
    return cls(params, lr=lr, betas=betas, weight_decay=0.0)


class StageTrainer:
    """Holds G, D (and D_rec), their optimisers, the EMA of G and the step; `run()` trains to the end."""

    def __init__(self, cfg, stage: StageConfig, k: int, teacher: Denoiser, G_prev: Generator | None, data,
                 lat_z: torch.Tensor, lat_idx: torch.Tensor, sdir: Path, info: dist.DistInfo):
        from pagoda.train import EMA, step_generator
        self.cfg, self.stage, self.k, self.teacher, self.data = cfg, stage, k, teacher, data
        self.lat_z, self.lat_idx, self.sdir, self.info, self.dev = lat_z, lat_idx, Path(sdir), info, info.device
        torch.manual_seed(step_generator(cfg.seed, 1000 + k).initial_seed())  # fresh blocks and D: f(seed, stage)
        # G: stage 2 copies the teacher network; stage 3 grows the previous stage's EMA generator.
        if not stage.grow:
            G = Generator.from_teacher(teacher)
        else:
            if G_prev is None:
                G_prev = Generator.from_checkpoint(self.sdir.parent / stage_dir_name(stage.resolution // 2) / "generator.pt")
            G = G_prev.grow(stage.grow_channels, fade=stage.fade)
        self.G = G.to(self.dev).train()
        self.G.set_trainable(stage.activate_from)
        self.params_G = [p for p in self.G.parameters() if p.requires_grad]
        C, R, ncls = self.G.channels, stage.resolution, self.G.unet.config.num_classes
        self.C, self.R, self.ncls = C, R, ncls
        make_D = (lambda: Discriminator(R, C, ncls, base_channels=stage.d_channels, max_channels=4 * stage.d_channels)) \
            if cfg.discriminator == "multiscale" else \
            (lambda: make_discriminator(cfg.discriminator, resolution=R, in_channels=C, num_classes=ncls))
        self.D = make_D().to(self.dev)
        self.D_rec = make_D().to(self.dev) if stage.rec_disc_weight > 0 else None  # 2nd D on reconstructions
        d_name = cfg.distance or stage.distance or DEFAULT_DISTANCE
        self.d_rec = make_distance(d_name, **({"in_channels": C} if d_name == "features" else {})).to(self.dev)
        self.opt_G = _opt(stage.optimizer, self.params_G, stage.lr_G)
        self.Ds = [self.D] + ([self.D_rec] if self.D_rec is not None else [])
        self.opt_D = _opt(stage.optimizer, [p for D in self.Ds for p in D.parameters()], stage.lr_D, betas=(0.0, 0.99))
        self.ema, self.step = EMA(self.G, stage.ema), 0
        self.rng = lambda *keys: step_generator(cfg.seed, 1000 + k, *keys)
        self.cache = None  # distillation: teacher ODE samples for a fixed z pool, computed once, kept on disk
        if cfg.distill > 0:
            from pagoda.train import teacher_sample
            t_res = self.G.base_resolution
            self.cache = TeacherSampleCache(lambda z, y: teacher_sample(teacher, z, y, 18), DISTILL_POOL,
                                            (C, t_res, t_res), ncls, seed=cfg.seed, path=self.sdir / "teacher-samples.pt",
                                            device=self.dev)
        W, A = info.world_size, cfg.accumulate
        if stage.batch % (W * A):
            raise ValueError(f"global batch {stage.batch} of {self.sdir.name} is not divisible by ranks {W} x "
                             f"accumulation {A}: change --accumulate or the number of processes")
        self.B, self.A = stage.batch // (W * A), A
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.dev.type == "cuda"
                    else torch.autocast("cpu", enabled=False))

    # ---- state -------------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.sdir / "checkpoint.pt"

    def state(self) -> dict:
        return {"step": self.step, "G": self.G.state_dict(), "G_ema": self.ema.module.state_dict(),
                "D": [D.state_dict() for D in self.Ds], "opt_G": self.opt_G.state_dict(),
                "opt_D": self.opt_D.state_dict(), "stage": asdict(self.stage)}

    def load(self) -> bool:
        """Resume from sdir/checkpoint.pt if present (same stage config), else sync initial weights across ranks."""
        if not self.ckpt_path.exists():
            dist.broadcast_([t for m in [self.G, *self.Ds] for t in m.state_dict().values()], self.info)
            return False
        ck = load_checkpoint(self.ckpt_path, map_location=self.dev)
        if ck.get("stage") != asdict(self.stage):
            raise ValueError(f"{self.ckpt_path} was written with another stage config: use another --out "
                             f"or delete {self.sdir} to restart that stage")
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

    # ---- one step ----------------------------------------------------------------------------------
    def _slices(self):
        r, A, B = self.info.rank, self.A, self.B
        return [slice((r * A + a) * B, (r * A + a + 1) * B) for a in range(A)]

    def _real(self, idx: torch.Tensor, flip: torch.Tensor | None = None):
        """(x_hi at the stage resolution, labels) for cache entries idx, optionally h-flipped."""
        from pagoda.train import batch_of
        x, y = batch_of(self.data, self.lat_idx[idx])
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return downsample(x, self.R).to(self.dev), (y.to(self.dev) if self.ncls else None)

    def _aug(self, x: torch.Tensor, seed: int, first: int) -> torch.Tensor:
        """DiffAugment, sample i drawn from (seed, first + i), its index in the global batch: the same
        augmentation however the batch is split over ranks and accumulation steps."""
        from pagoda.train import step_generator
        if not self.cfg.augment:
            return x
        return torch.cat([diff_augment(x[i:i + 1], self.cfg.augment, step_generator(seed, first + i))
                          for i in range(len(x))])

    def _fresh(self, g: torch.Generator, n: int):
        z = self.G.sigma_max * torch.randn(n, *self.lat_z.shape[2:], generator=g)
        y = torch.randint(0, self.ncls, (n,), generator=g) if self.ncls else None
        return z, y

    def _adv(self, z_f, y_f, sl, x_rec, y, aug_seed: int, first: int) -> torch.Tensor:
        """L_adv = −E D(G(z', y')) on fresh z' (not the reconstruction) [+ the reconstruction D's term]."""
        yf = None if y_f is None else y_f[sl].to(self.dev)
        with self.amp:
            adv = g_hinge_loss(self.D(self._aug(self.G(z_f.to(self.dev), yf).float(), aug_seed, first), yf))
            if self.D_rec is not None:  # official 512 px: a 2nd discriminator judges reconstructions
                adv = adv + self.stage.rec_disc_weight * g_hinge_loss(self.D_rec(self._aug(x_rec, aug_seed + 7, first), y))
        return adv

    def _weight(self, rec, adv) -> torch.Tensor:
        """Adaptive weight w from ∇_W of both losses, averaged over ranks (so w is the global batch's)."""
        W = self.G.last_layer_weight
        if not self.info.enabled:
            return adaptive_weight(rec, adv, W)
        g_rec, g_adv = (torch.autograd.grad(loss, W, retain_graph=True)[0] for loss in (rec, adv))
        dist.all_reduce_mean_([g_rec, g_adv], self.info)
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.01, 10.0).detach()

    def train_step(self) -> dict[str, float]:
        """One G step and d_steps_per_g D steps on the global batch of this step."""
        from pagoda.train import check_finite
        st, step, N, dev = self.stage, self.step, self.lat_z.shape[0], self.dev
        dist.fault_hook(self.info, self.sdir.name, step)  # no-op unless PAGODA_TEST_FAULT is set
        alpha = st.alpha(step)
        self.G.set_alpha(alpha)
        g = self.rng(step)
        gi, flip = torch.randint(0, N, (st.batch,), generator=g), torch.rand(st.batch, generator=g) < 0.5
        z_f, y_f = self._fresh(g, st.batch)
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        pool = torch.randint(0, DISTILL_POOL, (st.batch,), generator=g)
        adv_on = st.lam > 0 and step >= st.adv_start
        stats = dict(rec=0.0, adv=0.0, w=0.0, d=0.0, alpha=alpha)
        # ---- G step
        self.opt_G.zero_grad(set_to_none=True)
        split = st.split_g_step and adv_on  # official 256/512 px: the rec and the adv updates are separate steps
        later = []  # (slice, z, y, w) of each micro-batch, for the adversarial pass of a split step
        for sl in self._slices():
            x_hi, y = self._real(gi[sl], flip[sl])
            # the cached latent of the image or of its flip, matching x_hi
            z = self.lat_z[gi[sl], flip[sl].long()].to(dev)
            with self.amp:
                x_rec = self.G(z, y).float()
                rec = self.d_rec(x_rec, x_hi).mean()  # L_rec = d(G(E(x_lo), y), x_hi)
                if self.cache is not None:  # L_dstl = d(↓G(z), ODE_teacher(z)) at the teacher resolution
                    zc, yc, x0 = self.cache.get(pool[sl])
                    out = downsample(self.G(zc.to(dev), None if yc is None else yc.to(dev)).float(), x0.shape[-1])
                    rec = rec + self.cfg.distill * self.d_rec(out, x0.to(dev)).mean()
            if not adv_on:
                loss, adv, w = rec, torch.zeros(()), torch.zeros(())
            else:
                adv = self._adv(z_f[sl], y_f, sl, x_rec, y, aug_seed, sl.start)
                w = self._weight(rec, adv)
                loss = rec + st.lam * w * adv
            check_finite(step, rec=rec.item(), adv=adv.item())
            if split:
                (rec / self.A).backward()
                later.append((sl, z, y, w))
            else:
                (loss / self.A).backward()
            stats["rec"] += rec.item() / self.A
            stats["adv"] += adv.item() / self.A
            stats["w"] += w.item() / self.A
        if split:  # one rec update on the whole global batch, then the adversarial term through the new weights
            self._step_G()
            for sl, z, y, w in later:
                with self.amp:
                    x_rec = self.G(z, y).float() if self.D_rec is not None else None
                    (st.lam * w * self._adv(z_f[sl], y_f, sl, x_rec, y, aug_seed, sl.start) / self.A).backward()
        self._step_G()
        # ---- D steps, each on a separate real batch
        if adv_on:
            for j in range(st.d_steps_per_g):
                stats["d"] += self.d_step(self.rng(step, j + 1), aug_seed + 100 * (j + 1)) / st.d_steps_per_g
        self.ema.update(self.G)
        self.step += 1
        return stats

    def _step_G(self) -> None:
        if any(p.grad is not None for p in self.params_G):
            dist.average_gradients(self.params_G, self.info)
            self.opt_G.step()
            self.opt_G.zero_grad(set_to_none=True)

    def d_step(self, g: torch.Generator, aug_seed: int) -> float:
        """L_D = E relu(1 − D(x)) + E relu(1 + D(G(z'))) [+ the same for D_rec on reconstructions]."""
        from pagoda.train import check_finite
        st, N, dev = self.stage, self.lat_z.shape[0], self.dev
        di, ri = torch.randint(0, N, (st.batch,), generator=g), torch.randint(0, N, (st.batch,), generator=g)
        z_d, y_d = self._fresh(g, st.batch)
        self.opt_D.zero_grad(set_to_none=True)
        total = 0.0
        for sl in self._slices():
            x_r, y_r = self._real(di[sl])
            yd = None if y_d is None else y_d[sl].to(dev)
            with torch.no_grad(), self.amp:
                fake = self.G(z_d[sl].to(dev), yd).float()
            with self.amp:
                loss = d_hinge_loss(self.D(self._aug(x_r, aug_seed, sl.start), y_r), self.D(self._aug(fake, aug_seed + 1, sl.start), yd))
                if self.D_rec is not None:  # reconstructions of another real batch vs that batch
                    x_hi, y = self._real(ri[sl])
                    with torch.no_grad():
                        rec = self.G(self.lat_z[ri[sl], 0].to(dev), y).float()
                    loss = loss + d_hinge_loss(self.D_rec(self._aug(x_hi, aug_seed + 2, sl.start), y),
                                               self.D_rec(self._aug(rec, aug_seed + 3, sl.start), y))
            check_finite(self.step, d=loss.item())
            (loss / self.A).backward()
            total += loss.item() / self.A
        dist.average_gradients([p for D in self.Ds for p in D.parameters()], self.info)
        self.opt_D.step()
        return total

    # ---- the loop ----------------------------------------------------------------------------------
    def grid(self, tag: str) -> None:
        """EMA samples at fixed z and labels (the same for every stage, so growth can be watched)."""
        from pagoda.train import fixed_labels, step_generator
        if not self.info.is_main:
            return
        n = 100 if self.ncls == 10 else 64
        R0 = self.G.base_resolution
        zg = self.G.sigma_max * torch.randn(n, self.C, R0, R0, generator=step_generator(self.cfg.seed, 99))
        yg = fixed_labels(n, self.ncls)
        G = self.ema.module
        G.set_alpha(float(self.G.alpha))
        with torch.no_grad():
            x = G(zg.to(self.dev), None if yg is None else yg.to(self.dev))
        save_image_grid(x, self.sdir / f"grid-{tag}.png", nrow=10 if self.ncls == 10 else None, scale=max(1, 128 // self.R))

    def run(self, progress: bool = True) -> Generator:
        from pagoda.train import progress_bar
        st, cfg, info = self.stage, self.cfg, self.info
        self.sdir.mkdir(parents=True, exist_ok=True)
        self.load()
        log = (self.sdir / "metrics.jsonl").open("a") if info.is_main else None
        t0, c0, seen, start = time.perf_counter(), time.process_time(), 0, self.step
        with progress_bar(progress and info.is_main) as bar:
            task = bar.add_task(f"{self.sdir.name} ({self.R}px)", total=st.steps, completed=self.step, info="")
            while self.step < st.steps:
                s = self.train_step()
                seen += st.batch
                ips = seen / (time.perf_counter() - t0)
                bar.update(task, completed=self.step, info=f"rec {s['rec']:.4f} adv {s['adv']:+.3f} w {s['w']:.2f} "
                                                           f"D {s['d']:.3f} α {s['alpha']:.2f} {ips:.0f} img/s")
                if log:
                    log.write(json.dumps({"step": self.step, **s, "img_per_s": ips}) + "\n")
                if self.step % cfg.ckpt_every == 0 or self.step == st.steps:
                    if log:
                        log.flush()
                    self.save()
                if cfg.grid_every and self.step % cfg.grid_every == 0:
                    self.grid(f"{self.step:06d}")
        if log:
            log.close()
        self.G.set_alpha(1.0)
        self.ema.module.set_alpha(1.0)  # fade-in over: the saved generator has the official layout only
        self.grid("final")
        if info.is_main:
            dt = time.perf_counter() - t0
            save_json({"seconds": dt, "cpu_seconds": time.process_time() - c0, "steps": st.steps - start,
                       "img_per_s": seen / max(dt, 1e-9)}, self.sdir / "timing.json")
            save_checkpoint(self.ema.module.to_checkpoint(), self.sdir / "generator.pt")  # marks the stage done
        dist.barrier(info)
        return self.ema.module
