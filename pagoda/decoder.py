"""The one-step generator G (PaGoDA stages 2-3): the teacher's UNet called once at σ_max, grown in resolution.

    G(z, y) = F(z / √(σ_max² + σ_d²), c_noise(σ_max), y)      z ~ N(0, σ_max² I) at the teacher resolution R

(paper §3.2: the raw network output is the image, no c_skip/c_out). `G.grow()` appends one doubling
(1 up-sampling res block + `grow_res_blocks` res blocks, `pagoda.unet`) and copies every existing
parameter by name, so `G.state_dict()` is always the official ADM/PaGoDA layout (no "unet." prefix).

Ours (the official code is not function-preserving): growth fades in ProGAN-style,
    G_2R(z) = (1 − α) · up(out(h_R)) + α · out(h_2R),   up = nearest 2x,
with h_R / h_2R the features before / after the new doubling and `out` the shared head. At α = 0,
G_2R(z) = up(G_R(z)) exactly. Nearest (not bilinear) because (i) it is what ADM's up-sampling does, so
at init the new path is already close to the old one (fresh res blocks are identities, the up-sampling
block replicates pixels) and ramping α causes no jump, and (ii) 2x2 box averaging, the ADM down-sampling
used for the encoder's input, inverts it exactly: avgpool(G_2R(z)) = G_R(z) at α = 0.
α is a non-persistent buffer: checkpoints carry it via `to_checkpoint()`, never in the state dict.

A text G (UNet `text_dim`) carries the teacher's frozen text encoder as the submodule `text_encoder` (state-dict
names "text_encoder.*"; its `pagoda.text.text_spec` under the checkpoint's "text_encoder"); it is never trained:

    G = load_generator("RUN/stage-64/generator.pt")
    x = G(z, G.encode_text(["red apple", "cat face"]))          # or G(z, text, ω) for an ω-conditioned G
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.io import ADM, GENERATOR, TEACHER, check_kind, load_checkpoint as _load_file, open_checkpoint
from pagoda.solvers import SIGMA_MAX
from pagoda.teacher import C_NOISE, Denoiser, load_teacher
from pagoda.text import TextEmbedding, split_condition, text_encoder_from_spec, text_spec
from pagoda.unet import GroupNorm32, ResBlock, UNet, UNetConfig

FADE_MODE = "nearest"  # up-sampling of the fading-out low-res image (see module docstring)
TRUNK_PREFIXES = ("time_embed.", "label_emb.", "encoder_proj.", "encoder_pooling.", "input_blocks.",
                  "middle_block.")  # frozen by set_trainable(k)


class Generator(nn.Module):
    """One-step generator G(z, y) = F(z/√(σ_max²+σ_d²), c_noise(σ_max), y) (PaGoDA stage 2, eq. for G)."""

    def __init__(self, unet: UNet, sigma_max: float = SIGMA_MAX, sigma_data: float = 0.5, c_noise: str = "adm",
                 text_encoder: nn.Module | None = None):
        super().__init__()
        if c_noise not in C_NOISE:
            raise ValueError(f"unknown c_noise convention {c_noise!r}: use 'adm' (250·ln σ) or 'edm' (ln(σ)/4)")
        if not sigma_max > 0 or not sigma_data > 0:
            raise ValueError(f"sigma_max and sigma_data must be positive, got {sigma_max} and {sigma_data}")
        self.unet, self.sigma_max, self.sigma_data, self.c_noise = unet, float(sigma_max), float(sigma_data), c_noise
        if text_encoder is not None and unet.config.text_dim is None:
            raise ValueError("a text encoder needs a text UNet: build the UNet with text_dim=the encoder's width")
        self.text_encoder = text_encoder if text_encoder is None else text_encoder.eval().requires_grad_(False)
        self.fade = False  # True while this generator has a fade-in path (grown with fade=True)
        self.register_buffer("alpha", torch.ones(()), persistent=False)  # fade-in weight α ∈ [0, 1]
        # Frozen snapshot of the previous head, only when a doubling changed the width (the shared head
        # cannot read the old features then). Hidden from state_dict()/parameters(); saved by to_checkpoint().
        self._fade_head: nn.Module | None = None  # set via _set_fade_head (plain attribute, not a submodule)
        # state_dict() / load_state_dict() use the official names: strip / restore the "unet." prefix.
        self.register_state_dict_post_hook(_strip_unet_prefix)
        self.register_load_state_dict_pre_hook(_add_unet_prefix)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: Denoiser | UNet, guidance: bool = False) -> Generator:
        """G initialised as a full copy of the teacher network, all parameters trainable (paper stage 2);
        σ_max, σ_data and c_noise are the teacher's (a bare UNet: EDM's defaults). guidance=True adds the ω embedding
        (zero-initialised: G(z, y, ω) = G(z, y) for every ω at the start)."""
        if isinstance(teacher, Denoiser):
            unet, sigma_data, conv, sigma_max = teacher.unet, teacher.sigma_data, teacher.c_noise, teacher.sigma_max
        elif isinstance(teacher, UNet):
            unet, sigma_data, conv, sigma_max = teacher, 0.5, "adm", SIGMA_MAX
        else:
            raise ValueError(f"from_teacher needs a pagoda Denoiser or UNet, got {type(teacher).__name__}")
        if unet.config.grow_channels:
            raise ValueError(f"the teacher UNet is already grown (grow_channels {list(unet.config.grow_channels)}): pass the teacher, not a generator")
        if guidance:
            copy_ = UNet(replace(unet.config, guidance_embed=True)).to(unet.out[2].weight.device)
            copy_.load_state_dict(unet.state_dict(), strict=False)  # every weight but the new guidance_embed.*
        else:
            copy_ = copy.deepcopy(unet)
        text_encoder = copy.deepcopy(teacher.text_encoder) if isinstance(teacher, Denoiser) else None
        G = cls(copy_, sigma_max=sigma_max, sigma_data=sigma_data, c_noise=conv, text_encoder=text_encoder)
        G.unet.requires_grad_(True)
        return G

    # ---- shape facts --------------------------------------------------------------------------------
    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    @property
    def resolution(self) -> int:
        """Output image size (teacher resolution · 2^doublings)."""
        return self.config.output_resolution

    @property
    def base_resolution(self) -> int:
        """Latent z size = the teacher's resolution."""
        return self.config.resolution

    @property
    def channels(self) -> int:
        """Image channels (of z and of the output)."""
        return self.config.out_channels

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """W of the adaptive weight w = ‖∇_W L_rec‖ / ‖∇_W L_adv‖ (VQGAN trick): as sony/pagoda, the last conv of the
        last output res block (`output_blocks[-1][0].out_layers[3]` in every official config), not the output head."""
        last = next(b[0] for b in reversed(self.unet.output_blocks) if isinstance(b[0], ResBlock))
        return last.out_layers[3].weight

    @property
    def fading(self) -> bool:
        """True when forward() blends in the up-sampled previous resolution (fade on, α < 1)."""
        return self.fade and bool(self.unet.grow_slices) and float(self.alpha) < 1.0

    def extra_repr(self) -> str:
        return (f"resolution={self.resolution}, base_resolution={self.base_resolution}, "
                f"sigma_max={self.sigma_max}, alpha={float(self.alpha):g}, fade={self.fade}")

    # ---- the generator ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Generator:
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.eval()  # frozen
        return self

    def encode_text(self, captions: list[str]) -> TextEmbedding:
        """The captions' embedding for the condition slot ("" = the null caption); a text G only."""
        if self.text_encoder is None:
            raise ValueError("this model is class-conditional (or unconditional), not text-conditional: drop --prompt")
        with torch.no_grad():
            return self.text_encoder(list(captions))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | TextEmbedding | None = None,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """G(z, y) (or G(z, y, ω) for an ω-conditioned generator: guidance = ω per sample, None = 1); y = class labels,
        or for a text G the TextEmbedding of `encode_text`."""
        labels, text = split_condition(labels)
        R, C = self.base_resolution, self.config.in_channels
        if z.ndim != 4 or z.shape[1] != C or z.shape[-2:] != (R, R):
            raise ValueError(f"G expects latents z of shape (B, {C}, {R}, {R}) at the teacher resolution, got {tuple(z.shape)}")
        # network input c_in(σ_max)·z and noise label c_noise(σ_max), one call at σ = σ_max
        x = z / math.sqrt(self.sigma_max**2 + self.sigma_data**2)
        t = C_NOISE[self.c_noise](torch.tensor(self.sigma_max, dtype=torch.float32, device=z.device))
        if not self.fading:  # α = 1 (or no growth): the fade path is not computed at all
            return self.unet(x, t, labels, guidance, text)
        feats, _ = self.unet.features(x, t, labels, guidance, text)
        # fade-in: (1 − α)·up(out(h_R)) + α·out(h_2R)
        old_head = self._fade_head if self._fade_head is not None else self.unet.out
        old = F.interpolate(old_head(feats[-2]), scale_factor=2, mode=FADE_MODE)
        new = self.unet.out(feats[-1])
        a = self.alpha.to(new.dtype)
        return (1 - a) * old + a * new

    def set_alpha(self, alpha: float) -> None:
        """Set the fade-in weight α (clamped to ≤ 1); α < 1 needs a generator grown with fade=True."""
        alpha = float(alpha)
        if not alpha >= 0:
            raise ValueError(f"fade-in alpha must be >= 0, got {alpha}")
        alpha = min(alpha, 1.0)
        if alpha < 1 and not self.fade:
            raise ValueError(f"set_alpha({alpha}): this generator has no fade-in path: grow it with grow(fade=True)")
        self.alpha.fill_(alpha)

    # ---- growth -------------------------------------------------------------------------------------
    def grow(self, channels: int | None = None, fade: bool = True) -> Generator:
        """A generator at twice the resolution: new doubling appended, every existing parameter copied.

        With fade=True it starts at α = 0 and equals up(self(z)) exactly; fade=False is the official growth (α = 1).
        Growth blocks get ADM's init (zero-init residual out conv). All parameters of the result are trainable.
        """
        if self.fading:
            raise ValueError(f"grow() during a fade-in (alpha={float(self.alpha):g}) would drop the fade path: call set_alpha(1.0) first")
        cfg = self.config.grown(channels)
        p = self.last_layer_weight
        unet = UNet(cfg).to(device=p.device, dtype=p.dtype)
        old, new = self.unet.state_dict(), unet.state_dict()
        width_changed = old["out.2.weight"].shape != new["out.2.weight"].shape
        with torch.no_grad():
            for name, value in old.items():  # trunk, earlier growth blocks, and the head (if same width)
                if name.startswith("out.") and width_changed:
                    continue
                if name not in new or new[name].shape != value.shape:  # cannot happen with a consistent UNet
                    raise RuntimeError(f"grow(): parameter {name} {tuple(value.shape)} has no match in the grown UNet")
                new[name].copy_(value)
        G = Generator(unet, self.sigma_max, self.sigma_data, self.c_noise, self.text_encoder).to(device=p.device)
        G.train(self.training)
        G.fade = bool(fade)
        G.alpha.fill_(0.0 if fade else 1.0)
        if fade and width_changed:  # the new head cannot read the old features: keep a frozen copy of the old one
            G._set_fade_head(copy.deepcopy(self.unet.out))
        return G

    def _set_fade_head(self, head: nn.Module | None) -> None:
        """Keep a frozen previous head as a plain attribute (nn.Module would register it as a submodule)."""
        object.__setattr__(self, "_fade_head", None if head is None else head.requires_grad_(False))

    def _apply(self, fn, *args, **kwargs):  # move the hidden fade head with .to()/.cuda()/.half()
        super()._apply(fn, *args, **kwargs)
        if self._fade_head is not None:
            self._fade_head._apply(fn, *args, **kwargs)
        return self

    # ---- freezing policy ----------------------------------------------------------------------------
    def set_trainable(self, activate_from: int | None) -> list[str]:
        """Official per-stage freezing: trunk frozen up to output block `activate_from`; None = all train.

        Frozen: time_embed, label_emb, input_blocks, middle_block, output_blocks[:activate_from]. Trained:
        output_blocks[activate_from:] (rest of the trunk + all growth blocks) and the head. Returns the
        trainable parameter names (state-dict names).
        """
        n_trunk = self.unet.num_trunk_output_blocks
        if activate_from is not None and not 0 <= activate_from <= n_trunk:
            raise ValueError(f"activate_from={activate_from} is outside [0, {n_trunk}]: this trunk has {n_trunk} output blocks")
        frozen = () if activate_from is None else TRUNK_PREFIXES + tuple(f"output_blocks.{i}." for i in range(activate_from))
        names = []
        for name, p in self.unet.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
            if p.requires_grad:
                names.append(name)
        return names

    # ---- checkpoints --------------------------------------------------------------------------------
    def to_checkpoint(self) -> dict[str, Any]:
        """Plain dict (tensors share storage with G): state_dict + config + σ's + fade state α / fade."""
        return {
            "kind": GENERATOR,
            "state_dict": self.state_dict(),
            "unet_config": self.config.to_dict(),
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "c_noise": self.c_noise,
            "alpha": float(self.alpha),
            "fade": self.fade,
            "fade_head": None if self._fade_head is None else self._fade_head.state_dict(),
            **({} if self.text_encoder is None else {"text_encoder": text_spec(self.text_encoder)}),
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | str | os.PathLike, expected: UNetConfig | None = None,
                        map_location: str | torch.device = "cpu") -> Generator:
        """Rebuild a generator from `to_checkpoint()` (a dict or a file); `expected` checks the architecture."""
        where = f" {ckpt}" if not isinstance(ckpt, dict) else ""
        d = ckpt if isinstance(ckpt, dict) else _load_file(ckpt, map_location=map_location)
        cfg = _checkpoint_config(d, where)
        if expected is not None and cfg != expected:
            raise ValueError(_mismatch(cfg, expected, where))
        with torch.device("meta"):  # no wasted random init: parameters come from the checkpoint
            unet = UNet(cfg)
        text_encoder = text_encoder_from_spec(d["text_encoder"]) if "text_encoder" in d else None
        G = cls(unet, d["sigma_max"], d["sigma_data"], d["c_noise"], text_encoder)
        _load_strict(G, d["state_dict"], where, assign=True)
        G.alpha = G.alpha.to(G.last_layer_weight.device)
        G._restore_fade(d)
        return G

    def load_checkpoint(self, ckpt: dict[str, Any] | str | os.PathLike) -> Generator:
        """Load `to_checkpoint()` (dict or file) into this generator in place (resume); the architecture must match."""
        where = f" {ckpt}" if not isinstance(ckpt, dict) else ""
        d = ckpt if isinstance(ckpt, dict) else _load_file(ckpt, map_location=self.last_layer_weight.device)
        cfg = _checkpoint_config(d, where)
        if cfg != self.config:
            raise ValueError(_mismatch(cfg, self.config, where))
        ours = (self.sigma_max, self.sigma_data, self.c_noise)
        theirs = (float(d["sigma_max"]), float(d["sigma_data"]), d["c_noise"])
        if ours != theirs:
            raise ValueError(f"checkpoint{where} has (sigma_max, sigma_data, c_noise) = {theirs}, this generator {ours}: build it with Generator.from_checkpoint")
        _load_strict(self, d["state_dict"], where, assign=False)
        self._restore_fade(d)
        return self

    def _restore_fade(self, d: dict[str, Any]) -> None:
        self.fade = bool(d["fade"])
        self.alpha.fill_(float(d["alpha"]))
        self._set_fade_head(None)
        head = d.get("fade_head")
        if head is not None:
            c = head["0.weight"].shape[0]
            ref = self.last_layer_weight
            fh = nn.Sequential(GroupNorm32(c), nn.SiLU(), nn.Conv2d(c, self.config.out_channels, 3, padding=1))
            fh.load_state_dict(head)
            self._set_fade_head(fh.to(device=ref.device, dtype=ref.dtype))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", expect: tuple[str, ...] = (GENERATOR, TEACHER, ADM)
               ) -> tuple[str, Generator | Denoiser]:
    """('generator', G) of a generator file; ('teacher', D) of a teacher file or a raw ADM state dict; frozen for
    inference. Another kind of file than `expect` gets a one-line CheckpointError."""
    kind, ckpt = open_checkpoint(path, expect=expect)
    if kind == GENERATOR:
        return "generator", Generator.from_checkpoint(ckpt).to(device).eval().requires_grad_(False)
    return "teacher", load_teacher(path, device, ckpt)


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Generator:
    """The EMA generator of a generator file (RUN/stage-XX/generator.pt), frozen for inference."""
    return load_model(path, device, expect=(GENERATOR,))[1]


