"""Captions -> text conditioning: a byte tokeniser, the built-in transformer encoder, a frozen local T5.

Two backends with one call, `encoder(captions) -> TextEmbedding(tokens (B, L, D), mask (B, L), pooled (B, D))`:
- `builtin` (default): GLIDE's text transformer in miniature (Nichol et al. 2022 §2.3 / glide-text2im `Text2ImUNet`):
  byte tokens + learned positions, learned embeddings at padding positions (GLIDE's `xf_padding`), non-causal
  pre-LN blocks, final LayerNorm. Trained with the teacher, frozen afterwards (by its caller).
- `t5:PATH`: a frozen Hugging Face T5 encoder and its tokenizer read from the local folder PATH (DeepFloyd IF uses
  T5-XXL); needs the optional extra `pip install 'pagoda[t5]'` (transformers). Nothing is downloaded.

The empty caption is the null condition of classifier-free guidance: every position is padding (mask all False),
pooled = 0, and the UNet (pagoda/unet.py) then computes exactly what it computes with no text at all.

A text model carries its encoder as the frozen submodule `text_encoder` of the teacher (`pagoda.teacher.Denoiser`)
and of the generator (`pagoda.decoder.Generator`); both have `encode_text(captions) -> TextEmbedding`, and take
that embedding in the condition slot where a class model takes class labels: `D(x, sigma, text)`, `G(z, text[, ω])`
(the solver still sees only D(x, sigma, labels)). A checkpoint stores `text_spec(encoder)` beside the weights
(a `t5:` encoder: only its spec; its weights are read from PATH again).

    enc = make_text_encoder("builtin")                   # or "t5:/models/t5-small"
    text = enc(["red apple", ""])                        # tokens (2, 96, 128), mask (2, 96), pooled (2, 128)
    UNet(replace(cfg, text_dim=enc.width))(x, c_noise, None, text=text)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

CONTEXT = 96  # text positions; the longest emoji caption ("couple with heart: person, person, …") is 80 bytes


class TextError(ValueError):
    """A prompt or a text-encoder spec that cannot be used (one line: the problem and the fix)."""


class TextEmbedding(NamedTuple):
    """An encoded batch of captions: per-token embeddings, which tokens are real, and their masked mean."""

    tokens: torch.Tensor  # (B, L, D) float
    mask: torch.Tensor  # (B, L) bool: True = a caption token, False = padding
    pooled: torch.Tensor  # (B, D): mean of the real tokens; 0 for the empty (null) caption


def check_prompt(prompt: str, context: int = CONTEXT) -> str:
    """A user's prompt, refused in one line when empty or longer than the text context (in UTF-8 bytes)."""
    if not prompt.strip():
        raise TextError("empty prompt: the empty caption is the unconditional (null) text; fix: give a caption, e.g. --prompt \"red apple\"")
    if len(prompt.encode("utf-8")) > context:
        raise TextError(f"prompt {prompt[:40]!r}… is {len(prompt.encode('utf-8'))} bytes, longer than the text "
                        f"context of {context}; fix: shorten it")
    return prompt


# Tokeniser ---------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens: byte b -> b + 1, padding = 0 (vocabulary 257); deterministic and lossless."""

    vocab_size = 257

    def __init__(self, context: int = CONTEXT):
        self.context = context

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, context) int64, mask (B, context) bool); a caption longer than the context is an error."""
        ids = torch.zeros(len(captions), self.context, dtype=torch.long)
        for i, caption in enumerate(captions):
            raw = caption.encode("utf-8")
            if len(raw) > self.context:
                raise TextError(f"caption {caption[:40]!r}… is {len(raw)} bytes, longer than the text context of "
                                f"{self.context}; fix: shorten it or raise the context")
            ids[i, : len(raw)] = torch.tensor(list(raw), dtype=torch.long) + 1
        return ids, ids > 0

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The captions of (B, L) ids (padding dropped)."""
        return [bytes(t - 1 for t in row.tolist() if t > 0).decode("utf-8") for row in ids]


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Each caption replaced by the empty (null) caption with probability p (classifier-free guidance training)."""
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def null_text(text: TextEmbedding) -> TextEmbedding:
    """The null condition of `text`'s shape: every position padding, pooled 0 (what the empty caption encodes to,
    as the network sees it: masked tokens are never read)."""
    return TextEmbedding(text.tokens, torch.zeros_like(text.mask), torch.zeros_like(text.pooled))


def cat_text(*texts: TextEmbedding) -> TextEmbedding:
    """Batches of text embeddings stacked along the batch."""
    return TextEmbedding(*(torch.cat(parts) for parts in zip(*texts)))


def split_condition(labels) -> tuple[torch.Tensor | None, TextEmbedding | None]:
    """(class labels, text) of a model's condition slot: a TextEmbedding is text, anything else class labels."""
    return (None, labels) if isinstance(labels, TextEmbedding) else (labels, None)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens (B, L, D) -> (B, D); 0 for an all-padding row."""
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


# Backends ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuiltinTextConfig:
    """The built-in encoder's size (GLIDE: 128 positions, width 2048, 16 layers, 32 heads; ours fits a CPU)."""

    context: int = CONTEXT  # positions (UTF-8 bytes per caption)
    width: int = 128  # token embedding width D (the UNet's text_dim)
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads per block


