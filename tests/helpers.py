"""Helpers shared by several test files."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from pagoda.cli import app
from pagoda.decoder import FADE_MODE, Generator
from pagoda.encoder import LatentStore
from pagoda.io import save_checkpoint
from pagoda.teacher import Denoiser, load_teacher, teacher_checkpoint
from pagoda.unet import PRESETS, UNet


class StandInInception(torch.nn.Module):
    """clean-fid feat_model interface ((B, 3, 299, 299) in [0, 255] -> features), 16-d: 4×4 means, fixed projection."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
        self.shapes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[1:]))
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1) @ self.w


def tiny_assets(root: Path) -> tuple[Path, Path]:
    """A random `tiny` teacher checkpoint (8 px, 1 channel) and a 16-image, 2-class grey image folder."""
    torch.manual_seed(0)
    teacher = save_checkpoint(teacher_checkpoint(Denoiser(UNet(PRESETS["tiny"]))), root / "teacher.pt")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "data" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(root / "data" / f"c{c}" / f"{i}.png")
    return teacher, root / "data"


def read_cache(root) -> tuple:
    """(info, z (N, 2, C, R, R) float32, labels, indices) of a finished latent cache, read through LatentStore."""
    store = LatentStore(root)
    i = torch.arange(len(store))
    return store.info, torch.stack([store[i, 0], store[i, 1]], 1), store.labels, store.indices


def tensors(obj, prefix: str = ""):
    """(path, tensor) for every tensor inside nested dicts / lists."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def build_tiny_run(root: Path) -> Path:
    """A real 8 → 16 px run in seconds (10-step teacher, 16 encoded images, 3 steps per stage), built once per session."""
    from pagoda.report import write_report
    from pagoda.train import TEACHER_PRESETS, TrainConfig, train, train_teacher
    run = root / "pagoda-tiny-run"
    if not (run / "report.html").is_file():
        train_teacher(replace(TEACHER_PRESETS["tiny"], steps=10, batch=16, grid_every=10, ckpt_every=10, sample_steps=4),
                      run / "teacher", progress=False)
        train(TrainConfig(out=str(run), res=16, teacher_preset="tiny", preset="tiny", encode_images=16, encode_steps=4,
                          ckpt_every=100), progress=False)
        write_report(run)
    return run


def build_tiny_text_run(root: Path) -> tuple[Path, Path]:
    """(teacher.pt, run): a 6-step text teacher on the emoji + latent cache + stage-08 + grown stage-16, tiny widths
    and steps (≈ 10-40 s), built once per session."""
    from pagoda.train import TEACHER_PRESETS, TrainConfig, train, train_teacher
    teacher, run = root / "pagoda-tiny-text" / "teacher" / "teacher.pt", root / "pagoda-tiny-text" / "run"
    if not (run / "stage-16" / "generator.pt").is_file():
        tcfg = replace(TEACHER_PRESETS["tiny"], data="emoji", steps=6, batch=16, grid_every=6, ckpt_every=6, sample_steps=4)
        teacher = train_teacher(tcfg, teacher.parent, progress=False)
        train(TrainConfig(out=str(run), data="emoji", res=16, teacher=str(teacher), preset="tiny", encode_images=16,
                          encode_steps=4), progress=False)
    return teacher, run


def write_tiny_t5(folder: Path) -> Path:
    """A randomly initialised 2-layer T5 encoder (width 32) and a character tokenizer, written by save_pretrained."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    transformers.T5EncoderModel(cfg).save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, " ": 3, **{c: i + 4 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)
    return folder


def quick_classifier(resolution: int):
    """A small Fashion-MNIST classifier trained in a few seconds (first 4000 training images, 2 epochs): ≈ 84 % at 16 px."""
    from pagoda.classifier import classifier_config, train_classifier
    return train_classifier(classifier_config(resolution, layers="16p,32p,64", epochs=2, images=4000, lr=5e-3, batch=64,
                                                flip=0.0, shift=0))


# ---- the command line through typer's CliRunner ---------------------------------------------------

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
    return result.output


def one_line_error(result, *needles: str) -> str:
    """Exit code 2 and exactly one printed line, `error: ...`, that names the problem."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def learnt_gap(one: Path, other: Path, teacher: Path) -> dict[str, float]:
    """Per stage: ||G_other(z) − G_one(z)|| / ||G_one(z) − G_start(z)|| on fixed z, G_start the function the stage
    started from (the teacher copy at 8 px; the stage-08 G up-sampled as the fade-in starts at 16 px)."""
    z = 80 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.arange(16) % 2

    def out(G):
        with torch.no_grad():
            return G.eval()(z, y)
    start = {"stage-08": out(Generator.from_teacher(load_teacher(teacher)))}
    if (one / "stage-16").is_dir():
        g8 = out(Generator.from_checkpoint(one / "stage-08" / "generator.pt"))
        start["stage-16"] = torch.nn.functional.interpolate(g8, scale_factor=2, mode=FADE_MODE)
    gap = {}
    for s, x0 in start.items():
        a, b = (out(Generator.from_checkpoint(r / s / "generator.pt")) for r in (one, other))
        gap[s] = ((b - a).norm() / (a - x0).norm()).item()
    return gap
