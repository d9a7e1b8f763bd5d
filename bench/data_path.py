"""The data path's speed: images/s that `pagoda.data.loader` delivers at 128 px from a folder of JPEGs.

    .venv/bin/python bench/data_path.py --out results/data_path [--images 512] [--workers 0 2]

Makes (once) a class-folder data set of --images JPEGs (quality 90) from random crops of the `skimage.data` photos
(astronaut, coffee, chelsea, rocket, …; crop sides 160-400 px, random aspect), then reads --steps batches of
--batch random indices at 128 px (ADM centre crop: box-halving + bicubic) through the training loader with each
--workers count, after one warm-up batch (worker start-up is reported separately). Writes OUT/data_path.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from common import environment, parser, print_table, write_results
from pagoda import dist
from pagoda.data import loader, make_dataset

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "cat",
          "motorcycle_left", "colorwheel")


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """root/<photo>/<i>.jpg: n random crops of the skimage photos, spread over one class folder per photo."""
    rng = np.random.default_rng(seed)
    photos = {}
    for name in PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download (pooch) is skipped
            continue
        if img.ndim == 3 and img.shape[-1] >= 3 and min(img.shape[:2]) >= 200:
            photos[name] = np.ascontiguousarray(img[..., :3])
    for i in range(n):
        name = list(photos)[i % len(photos)]
        img = photos[name]
        h, w = img.shape[:2]
        ch, cw = (int(rng.integers(160, min(400, s) + 1)) for s in (h, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[y:y + ch, x:x + cw]).save(root / name / f"{i:05d}.jpg", quality=90)
    return root


def main() -> None:
    p = parser(__doc__, "data_path", run=False)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    a = p.parse_args()
    folder = Path(a.out) / "jpegs"
    if not folder.is_dir() or sum(1 for _ in folder.rglob("*.jpg")) != a.images:
        make_folder(folder, a.images)
    data = make_dataset(folder, a.res)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(data), (a.batch,), generator=g).tolist() for _ in range(a.steps + 1)]
    rows = []
    for workers in a.workers:
        t0 = time.perf_counter()
        it = loader(data, iter(batches), workers)
        next(it)  # warm-up: worker start-up and the first batch
        t1 = time.perf_counter()
        for _ in range(a.steps):
            x, y = next(it)
        t2 = time.perf_counter()
        rows.append({"workers": workers, "first_batch_s": t1 - t0, "images_per_s": a.steps * a.batch / (t2 - t1),
                     "shape": list(x.shape)})
        print(rows[-1], flush=True)
    print_table(f"data path: {a.images} JPEGs → {a.res} px, batch {a.batch}, {dist.available_cpus()} CPUs", rows,
                [("workers", "workers", "d"), ("first_batch_s", "first batch s", ".2f"), ("images_per_s", "images/s", ".0f")])
    write_results(a.out, "data_path", {"images": a.images, "res": a.res, "batch": a.batch, "steps": a.steps,
                                       "env": environment(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