class BuiltinTextEncoder(nn.Module):
    """GLIDE's text transformer: byte embedding + position, learned padding embeddings, pre-LN blocks, LayerNorm."""

    spec = "builtin"

    def __init__(self, config: BuiltinTextConfig = BuiltinTextConfig()):
        super().__init__()
        if config.width % config.heads:
            raise TextError(f"text width {config.width} is not divisible by {config.heads} heads; fix: change one")
        self.config, self.width, self.context = config, config.width, config.context
        self.tokenizer = ByteTokenizer(config.context)
        self.token_embedding = nn.Embedding(ByteTokenizer.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context, config.width) * config.width**-0.5)
        self.padding_embedding = nn.Parameter(torch.randn(config.context, config.width) * config.width**-0.5)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.width, config.heads, 4 * config.width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config.layers))
        self.final_ln = nn.LayerNorm(config.width)

    def forward(self, captions: list[str]) -> TextEmbedding:
        ids, mask = self.tokenizer.encode(captions)
        ids, mask = ids.to(self.padding_embedding.device), mask.to(self.padding_embedding.device)
        h = self.token_embedding(ids) + self.positional_embedding
        h = torch.where(mask[..., None], h, self.padding_embedding)  # GLIDE xf_padding: no attention mask needed
        for block in self.blocks:
            h = block(h)
        h = self.final_ln(h)  # (B, L, D)
        return TextEmbedding(h, mask, masked_mean(h, mask))


class T5TextEncoder(nn.Module):
    """A frozen Hugging Face T5 encoder and its tokenizer, read from a local folder (`save_pretrained` layout)."""

    def __init__(self, path: str | Path, context: int = CONTEXT):
        super().__init__()
        path = Path(path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise TextError(f"{path}: not a T5 folder (no config.json); fix: pass t5:PATH to a folder written by "
                            f"save_pretrained (model + tokenizer)")
        try:  # optional extra, imported only by the backend that needs it (3 s at import)
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise TextError("the t5: text encoder needs the optional package transformers; fix: "
                            "pip install 'pagoda[t5]', or use the builtin encoder") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = T5EncoderModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TextError(f"{path}: cannot load a T5 encoder and tokenizer ({first}); fix: save both with "
                            f"save_pretrained into that folder") from None
        object.__setattr__(self, "model", model)  # not a submodule: a checkpoint stores the spec, never T5's weights
        self.spec, self.context, self.width = f"t5:{path}", context, model.config.d_model

    def _apply(self, fn, *args, **kwargs):  # move the hidden model with .to()/.cuda()
        super()._apply(fn, *args, **kwargs)
        self.model._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> T5TextEncoder:
        return super().train(False)  # frozen: always in eval mode

    def forward(self, captions: list[str]) -> TextEmbedding:
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.context, truncation=False,
                               return_tensors="pt")
        if batch.input_ids.shape[1] > self.context:
            n = int(batch.attention_mask.sum(1).max())
            raise TextError(f"a caption is {n} T5 tokens, longer than the text context of {self.context}; fix: shorten it")
        device = self.model.device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device).bool()
        with torch.no_grad():
            h = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        empty = torch.tensor([not c for c in captions], device=device)
        mask = mask & ~empty[:, None]  # the empty caption is the null condition, not T5's lone </s>
        return TextEmbedding(h, mask, masked_mean(h, mask))


def text_spec(encoder: nn.Module) -> dict:
    """What a checkpoint stores to rebuild `encoder` (its weights travel in the model's state dict)."""
    return {"spec": encoder.spec, **({"config": asdict(encoder.config)} if encoder.spec == "builtin" else {})}


def text_encoder_from_spec(d: dict) -> nn.Module:
    """The encoder of `text_spec`'s dict, frozen (a builtin one still holds random weights: load them after)."""
    config = BuiltinTextConfig(**d["config"]) if "config" in d else None
    return make_text_encoder(d["spec"], config).eval().requires_grad_(False)


def canonical_spec(spec: str) -> str:
    """An encoder spec as a checkpoint stores it: 'builtin', or 't5:' + the absolute folder (so that two spellings
    of one folder compare equal, and a run reads its T5 from any working directory)."""
    if spec == "builtin":
        return spec
    if spec.startswith("t5:") and spec[3:]:
        return f"t5:{Path(spec[3:]).expanduser().resolve()}"
    raise TextError(f"unknown text encoder {spec!r}; fix: use 'builtin' or 't5:PATH' (a local T5 folder)")


def text_params(encoder: nn.Module) -> int:
    """Parameters of a text encoder, a t5: encoder's hidden (never saved) model included."""
    hidden = getattr(encoder, "model", None)
    return sum(p.numel() for m in (encoder, hidden) if m is not None for p in m.parameters())


def make_text_encoder(spec: str = "builtin", config: BuiltinTextConfig | None = None) -> nn.Module:
    """'builtin' -> BuiltinTextEncoder(config); 't5:PATH' -> T5TextEncoder(PATH, config's context)."""
    spec = canonical_spec(spec)
    if spec == "builtin":
        return BuiltinTextEncoder(config or BuiltinTextConfig())
    return T5TextEncoder(spec[3:], (config or BuiltinTextConfig()).context)
