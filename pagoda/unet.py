"""The ADM UNet (Dhariwal & Nichol 2021, openai/guided-diffusion) with PaGoDA's growth blocks.

Parameter names and shapes follow guided-diffusion's `UNetModel` exactly (`time_embed`, `label_emb`,
`input_blocks`, `middle_block`, `output_blocks`, `out`), so the public `edm_imagenet64_ema.pt`
teacher (preset `imagenet64`) loads with `load_state_dict(strict=True)`. PaGoDA's growth (paper §3.3)
appends, per doubling, one up-sampling block + `grow_res_blocks` res blocks after the trunk's output
blocks, continuing the `output_blocks.N` numbering, before the shared `out` head. The up-sampling block is
the trunk's own kind, as in sony/pagoda: a `ResBlock(up=True)` when `resblock_updown`, else `Upsample`
(nearest ×2, then a 3×3 conv to the growth width: state-dict names `output_blocks.N.0.conv.*`).

Text conditioning (`text_dim`) as DeepFloyd IF / GLIDE: the text encoder's tokens (B, L, D) are projected to the
time-embedding width (`encoder_proj`); every attention block appends their keys/values (`encoder_kv`, a 1×1 conv)
to its own, padding tokens masked out; an attention-pooled vector of them (`encoder_pooling`) is added to the time
embedding. An all-padding text (the empty caption) therefore computes exactly what the network computes without text.

The network is called `unet(x, noise_labels, class_labels, guidance=None, text=None)`, text = (tokens, mask, …) as
`pagoda.text.TextEmbedding`; noise_labels = c_noise(σ) is the caller's business (see `pagoda.teacher`). This file
knows nothing of noise schedules, losses or tokenisers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """ADM UNet hyper-parameters (guided-diffusion `UNetModel` arguments; `PRESETS["imagenet64"]` is the public teacher)."""

    resolution: int = 8  # input (teacher) resolution in pixels
    in_channels: int = 1  # image channels in
    out_channels: int = 1  # image channels out
    model_channels: int = 64  # base width; time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2)  # width multiplier per level (one level per down-sampling)
    num_res_blocks: int = 2  # res blocks per level in the encoder half (decoder half has one more)
    attention_resolutions: tuple[int, ...] = (4,)  # feature-map sizes in *pixels* that get attention
    num_head_channels: int = 32  # channels per attention head
    num_classes: int | None = 10  # None = unconditional; else label_emb is an Embedding
    use_scale_shift_norm: bool = True  # FiLM-style conditioning in res blocks
    resblock_updown: bool = True  # res blocks do the up/down sampling (else plain resample layers)
    qkv_layout: str = "flash"  # "flash" = (three, heads, dim) channel order; "legacy" = (heads, three, dim)
    dropout: float = 0.0  # dropout inside res blocks
    grow_channels: tuple[int, ...] = ()  # width of each appended doubling (any width >= 1, see GroupNorm32); empty for a teacher
    grow_res_blocks: int = 2  # plain res blocks after the up-sampling block, per doubling
    grow_scale_shift_norm: bool = False  # scale-shift norm in growth blocks (official: no)
    guidance_embed: bool = False  # ω-conditioning (PaGoDA's guided one-step G): an embedding of the guidance scale ω
    text_dim: int | None = None  # None = no text; else the width D of the text encoder's tokens (pagoda.text)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "grow_channels", tuple(int(c) for c in self.grow_channels))
        if self.qkv_layout not in ("flash", "legacy"):
            raise ValueError(f"qkv_layout must be 'flash' or 'legacy', got {self.qkv_layout!r}")
        if self.resolution % (2 ** (len(self.channel_mult) - 1)):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^(levels-1) for channel_mult {self.channel_mult}")
        bad = [w for w in (self.model_channels * m for m in self.channel_mult) if w % 32]
        if bad:
            raise ValueError(f"trunk widths {bad} are not multiples of 32 (ADM's GroupNorm uses 32 groups): change model_channels/channel_mult")
        if any(w < 1 for w in self.grow_channels):
            raise ValueError(f"grow_channels {list(self.grow_channels)} must all be >= 1")

    @property
    def output_resolution(self) -> int:
        """Resolution of the output image: the input resolution doubled once per growth stage."""
        return self.resolution * 2 ** len(self.grow_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}: the checkpoint was written by another version")
        return cls(**d)

    @property
    def top_width(self) -> int:
        """Width of the trunk's top (full-resolution) level, the one the head reads in a teacher."""
        return self.model_channels * self.channel_mult[0]

    def grown(self, channels: int | None = None) -> "UNetConfig":
        """The same config with one more doubling appended (width defaults to the last level's)."""
        last = self.grow_channels[-1] if self.grow_channels else self.top_width
        return replace(self, grow_channels=self.grow_channels + (int(channels or last),))