# ---- helpers ----------------------------------------------------------------------------------------
def _strip_unet_prefix(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: "<prefix>unet.X" -> "<prefix>X", keeping the order (G's keys are the tail)."""
    ours = [k for k in state_dict if k.startswith(prefix + "unet.")]
    for k in ours:
        state_dict[prefix + k[len(prefix) + 5:]] = state_dict.pop(k)


def _add_unet_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: accept official names "<prefix>X" by mapping them to "<prefix>unet.X" (the text
    encoder's "<prefix>text_encoder.*" stay)."""
    ours = (prefix + "unet.", prefix + "text_encoder.")
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(ours)]:
        state_dict[prefix + "unet." + k[len(prefix):]] = state_dict.pop(k)


def _describe(cfg: UNetConfig) -> str:
    r = cfg.output_resolution
    return f"{r}×{r} generator (teacher {cfg.resolution}×{cfg.resolution}) with grow_channels {list(cfg.grow_channels)}"


def _mismatch(got: UNetConfig, expected: UNetConfig, where: str) -> str:
    a, b = got.to_dict(), expected.to_dict()
    diff = "; ".join(f"{k} {a[k]} vs {b[k]}" for k in a if a[k] != b[k])
    return f"checkpoint{where} is a {_describe(got)}, expected a {_describe(expected)} (differs in {diff}): load the matching stage's checkpoint"


def _checkpoint_config(d: dict[str, Any], where: str) -> UNetConfig:
    if "kind" in d:
        check_kind(d, f"checkpoint{where}", expect=(GENERATOR,))
    missing = [k for k in ("state_dict", "unet_config", "sigma_max", "sigma_data", "c_noise", "alpha", "fade") if k not in d]
    if missing:
        raise ValueError(f"checkpoint{where} is not a generator checkpoint (missing {missing}): pass one written by "
                         f"Generator.to_checkpoint()")
    return UNetConfig.from_dict(d["unet_config"])


def _load_strict(G: Generator, sd: dict[str, torch.Tensor], where: str, assign: bool) -> None:
    try:
        G.load_state_dict(sd, strict=True, assign=assign)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise ValueError(f"checkpoint{where} state_dict does not match its unet_config ({detail[:300]}): the file is damaged or was edited") from None
