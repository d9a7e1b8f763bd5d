"""The condition a user asks for — a class or, for a text run, a prompt — checked once for every command and route.

A text model (`text_encoder` not None: pagoda/text.py) takes the TextEmbedding of its captions in the slot where a
class model takes labels; the empty caption "" is the null condition (an unconditional encode or decode). Every
command (`pagoda sample`, `teacher sample`, `invert`, `superres`, `edit`, `interpolate`, `inpaint`, `eval`) and
every route of `pagoda serve` refuses a class on a text model, a prompt on a class model, and an empty or over-long
prompt here, in one line (`check_condition`).

    pagoda sample --checkpoint runs/emoji --prompts prompts.txt       # read_prompts: one per line
    pagoda edit heart.png --to-prompt "green heart"                   # condition(G, 1, prompt="")  (the null caption)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pagoda.data import make_dataset
from pagoda.rundir import run_of
from pagoda.text import TextEmbedding, check_prompt

EXAMPLES = 8  # example prompts `pagoda serve` offers (from the training captions)


def check_class(num_classes: int | None, class_: int | None) -> None:
    """A one-line ValueError unless `class_` is None or a class of the model."""
    if num_classes is None and class_ is not None:
        raise ValueError("this model is unconditional: drop --class")
    if num_classes is not None and class_ is not None and not 0 <= class_ < num_classes:
        raise ValueError(f"--class {class_} is out of range: the model has classes 0..{num_classes - 1}")


def check_condition(model: torch.nn.Module, class_: int | None = None, prompts: list[str] | None = None,
                    need_prompt: bool = False) -> None:
    """One-line ValueErrors: a prompt on a model without text, a class on a text model (or no prompt where
    `need_prompt`), a bad prompt (text.check_prompt), a class the model does not have."""
    encoder = getattr(model, "text_encoder", None)
    if prompts and encoder is None:
        raise ValueError("this model is not text-conditional (it has no text encoder): drop --prompt"
                         + ("" if model.unet.config.num_classes is None else " and pass --class N"))
    if encoder is not None and (class_ is not None or (need_prompt and not prompts)):
        raise ValueError('this model is text-conditional, it has no classes: pass --prompt "red apple"'
                         + (" instead of --class" if class_ is not None else ""))
    for prompt in prompts or []:
        check_prompt(prompt, encoder.context)
    check_class(model.unet.config.num_classes, class_)


def condition(model: torch.nn.Module, batch: int, class_: int | None = None, prompt: str | None = None):
    """The condition slot of `batch` images under one class or prompt (checked): a text model's TextEmbedding of
    `prompt` (None: the empty, null caption), class labels of `class_`, or None."""
    check_condition(model, class_, None if prompt is None else [prompt])
    if getattr(model, "text_encoder", None) is not None:
        return model.encode_text([prompt or ""] * batch)
    return None if class_ is None else torch.full((batch,), class_)


def rows(y, index: slice):
    """Rows `index` of a condition: class labels, a TextEmbedding or None."""
    if isinstance(y, TextEmbedding):
        return TextEmbedding(*(t[index] for t in y))
    return None if y is None else y[index]


def named(y, prompt: str | None, i: int = 0) -> dict:
    """What a result's numbers say of its condition: {"prompt": …} for text ("" = the null caption), else {"label": …}."""
    if isinstance(y, TextEmbedding):
        return {"prompt": prompt or ""}
    return {"label": None if y is None else int(y[i])}


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped; each checked when the model is known)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--prompts {path} is a directory: pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt: write one caption per line")
    return prompts


def gather_prompts(prompts: list[str] | None, path: str | Path | None = None) -> list[str] | None:
    """--prompt's prompts, then --prompts FILE's (None when neither is given)."""
    return (list(prompts or []) + (read_prompts(path) if path is not None else [])) or None


def run_captions(checkpoint: str | Path) -> list[str] | None:
    """The training captions of the run `checkpoint` belongs to (its config.json's data), None when unknown."""
    run = run_of(checkpoint)
    if run is None or not run.config.is_file():
        return None
    data = json.loads(run.config.read_text()).get("train", {}).get("data")
    return getattr(make_dataset(data, 8), "captions", None) if data else None


def spread(captions: list[str], k: int) -> list[str]:
    """k captions spread evenly over `captions` (in their order: across the emoji groups)."""
    return [captions[i * len(captions) // k] for i in range(min(k, len(captions)))]


def shuffled(captions: list[str], seed: int = 0) -> list[str]:
    """The captions in a fixed seeded order (what `pagoda eval` cycles: the first n cover every group)."""
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    return [captions[i] for i in order]
