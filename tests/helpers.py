"""Helpers shared by the distributed, resume and fault tests."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pagoda.io import save_checkpoint
from pagoda.teacher import Denoiser
from pagoda.train import teacher_checkpoint
from pagoda.unet import PRESETS, UNet


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
