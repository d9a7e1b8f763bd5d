"""The diffusion teacher: EDM preconditioning around a UNet, the EDM training loss, label dropout.

    D(x, σ, y) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ), y)        (Karras et al. 2022, eq. 7)
    c_in = 1/√(σ²+σ_d²), c_skip = σ_d²/(σ²+σ_d²), c_out = σ σ_d/√(σ²+σ_d²), σ_d = 0.5

c_noise is explicit: "adm" = 250·ln σ (the ADM / consistency-models checkpoints, and ours),
"edm" = ln(σ)/4 (NVlabs/edm's own networks). The denoiser carries its noise range [σ_min, σ_max]: the
encoder, the generator and every sampler take σ_max from it.

A teacher file is {"kind": "teacher", "state_dict" (EMA weights), "unet_config", "sigma_data", "c_noise", "sigma_min",
"sigma_max"[, "text_encoder"]} (docs/checkpoints.md; files before it held the weights under "ema");
a text teacher (UNet `text_dim`) holds its encoder as the frozen submodule `text_encoder` (weights in "state_dict",
`pagoda.text.text_spec` under "text_encoder"):

    D = load_teacher("RUN/teacher/teacher.pt")
    text = D.encode_text(["red apple", ""])            # pagoda.text.TextEmbedding; "" = the null caption
    x0 = D(x, sigma, text)                             # the condition slot takes the text; guided(D, ω) as for classes

`load_teacher` also reads a raw ADM state dict (e.g. `edm_imagenet64_ema.pt`) of a known UNet preset.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from pagoda.io import ADM, TEACHER, CheckpointError, check_kind, load_checkpoint
from pagoda.solvers import SIGMA_MAX, SIGMA_MIN
from pagoda.text import TextEmbedding, cat_text, null_text, split_condition, text_encoder_from_spec, text_spec
from pagoda.unet import PRESETS as UNET_PRESETS, UNet, UNetConfig

C_NOISE = {
    "adm": lambda sigma: 250.0 * torch.log(sigma),  # 1000 * 0.25 * ln σ (consistency_models karras_diffusion)
    "edm": lambda sigma: 0.25 * torch.log(sigma),
}


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in) of EDM preconditioning (Karras et al. 2022, Table 1)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """EDM-preconditioned denoiser D(x, σ, y) around a UNet F; σ is a tensor of shape (batch,)."""

    def __init__(self, unet: UNet, sigma_data: float = 0.5, c_noise: str = "adm", clamp: bool = False,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, text_encoder: nn.Module | None = None):
        super().__init__()
        if c_noise not in C_NOISE:
            raise ValueError(f"unknown c_noise convention {c_noise!r}: use 'adm' or 'edm'")
        if text_encoder is not None and unet.config.text_dim is None:
            raise ValueError("a text encoder needs a text UNet: build the UNet with text_dim=the encoder's width")
        self.unet, self.sigma_data, self.c_noise, self.clamp = unet, sigma_data, c_noise, clamp
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.text_encoder = text_encoder  # captions -> TextEmbedding (pagoda.text); trained with the teacher, then frozen

    def encode_text(self, captions: list[str]) -> TextEmbedding:
        """The captions' embedding for the condition slot ("" = the null caption); a text teacher only."""
        if self.text_encoder is None:
            raise ValueError("this model is class-conditional (or unconditional), not text-conditional: drop --prompt")
        return self.text_encoder(list(captions))

    @property
    def resolution(self) -> int:
        return self.unet.config.resolution

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | TextEmbedding | None = None
                ) -> torch.Tensor:
        """D(x, σ, y): y class labels (B,) / one-hot rows, or a TextEmbedding for a text teacher."""
        labels, text = split_condition(labels)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (_bcast(c, x) for c in edm_scalings(sigma, self.sigma_data))
        x_in, c_noise = (c_in * x).float(), C_NOISE[self.c_noise](sigma)
        F_x = self.unet(x_in, c_noise, labels) if text is None else self.unet(x_in, c_noise, labels, text=text)
        D_x = c_skip * x.float() + c_out * F_x.float()
        if self.clamp:
            D_x = D_x.clamp(-1, 1)
        return D_x.to(x.dtype)


def drop_labels(labels: torch.Tensor | None, num_classes: int | None, p: float,
                generator: torch.Generator | None = None) -> torch.Tensor | None:
    """One-hot labels with each row zeroed with probability p (zero row = unconditional, for CFG)."""
    if labels is None or num_classes is None:
        return None
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    if p > 0:
        keep = torch.rand(labels.shape[0], generator=generator, device=labels.device) >= p
        onehot = onehot * keep[:, None].float()
    return onehot