PRESETS: dict[str, UNetConfig] = {
    # The public EDM ImageNet-64 teacher (openai/consistency_models `edm_imagenet64_ema.pt`), 295.9M params.
    "imagenet64": UNetConfig(
        resolution=64, in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 4),
        num_res_blocks=3, attention_resolutions=(32, 16, 8), num_head_channels=64, num_classes=1000,
        use_scale_shift_norm=True, resblock_updown=True, qkv_layout="flash", dropout=0.0,
    ),
    # CPU demo teacher: Fashion-MNIST at 8x8, class-conditional, 1.3M params (trains in minutes on 2 cores).
    "demo8": UNetConfig(
        resolution=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2),
        num_res_blocks=2, attention_resolutions=(4,), num_head_channels=32, num_classes=10,
    ),
    # demo8 at 32x32: the same widths, blocks and 4-px attention, two more levels (the conventional route of
    # bench/pipeline_cost.py: a teacher trained at the target resolution).
    "demo32": UNetConfig(
        resolution=32, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 1, 1, 2),
        num_res_blocks=2, attention_resolutions=(4,), num_head_channels=32, num_classes=10,
    ),
    # Text-to-image teacher on colour emoji at 8x8 (`pagoda train --preset emoji`; text_dim set from the encoder).
    "emoji8": UNetConfig(
        resolution=8, in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2),
        num_res_blocks=2, attention_resolutions=(4,), num_head_channels=32, num_classes=None,
    ),
    # Tiny config for tests.
    "tiny": UNetConfig(
        resolution=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2),
        num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32, num_classes=10,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of the noise label (guided-diffusion `timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (as ADM), cast back to the input dtype: 32 groups (ADM) at every width that is a
    multiple of 32 (the whole trunk, the official growth widths), else gcd(32, width) (thin growth blocks, e.g. 16)."""

    def __init__(self, channels: int):
        super().__init__(math.gcd(32, channels), channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def zero_module(m: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters (ADM: last conv of each residual branch and the head)."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class Upsample(nn.Module):
    """Nearest 2x up-sampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        n, c, h, w = x.shape  # = F.interpolate(x, scale_factor=2, mode="nearest") bit for bit; G32 1.06× on CPU (§1)
        x = x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x down-sampling: a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, + embedding (add or scale-shift), GN-SiLU-dropout-conv(0), + skip."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.updown:  # resample between the norm/act and the conv, on both branches
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:  # h = GN(h) * (1 + scale) + shift
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention: GN, 1x1 qkv conv, multi-head attention, zero-init 1x1 projection, + skip."""

    def __init__(self, channels: int, num_head_channels: int, qkv_layout: str = "flash", text_channels: int | None = None):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"attention width {channels} is not divisible by num_head_channels {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.qkv_layout = qkv_layout
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)  # 1x1 convs, 2-D as in the public checkpoints
        if text_channels is not None:  # GLIDE/IF: text keys and values, appended to the image's
            self.encoder_kv = nn.Conv1d(text_channels, channels * 2, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x, context: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (B, C, H, W); context = (projected text tokens (B, C_text, L), mask (B, L)) or None."""
        b, c, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * c, H * W)
        heads, d, L = self.num_heads, c // self.num_heads, H * W
        if self.qkv_layout == "flash":  # channels ordered (three, heads, head_dim)
            q, k, v = qkv.reshape(b, 3, heads, d, L).unbind(1)
        else:  # legacy: channels ordered (heads, three, head_dim)
            q, k, v = qkv.reshape(b, heads, 3, d, L).unbind(2)
        keep = None
        if context is not None:  # keys/values += the text's, in the same channel layout; padding masked out
            kv, mask = self.encoder_kv(context[0]), context[1]
            if self.qkv_layout == "flash":
                ek, ev = kv.reshape(b, 2, heads, d, -1).unbind(1)
            else:
                ek, ev = kv.reshape(b, heads, 2, d, -1).unbind(2)
            k, v = torch.cat([k, ek], dim=-1), torch.cat([v, ev], dim=-1)
            keep = torch.cat([mask.new_ones(b, L), mask], dim=1)[:, None, None, :]  # (B, 1, 1, HW + L_text)
        # softmax(q^T k / sqrt(d)) v, per head; computed in float32 as ADM.
        h = F.scaled_dot_product_attention(
            q.transpose(-1, -2).float(), k.transpose(-1, -2).float(), v.transpose(-1, -2).float(), attn_mask=keep)
        h = h.transpose(-1, -2).reshape(b, c, H, W).type(x.dtype)
        return x + self.proj_out(h)


class TextPooling(nn.Module):
    """IF's `encoder_pooling`: LayerNorm, attention pooling (CLIP: the mean token queries the tokens), linear, LayerNorm."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm_in = nn.LayerNorm(channels)
        self.positional_embedding = nn.Parameter(torch.randn(1, channels) / channels**0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(channels, channels) for _ in range(3))
        self.proj = nn.Linear(channels, channels)
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, C), mask (B, L) -> (B, C); 0 for an all-padding row (the null text)."""
        b, c = tokens.shape[0], tokens.shape[2]
        x = self.norm_in(tokens)
        m = mask.to(x.dtype)[..., None]
        mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        x = torch.cat([mean, x], dim=1) + self.positional_embedding  # (B, 1 + L, C): the mean token first
        keep = torch.cat([mask.new_ones(b, 1), mask], dim=1)[:, None, None, :]

        def heads(t):  # (B, T, C) -> (B, heads, T, C / heads)
            return t.reshape(b, t.shape[1], self.num_heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           attn_mask=keep)
        pooled = self.norm_out(self.proj(a.transpose(1, 2).reshape(b, c)))
        return pooled * mask.any(1, keepdim=True).to(pooled.dtype)


class EmbedSequential(nn.Sequential):
    """nn.Sequential that passes the embedding to the res blocks inside, and the text to the attention blocks."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ADM UNet F(x, c_noise, y), plus PaGoDA growth blocks; called `unet(x, noise_labels, class_labels)`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        mc, ted = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, ted)
        if cfg.guidance_embed:  # ω enters like c_noise: sinusoidal embedding of 250·ln ω, MLP, added to the time embedding;
            # the last layer starts at zero, so a network grown this way computes what it did for every ω
            self.guidance_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), zero_module(nn.Linear(ted, ted)))
        if cfg.text_dim is not None:  # DeepFloyd IF: tokens projected once, pooled into the time embedding
            self.encoder_proj = nn.Linear(cfg.text_dim, ted)
            self.encoder_pooling = TextPooling(ted, ted // cfg.num_head_channels)
        res_kw = dict(emb_channels=ted, dropout=cfg.dropout, use_scale_shift_norm=cfg.use_scale_shift_norm)

        def attn(ch):
            return AttentionBlock(ch, cfg.num_head_channels, cfg.qkv_layout, None if cfg.text_dim is None else ted)

        def resample(ch, up):
            if cfg.resblock_updown:
                return ResBlock(ch, out_channels=ch, up=up, down=not up, **res_kw)
            return Upsample(ch, True) if up else Downsample(ch, True)

        # Encoder half: conv-in, then per level num_res_blocks res(+attn) blocks and a down-sampler.
        ch = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, res = [ch], cfg.resolution
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, out_channels=mc * mult, **res_kw)]
                ch = mc * mult
                if res in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(resample(ch, up=False)))
                skip_chans.append(ch)
                res //= 2
        self.middle_block = EmbedSequential(ResBlock(ch, **res_kw), attn(ch), ResBlock(ch, **res_kw))
        # Decoder half: per level num_res_blocks+1 res(+attn) blocks on [h, skip], then an up-sampler.
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), out_channels=mc * mult, **res_kw)]
                ch = mc * mult
                if res in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(resample(ch, up=True))
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.num_trunk_output_blocks = len(self.output_blocks)
        # PaGoDA growth: per doubling, 1 up-sampling block + grow_res_blocks res blocks (no skips, no attention).
        grow_kw = dict(emb_channels=ted, dropout=cfg.dropout, use_scale_shift_norm=cfg.grow_scale_shift_norm)
        self.grow_slices: list[tuple[int, int]] = []  # [start, end) indices into output_blocks per doubling
        for gch in cfg.grow_channels:
            start = len(self.output_blocks)
            up = ResBlock(ch, out_channels=gch, up=True, **grow_kw) if cfg.resblock_updown else Upsample(ch, True, gch)
            self.output_blocks.append(EmbedSequential(up))
            ch = gch
            for _ in range(cfg.grow_res_blocks):
                self.output_blocks.append(EmbedSequential(ResBlock(ch, **grow_kw)))
            self.grow_slices.append((start, len(self.output_blocks)))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, batch: int,
              guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Time embedding of c_noise(σ) plus the class embedding (labels: int (B,), or weights (B, classes)) plus, with
        `guidance_embed`, the embedding of the guidance scale ω (B,) (None = ω = 1, the unguided model)."""
        noise_labels = torch.as_tensor(noise_labels, device=self.time_embed[0].weight.device)
        if noise_labels.ndim == 0:
            noise_labels = noise_labels.expand(batch)
        emb = self.time_embed(timestep_embedding(noise_labels, self.config.model_channels).to(self.time_embed[0].weight.dtype))
        if self.config.num_classes is not None and class_labels is not None:
            if class_labels.dtype.is_floating_point:  # soft/one-hot labels; an all-zero row = unconditional
                emb = emb + class_labels.to(emb.dtype) @ self.label_emb.weight
            else:
                if class_labels.min() < 0 or class_labels.max() >= self.config.num_classes:
                    raise ValueError(f"class labels must lie in [0, {self.config.num_classes}), got {class_labels.tolist()}")
                emb = emb + self.label_emb(class_labels)
        if self.config.guidance_embed:  # None = ω = 1 (the unguided model)
            w = torch.as_tensor(1.0 if guidance is None else guidance, dtype=torch.float32, device=emb.device).expand(batch)
            emb = emb + self.guidance_embed(timestep_embedding(250.0 * torch.log(w), self.config.model_channels).to(emb.dtype))
        elif guidance is not None:
            raise ValueError("this network has no guidance embedding: train it with --guidance-max, or drop --guidance")
        return emb

    def text_context(self, text, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(projected tokens (B, C, L) for the attention blocks, mask (B, L), pooled (B, C) for the embedding), or None."""
        if self.config.text_dim is None:
            if text is not None:
                raise ValueError("this network has no text conditioning (text_dim is None): drop the text, or build it with text_dim")
            return None
        if text is None:
            raise ValueError(f"this network is text-conditioned: pass text = (tokens (B, L, {self.config.text_dim}), mask (B, L)); "
                             f"the empty caption is the unconditional one")
        tokens, mask = text[0], text[1].bool()
        if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != self.config.text_dim or mask.shape != tokens.shape[:2]:
            raise ValueError(f"text tokens must be (B={batch}, L, {self.config.text_dim}) with a (B, L) mask, "
                             f"got {tuple(tokens.shape)} and {tuple(mask.shape)}")
        u = self.encoder_proj(tokens.to(self.encoder_proj.weight.dtype))  # (B, L, C)
        return u.transpose(1, 2), mask, self.encoder_pooling(u, mask)

    def features(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                 guidance: torch.Tensor | None = None, text=None):
        """Feature maps before the head: [trunk output, after doubling 1, after doubling 2, ...] and the embedding."""
        cfg = self.config
        if x.shape[1] != cfg.in_channels or x.shape[-1] != cfg.resolution or x.shape[-2] != cfg.resolution:
            raise ValueError(f"UNet expects (B, {cfg.in_channels}, {cfg.resolution}, {cfg.resolution}) input, got {tuple(x.shape)}")
        emb = self.embed(noise_labels, class_labels, x.shape[0], guidance)
        context = self.text_context(text, x.shape[0])
        if context is not None:  # IF: the pooled text is added to the time embedding
            emb = emb + context[2].to(emb.dtype)
            context = context[:2]
        h, skips = x.type(self.out[2].weight.dtype), []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks[: self.num_trunk_output_blocks]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        feats = [h]
        for start, end in self.grow_slices:
            for block in self.output_blocks[start:end]:
                h = block(h, emb)
            feats.append(h)
        return feats, emb

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, text=None) -> torch.Tensor:
        feats, _ = self.features(x, noise_labels, class_labels, guidance, text)
        return self.out(feats[-1])
