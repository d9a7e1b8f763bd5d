"""Prompts on every command of a text run (issue 21 §5): `sample --prompts FILE`, `teacher sample --prompt`, `edit
--to-prompt`, the tools with `--prompt`, `eval` and `report`, and the one-line errors each command gives (one shared
check, pagoda/prompts.py), on the tiny emoji run of tests/helpers.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import StandInInception, build_tiny_text_run, invoke, ok, one_line_error
from pagoda import metrics as M
from pagoda.data import EMOJI_CREDIT
from pagoda.decoder import Generator
from pagoda.io import save_checkpoint
from pagoda.inference import teacher_grid
from pagoda.prompts import EXAMPLES, read_prompts, run_captions, spread
from pagoda.rundir import resolve_teacher_path
from pagoda.teacher import Denoiser, teacher_checkpoint
from pagoda.unet import PRESETS, UNet


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return build_tiny_text_run(tmp_path_factory.getbasetemp())[1]


@pytest.fixture(scope="module")
def emoji_png(tmp_path_factory):
    """Two colour 'emoji' (any size: read as the CLI reads any image)."""
    root = tmp_path_factory.mktemp("emoji_png")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"{name}.png")
    mask = np.full((16, 16), 255, np.uint8)
    mask[4:10, 4:12] = 0
    Image.fromarray(mask).save(root / "mask.png")
    return root


def test_read_prompts_skips_blank_lines_and_refuses_an_empty_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("red apple\n\n  cat face  \n\n")
    assert read_prompts(f) == ["red apple", "cat face"]
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(f)


def test_prompts_file_is_seed_stable_with_prompt_and_the_export_records_each_prompt(text_run, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("red apple\n\ncat face\n")
    ok(invoke("sample", "--checkpoint", text_run, "--prompts", f, "--n", 3, "--outdir", tmp_path / "file", "--no-progress"))
    ok(invoke("sample", "--checkpoint", text_run, "--prompt", "red apple", "--prompt", "cat face", "--n", 3,
              "--outdir", tmp_path / "flags", "--no-progress"))
    files = sorted(p.name for p in (tmp_path / "file").glob("*.png"))
    assert len(files) == 6 and files == sorted(p.name for p in (tmp_path / "flags").glob("*.png"))
    assert all((tmp_path / "file" / n).read_bytes() == (tmp_path / "flags" / n).read_bytes() for n in files)
    meta = json.loads((tmp_path / "file" / "export.json").read_text())
    assert meta["prompts"] == ["red apple", "cat face"] and meta["per_prompt"] == 3
    assert meta["image_prompts"] == ["red apple"] * 3 + ["cat face"] * 3
    # a resume with another n per prompt would put other prompts on the same files: refused, nothing deleted
    one_line_error(invoke("sample", "--checkpoint", text_run, "--prompts", f, "--n", 2, "--outdir", tmp_path / "file",
                          "--no-progress"), "another config")
    assert len(list((tmp_path / "file").glob("*.png"))) == 6


def test_teacher_sample_with_prompts_and_guidance(text_run, tmp_path):
    out = tmp_path / "t.png"
    text = ok(invoke("teacher", "sample", "--checkpoint", text_run, "--prompt", "red apple", "--prompt", "cat face",
                     "--n", 2, "--steps", 3, "--guidance", 2, "--out", out))
    assert "NFE per image" in text and out.is_file()
    with Image.open(out) as im:  # two labelled rows of two 8-px images
        assert im.height > 2 * 8


def test_edit_to_prompt_and_the_tools_under_a_prompt(text_run, emoji_png, tmp_path):
    a, b = emoji_png / "a.png", emoji_png / "b.png"
    text = ok(invoke("edit", a, "--checkpoint", text_run, "--to-prompt", "green heart", "--out", tmp_path))
    assert text.startswith("prompt '' -> prompt 'green heart'")  # the default: an unconditional encode
    r = json.loads((tmp_path / "a_to_prompt.json").read_text())
    assert (r["prompt"], r["to_prompt"]) == ("", "green heart") and (tmp_path / "a_to_prompt.png").is_file()
    text = ok(invoke("edit", a, "--checkpoint", text_run, "--prompt", "red heart", "--to-prompt", "green heart",
                     "--out", tmp_path / "src"))
    assert text.startswith("prompt 'red heart' -> prompt 'green heart'")
    assert (tmp_path / "src" / "a_to_prompt.png").read_bytes() != (tmp_path / "a_to_prompt.png").read_bytes()
    for args, start in ((("invert", a), "prompt 'red heart'  PSNR"), (("superres", a), "prompt 'red heart'  8px -> 16px"),
                        (("interpolate", a, b, "--steps", 3), "prompt 'red heart'  3 frames"),
                        (("inpaint", a, "--mask", emoji_png / "mask.png", "--iters", 2), "prompt 'red heart'  hole")):
        text = ok(invoke(*args, "--checkpoint", text_run, "--prompt", "red heart", "--out", tmp_path / args[0]))
        assert text.startswith(start), text
        numbers = json.loads(next((tmp_path / args[0]).glob("*.json")).read_text())
        assert numbers["prompt"] == "red heart" and "label" not in numbers
    one_line_error(invoke("edit", a, "--checkpoint", text_run, "--out", tmp_path / "x"), "--to-prompt")


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    """A random tiny class-conditional G and its teacher (files)."""
    root = tmp_path_factory.mktemp("class_model")
    torch.manual_seed(0)
    T = Denoiser(UNet(PRESETS["tiny"]))
    G = save_checkpoint(Generator.from_teacher(T).to_checkpoint(), root / "g.pt")
    return G, save_checkpoint(teacher_checkpoint(T), root / "t.pt")


COMMANDS = {  # each command's arguments before the condition, given (run or generator, teacher, image, mask)
    "sample": lambda g, t, im, m: ["sample", "--checkpoint", g],
    "teacher sample": lambda g, t, im, m: ["teacher", "sample", "--checkpoint", t, "--steps", 3],
    "invert": lambda g, t, im, m: ["invert", im, "--checkpoint", g, "--teacher", t],
    "superres": lambda g, t, im, m: ["superres", im, "--checkpoint", g, "--teacher", t],
    "edit": lambda g, t, im, m: ["edit", im, "--checkpoint", g, "--teacher", t],
    "interpolate": lambda g, t, im, m: ["interpolate", im, im, "--checkpoint", g, "--teacher", t],
    "inpaint": lambda g, t, im, m: ["inpaint", im, "--mask", m, "--checkpoint", g, "--teacher", t],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_refuses_the_wrong_condition_in_one_line(command, text_run, class_model, emoji_png, tmp_path):
    im, m = emoji_png / "a.png", emoji_png / "mask.png"
    text_args = COMMANDS[command](text_run, text_run, im, m)
    class_args = COMMANDS[command](*class_model, im, m)
    prompt = ["--to-prompt" if command == "edit" else "--prompt"]
    out = ["--out", tmp_path / ("o.png" if "sample" in command else "o")]
    one_line_error(invoke(*class_args, *prompt, "red apple", *out), "not text-conditional", "--class")
    one_line_error(invoke(*text_args, "--class", 1, *out), "text-conditional", '--prompt "red apple"')
    one_line_error(invoke(*text_args, *prompt, "", *out), "empty prompt")
    one_line_error(invoke(*text_args, *prompt, "x" * 200, *out), "longer than the text context")
    if command == "edit":  # the source caption is checked as well
        one_line_error(invoke(*text_args, "--to-prompt", "red apple", "--prompt", "  ", *out), "empty prompt")
    assert not list(tmp_path.iterdir())  # nothing written


def test_eval_scores_a_text_run_over_its_training_captions(text_run, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(M, "load_inception", lambda *a, **k: StandInInception())
    out = tmp_path / "eval.json"
    ok(invoke("eval", "--checkpoint", text_run, "--ref", "emoji", "--n", 8, "--ref-n", 8, "--out", out, "--no-progress"))
    row = json.loads(out.read_text())["results"][0]
    assert row["resolution"] == 16 and row["n"] == 8 and "training captions" in row["prompts"] and row["fid"] >= 0
    one_line_error(invoke("eval", "--checkpoint", text_run, "--n", 8, "--out", out, "--no-progress"), "--ref emoji")
    one_line_error(invoke("eval", "--checkpoint", text_run, "--ref", "emoji", "--accuracy", "--n", 8, "--out", out,
                          "--no-progress"), "bench/t2i_eval.py")


def test_report_of_a_text_run_shows_the_same_prompts_at_every_stage(text_run, tmp_path):
    ok(invoke("report", text_run, "--no-progress"))
    md = (text_run / "report.md").read_text()
    assert EMOJI_CREDIT in md
    for d in ("teacher (8 px + bicubic)", "stage-08 (G)", "stage-16 (G)"):
        assert f"{d}: the same prompts" in md
    teacher, prompts = str(resolve_teacher_path(text_run)), spread(run_captions(text_run), EXAMPLES)
    for up, same in ((16, True), (None, False)):  # the teacher's 8-px samples bicubic-upsampled to the last stage's
        ref = teacher_grid(teacher, 4, prompts=prompts, upsample=up, out=str(tmp_path / f"teacher-{up}.png"))[0]
        assert (ref.read_bytes() == (text_run / "teacher" / "prompts.png").read_bytes()) == same