def edm_loss(denoiser: Denoiser, x: torch.Tensor, labels: torch.Tensor | None = None, P_mean: float = -1.2,
             P_std: float = 1.2, label_dropout: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM training loss λ(σ)‖D(x+σε, σ, y) − x‖², ln σ ~ N(P_mean, P_std²), λ = (σ²+σ_d²)/(σ σ_d)²; per sample.
    y: class labels (dropped here with `label_dropout`) or a TextEmbedding (captions dropped before encoding)."""
    b = x.shape[0]
    rnd = torch.randn(b, generator=generator, device=x.device)
    sigma = (rnd * P_std + P_mean).exp()
    weight = (sigma**2 + denoiser.sigma_data**2) / (sigma * denoiser.sigma_data) ** 2
    noise = torch.randn(x.shape, generator=generator, device=x.device) * _bcast(sigma, x)
    y = labels if isinstance(labels, TextEmbedding) else drop_labels(labels, denoiser.unet.config.num_classes,
                                                                     label_dropout, generator)
    D_x = denoiser(x + noise, sigma, y)
    return weight * ((D_x - x) ** 2).flatten(1).mean(1)


def guided(denoiser: Denoiser, scale: float | torch.Tensor):
    """Classifier-free guidance: D_ω = D(x, σ, ∅) + ω (D(x, σ, y) − D(x, σ, ∅)), one batched call (cond and uncond
    stacked); ω a float or one per sample (B,). Returns a denoiser callable; ω = 1 is the plain conditional model.
    ∅ is the zero class row, or for a text teacher the null (empty) caption."""
    num_classes = denoiser.unet.config.num_classes

    def D(x, sigma, labels=None):
        text = isinstance(labels, TextEmbedding)
        if labels is None or (num_classes is None and not text) or (not torch.is_tensor(scale) and scale == 1.0):
            return denoiser(x, sigma, labels)
        if text:
            both_y = cat_text(labels, null_text(labels))
        else:
            y = torch.nn.functional.one_hot(labels.long(), num_classes).float() if not labels.dtype.is_floating_point else labels
            both_y = torch.cat([y, torch.zeros_like(y)])
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both_y)
        cond, uncond = both.chunk(2)
        w = scale.to(x.device).view(-1, *[1] * (x.ndim - 1)) if torch.is_tensor(scale) else scale
        return uncond + w * (cond - uncond)

    return D


def teacher_checkpoint(denoiser: Denoiser, **extra) -> dict:
    """The teacher file: EMA weights, UNet config and the EDM constants (pagoda.io kind "teacher")."""
    text = {} if denoiser.text_encoder is None else {"text_encoder": text_spec(denoiser.text_encoder)}
    return {"kind": TEACHER, "state_dict": denoiser.state_dict(), "unet_config": denoiser.unet.config.to_dict(),
            "sigma_data": denoiser.sigma_data, "c_noise": denoiser.c_noise, "sigma_min": denoiser.sigma_min,
            "sigma_max": denoiser.sigma_max, **text, **extra}


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu", ckpt: dict[str, Any] | None = None
                 ) -> Denoiser:
    """A teacher file of ours, or a raw ADM state dict of a known preset, as a frozen Denoiser (`ckpt`: already loaded)."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    kind = check_kind(ckpt, path, expect=(TEACHER, ADM))
    if kind == TEACHER:
        D = Denoiser(UNet(UNetConfig.from_dict(ckpt["unet_config"])), ckpt.get("sigma_data", 0.5),
                     ckpt.get("c_noise", "adm"), sigma_min=ckpt.get("sigma_min", SIGMA_MIN),
                     sigma_max=ckpt.get("sigma_max", SIGMA_MAX),
                     text_encoder=text_encoder_from_spec(ckpt["text_encoder"]) if "text_encoder" in ckpt else None)
        D.load_state_dict(ckpt["state_dict"] if "state_dict" in ckpt else ckpt["ema"])  # "ema": files before the convention
        return D.to(device).eval().requires_grad_(False)
    sd = ckpt.get("state_dict", ckpt)
    sd = {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items() if torch.is_tensor(v)}
    for cfg in UNET_PRESETS.values():
        with torch.device("meta"):
            ref = UNet(cfg).state_dict()
        if ref.keys() == sd.keys() and all(ref[k].shape == sd[k].shape for k in ref):
            unet = UNet(cfg)
            unet.load_state_dict(sd, strict=True)
            return Denoiser(unet).to(device).eval().requires_grad_(False)
    raise CheckpointError(f"{path} is a raw state dict that matches no teacher architecture (known ADM presets: "
                          f"{', '.join(UNET_PRESETS)}); pass a pagoda teacher checkpoint")
