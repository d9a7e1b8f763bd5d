"""The `pagoda` command line: parses options into a config, calls one function, prints the result.

    pagoda train                                  # the whole method on Fashion-MNIST (2-core CPU: ≈ 18 min)
    pagoda sample --checkpoint runs/demo --n 64   # one network call per image
    pagoda invert photo.png --checkpoint runs/demo
    pagoda superres low.png                       # inverse problems through the teacher's encoder and G
    pagoda edit shirt.png --to-class 3
    pagoda interpolate a.png b.png
    pagoda inpaint shirt.png --mask mask.png
    pagoda serve --checkpoint runs/demo           # a local page: samples and the inverse problems as you type
    pagoda teacher train                          # the teacher alone; every --checkpoint/--teacher takes a run dir
    pagoda teacher sample --checkpoint runs/demo
    pagoda encode --teacher runs/demo --out latents
    pagoda eval --checkpoint runs/demo
    pagoda report runs/demo

tests/test_readme.py runs every command shown here, in the README and in each command's `--help` examples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pagoda.discriminators import DISCRIMINATORS
from pagoda.grow import PRESETS as GROW_PRESETS, WIDTH_FORMS, check_width
from pagoda.io import CheckpointError
from pagoda.losses import DISTANCES
from pagoda.rundir import RunDir, resolve_teacher_path
from pagoda.solvers import HEUN_POINTS, METHODS
from pagoda.train import TEACHER_PRESETS, TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PaGoDA: a one-step generator grown from a low-resolution diffusion teacher.")
teacher_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train or sample the diffusion teacher.")
app.add_typer(teacher_app, name="teacher")
console = Console()

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, KeyError)


def fail(msg: str) -> None:
    """One-line error and exit code 2."""
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def choices(names) -> str:
    """A registry's names as a help list: 'a | b | c'."""
    return " | ".join(names)


def teacher_file(path: str | None) -> str | None:
    """A teacher option's value: a checkpoint file as given; a run directory (or its teacher/ or stage-XX/) -> the
    run's teacher (RUN/teacher/teacher.pt, or the --teacher its config.json names)."""
    if path is None or not Path(path).is_dir():
        return path
    try:
        return str(resolve_teacher_path(path))
    except CheckpointError:
        fail(f"{path} holds no teacher (no teacher/teacher.pt, no --teacher in its config.json): pass a teacher .pt "
             f"or a run directory that has one")


def width_schedule(schedule: str | None) -> str | None:
    """--grow-width's value, checked before anything runs (pagoda.grow.check_width)."""
    try:
        return None if schedule is None else check_width(schedule)
    except ValueError as e:
        fail(str(e))


TEXT_ENCODER_HELP = ("Captioned data (--data emoji): the teacher's text encoder, 'builtin' (trained with the teacher) or "
                     "'t5:PATH' (a frozen Hugging Face T5 from a local folder; pip install 'pagoda[t5]'); default builtin.")
DEFAULT = TrainConfig()  # every `pagoda train` default, and the run directory the other commands read by default
RUN_DIR = DEFAULT.out


def run(fn, *args, threads: int | None = None, **kw):
    """Call fn under the thread policy (pagoda.dist: `threads` fixed, else adapted to the machine's load); turn the
    user errors it raises into one-line messages."""
    from pagoda.dist import thread_policy
    try:
        with thread_policy(threads):
            return fn(*args, **kw)
    except typer.Exit:
        raise
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"unknown name {msg}"
        fail(msg)
    except OSError as e:
        fail(f"{getattr(e, 'filename', '') or ''} {e.strerror or e}: check the path and its permissions".strip())
    except RuntimeError as e:  # TrainingError and torch errors: still one line
        fail(str(e).strip().splitlines()[0])


@app.command(epilog="Examples:\n\n  pagoda train\n\n  pagoda train --res 16 --out runs/small\n\n"
                    "  pagoda train --res 128 --data /data/imagenet --teacher edm_imagenet64_ema.pt --preset imagenet64 --gpus 8")
def train(
    res: int = typer.Option(DEFAULT.res, help="Target resolution: teacher resolution x 2^k."),
    data: str = typer.Option(DEFAULT.data, help="'fashion-mnist', an image folder (class sub-folders) or an EDM .zip."),
    teacher: Optional[str] = typer.Option(DEFAULT.teacher, callback=teacher_file,
                                          help="Teacher checkpoint or run directory; default: train one into OUT/teacher."),
    out: str = typer.Option(DEFAULT.out, help="Run directory."),
    preset: str = typer.Option(DEFAULT.preset, help=f"Growth preset: {choices(GROW_PRESETS)}."),
    teacher_preset: Optional[str] = typer.Option(DEFAULT.teacher_preset, help=f"Teacher preset when training one: "
                                                 f"{choices(TEACHER_PRESETS)} (default: the growth preset's)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted run (finished stages are never redone)."),
    encode_images: Optional[int] = typer.Option(DEFAULT.encode_images, help="Images to encode into the latent cache "
                                                "(each also flipped); 0 = all; default: the preset's."),
    encode_steps: Optional[int] = typer.Option(DEFAULT.encode_steps, help="Encoder Karras grid points (paper: 40, Heun); "
                                               "default: the preset's."),
    distance: Optional[str] = typer.Option(DEFAULT.distance, help=f"Reconstruction distance: {choices(DISTANCES)}, or a "
                                           "sum a+b (e.g. lite0+multiscale) (default: the preset's)."),
    discriminator: Optional[str] = typer.Option(DEFAULT.discriminator, help=f"{choices(DISCRIMINATORS)} (projected: frozen "
                                                "EfficientNet-Lite0 features; multiscale: from scratch; default: the preset's)."),
    grow_width: Optional[str] = typer.Option(DEFAULT.grow_width, callback=width_schedule, help=f"Width of the grown "
                                             f"blocks: {WIDTH_FORMS} (default: the preset's)."),
    distill: float = typer.Option(DEFAULT.distill, help="Weight of the distillation loss (paper's ablation; 0 = off)."),
    guidance_max: float = typer.Option(DEFAULT.guidance_max, help="Train the guided one-step G(z, y, ω) for ω in [1, ω_max] "
                                       "(distilled from the guided teacher, β = --distill or 3; "
                                       "`pagoda sample --guidance ω`); 0 = off."),
    text_encoder: Optional[str] = typer.Option(DEFAULT.text_encoder, help=TEXT_ENCODER_HELP + " Given with a "
                                               "--teacher (or a run that has its teacher), it must be that teacher's."),
    seed: int = typer.Option(DEFAULT.seed),
    device: str = typer.Option(DEFAULT.device, help="auto | cpu | cuda"),
    gpus: Optional[int] = typer.Option(None, help="Start N local workers (torch.distributed elastic launch)."),
    procs: Optional[int] = typer.Option(None, help="With --gpus 0: N CPU worker processes (gloo), for testing."),
    accumulate: int = typer.Option(DEFAULT.accumulate, help="Gradient accumulation steps (global batch is kept)."),
    workers: Optional[int] = typer.Option(DEFAULT.workers, min=0, help="DataLoader processes per rank reading image files "
                                          "(default: none for Fashion-MNIST, else a share of the cores)."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads per process (default: the cores other "
                                          "processes leave free, re-measured every 5 s; env PAGODA_THREADS)."),
    max_stages: Optional[int] = typer.Option(DEFAULT.max_stages, help="Stop after this many stages."),
    steps: Optional[str] = typer.Option(DEFAULT.steps, help="Generator steps per stage, one per stage, e.g. "
                                        "1000,400,350,300 (default: the preset's)."),
    max_steps: Optional[int] = typer.Option(DEFAULT.max_steps, min=1, help="Cap every stage's generator steps (a "
                                            "rehearsal of a long preset; resume needs the same cap)."),
    max_batch: Optional[int] = typer.Option(DEFAULT.max_batch, min=1, help="Cap every stage's global batch (a "
                                            "rehearsal on a CPU)."),
    ckpt_every: int = typer.Option(DEFAULT.ckpt_every, min=1, help="Resumable checkpoint every N steps (resume restarts there)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (stages, batches, params, memory, disk) "
                                 "for --gpus N ranks, run 2 steps per stage on random data; train nothing."),
    dry_run_width: Optional[int] = typer.Option(None, help="Channel width of the dry run's steps (default 32 on CPU, true size on CUDA)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Run the whole method: teacher (load or train), latent cache, one-step generator, growth to --res."""
    out_dir = Path(out)
    if out_dir.exists() and not resume and any(out_dir.iterdir()):
        fail(f"{out_dir} already holds a run and --no-resume was given: pass another --out (nothing was deleted)")
    cfg = TrainConfig(out=out, data=data, res=res, teacher=teacher, teacher_preset=teacher_preset, preset=preset,
                      encode_images=encode_images, encode_steps=encode_steps, distance=distance, discriminator=discriminator,
                      grow_width=grow_width,
                      distill=distill, guidance_max=guidance_max, seed=seed, device=device, accumulate=accumulate,
                      max_stages=max_stages, steps=steps, max_steps=max_steps, max_batch=max_batch,
                      ckpt_every=ckpt_every, workers=workers, text_encoder=text_encoder)
    if dry_run:  # plans for --gpus N ranks on any machine; launches nothing, writes nothing
        from pagoda.plan import dry_run as plan_run
        print_plan(run(plan_run, cfg, gpus or procs or 1, dry_run_width,
                       report=lambda name, row: console.print(f"  {name}: {'ran' if 'batch' in row else 'built'}")))
        return
    from pagoda.launch import launch_train, run_worker
    if gpus is not None or procs is not None:
        run(launch_train, cfg, gpus or 0, procs, progress, threads=threads)
    else:
        run(run_worker, cfg, progress, threads=threads)  # one process, or one rank under torchrun
    console.print(f"run finished: {out_dir}")


def print_plan(plan: dict) -> None:
    """The dry-run plan as plain, unwrapped lines (pagoda.plan's docstring says how each number is measured)."""
    def say(line: str) -> None:
        console.print(line, soft_wrap=True, highlight=False, markup=False)

    def gib(b: float) -> str:
        return f"{b / 2**30:.1f} GiB"
    t, d = plan["teacher"], plan["data"]
    say(f"plan for {plan['ranks']} rank(s), accumulate {plan['accumulate']}: teacher {t['source']}, "
        f"{t['resolution']}px, {t['params'] / 1e6:.1f}M params; data {d['source']}, {d['images']:,} images")
    if "text" in t:  # a text run: the encoder is counted in the teacher's and every G's params
        x = t["text"]
        say(f"text encoder {x['encoder']}, {x['params'] / 1e6:.1f}M params (width {x['width']}, {x['context']} "
            f"positions): {'trained with the teacher, then frozen' if x['trained'] else 'frozen'}, carried frozen by "
            f"every G; {x['captions']:,} captions")
    what = "image + flip" if d["flips"] == 2 else "image, never mirrored"
    say(f"latent cache (fp16, {what}): {d['encode_images']:,} images -> {gib(plan['latent_cache_bytes'])}"
        f" (whole data set: {gib(plan['latent_cache_bytes_all'])})")
    head = ("stage", "steps", "batch global/rank/micro", "G params (trainable)", "D params", "activations/GPU",
            "states+teacher/GPU", f"fits {plan['gpu_memory_gib']:.0f} GiB", "min accumulate")
    rows = [head] + [(r["name"], f"{r['steps']:,}", f"{r['global_batch']}/{r['per_rank_batch']}/{r['micro_batch']}",
                      f"{r['G_params'] / 1e6:.1f}M ({r['G_trainable'] / 1e6:.1f}M)", f"{r['D_params'] / 1e6:.1f}M",
                      gib(r["activation_bytes"]), gib(r["total_bytes"] - r["activation_bytes"]),
                      "yes" if r["fits"] else "no", str(r["min_accumulate"] or "-") + (f"  ({r['note']})" if "note" in r else ""))
                     for r in plan["stages"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        say("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    red = plan["reduced"]
    how = f"width {red['width']}, batch {red['batch']}" if red["width"] else "true size, per-rank micro-batch"
    sub = f", distance {red['distance_substitute']} instead of LPIPS (no weights here)" if red["distance_substitute"] else ""
    say(f"{red['steps']} steps per stage on random data ({how}, {red['device']}{sub}):")
    for row, r in zip(plan["stages"], red["stages"]):
        peak = f", peak {gib(r['peak_bytes'])}" if "peak_bytes" in r else ""
        say(f"  {row['name']}: " + (r["error"] if "error" in r else
            f"{r['seconds_per_step']:.2f} s/step, rec {r['rec']:.4f}, D {r['d']:.3f}, finite {r['finite']}{peak}"))
    say("activations/GPU = tensors autograd saves in one G step at the micro-batch, true size on the meta device, fp32 "
        "(an upper bound under bf16 autocast); states = G + EMA + grads + RAdam moments, D likewise, resident teacher")


EXPORT_HELP = dict(
    outdir="Write the images as DIR/000000.png, 000001.png, … (resumable) instead of a grid.",
    npz="Write the ADM evaluator's .npz (arr_0 uint8 N×H×W×C, arr_1 int64 labels; grey images have C = 1, see "
        "--rgb), resumable through FILE.parts/, instead of a grid.",
    batch="Images per written block. The network always runs on 64 aligned images, so image i depends on (seed, i) "
          "only, whatever --batch, n or a resume.",
    rgb="Store grey images with 3 identical channels (C = 3), as RGB-only evaluators expect.",
)


def summary(line: str) -> None:
    """Print one result line, never wrapped (paths stay whole) nor highlighted."""
    console.print(line, soft_wrap=True, highlight=False)


def print_export(r: dict) -> None:
    """The one summary line of an export."""
    summary(f"wrote {r['n']} images to {' and '.join(r['written'])} ({r['new']} new, {r['images_per_s']:.1f} "
            f"images/s, {r['nfe']} NFE per image)")


PROMPT_HELP = dict(
    prompt="Caption of a text model (repeatable): --n images per prompt, one labelled grid row each.",
    prompts="Text file of captions, one per line (blank lines skipped), after any --prompt: image k of the j-th "
            "prompt is the same as with --prompt; an export's export.json records each image's prompt.",
    tool="Caption of a text model under which the image is encoded and decoded (default: the empty caption, "
         "an unconditional encode).",
)


@app.command(epilog="Examples:\n\n  pagoda sample --checkpoint runs/demo\n\n  pagoda sample --checkpoint runs/demo/stage-16/generator.pt --class 3 --n 16"
                    "\n\n  pagoda sample --checkpoint runs/demo --n 50000 --npz samples.npz --rgb"
                    "\n\n  pagoda sample --checkpoint runs/demo --n 1000 --outdir samples/")
def sample(
    checkpoint: str = typer.Option(RUN_DIR, help="Generator checkpoint or run directory (last finished stage)."),
    n: int = typer.Option(64, min=1, help="Number of images (per prompt with --prompt)."),
    class_: Optional[int] = typer.Option(None, "--class", help="Class label (default: cycle through classes)."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help=PROMPT_HELP["prompt"]),
    prompts_file: Optional[str] = typer.Option(None, "--prompts", help=PROMPT_HELP["prompts"]),
    seed: int = typer.Option(0),
    out: str = typer.Option("samples.png", help="Output PNG grid."),
    outdir: Optional[str] = typer.Option(None, help=EXPORT_HELP["outdir"]),
    npz: Optional[str] = typer.Option(None, help=EXPORT_HELP["npz"]),
    batch: int = typer.Option(64, min=1, help=EXPORT_HELP["batch"]),
    rgb: bool = typer.Option(False, "--rgb", help=EXPORT_HELP["rgb"]),
    guidance: float = typer.Option(1.0, min=0.0, help="Guidance ω of a generator trained with --guidance-max: one call "
                                   "G(z, y, ω) per image; 1 = off."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Sample with one network call per image: z ~ N(0, σ_max² I) at the teacher resolution → G(z); image i has
    z seeded by (seed, i) and label i mod C (or, with --prompt, caption i // n), so exports of different n share their
    first images."""
    from pagoda.prompts import gather_prompts
    prompts = run(gather_prompts, prompt, prompts_file)
    if outdir is None and npz is None:
        from pagoda.inference import sample_grid
        path = run(sample_grid, checkpoint, n, class_, seed, out, batch, guidance, prompts)
        console.print(f"wrote {path}", soft_wrap=True)
        return
    from pagoda.inference import export_samples
    print_export(run(export_samples, checkpoint, "generator", n, outdir, npz, class_, seed, batch, rgb, guidance=guidance,
                     progress=progress, prompts=prompts))


MODEL_HELP = dict(checkpoint="Run directory (or generator checkpoint with --teacher).",
                  teacher="Teacher checkpoint or run directory (default: the run's).",
                  class_="Class label of the input; default: the class that reconstructs it best.")


@app.command(epilog="Examples:\n\n  pagoda invert photo.jpg\n\n  pagoda invert shirt.png --checkpoint runs/demo --out inverted/")
def invert(
    image: str = typer.Argument(..., help="Any image (any mode, size, aspect)."),
    checkpoint: str = typer.Option(RUN_DIR, help=MODEL_HELP["checkpoint"]),
    teacher: Optional[str] = typer.Option(None, callback=teacher_file, help=MODEL_HELP["teacher"]),
    class_: Optional[int] = typer.Option(None, "--class", help="Class label; default: the class that reconstructs best."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP["tool"]),
    out: str = typer.Option("inverted", help="Output directory."),
):
    """Encode an image with the teacher's PF-ODE, decode it with the generator at full resolution."""
    from pagoda.control import summary_line
    from pagoda.inference import invert_image
    r = run(invert_image, image, checkpoint, teacher, class_, out, prompt=prompt)
    summary(summary_line("invert", r))
    console.print(f"wrote {r['reconstruction']} and {r['side_by_side']}", soft_wrap=True)  # paths never wrapped


@app.command(epilog="Examples:\n\n  pagoda superres low.png\n\n  pagoda superres low.png --reference high.png --checkpoint runs/demo --out sr/")
def superres(
    image: str = typer.Argument(..., help="Low-resolution image (any mode, size, aspect): read at the teacher resolution."),
    reference: Optional[str] = typer.Option(None, help="High-resolution image: report PSNR of G and of bicubic against it."),
    checkpoint: str = typer.Option(RUN_DIR, help=MODEL_HELP["checkpoint"]),
    teacher: Optional[str] = typer.Option(None, callback=teacher_file, help=MODEL_HELP["teacher"]),
    class_: Optional[int] = typer.Option(None, "--class", help=MODEL_HELP["class_"]),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP["tool"]),
    out: str = typer.Option("superres", help="Output directory."),
):
    """Super-resolution: encode the image once at the teacher resolution, decode with one G call at G's resolution."""
    from pagoda.control import summary_line, superres as superres_fn
    r = run(superres_fn, image, checkpoint, teacher, class_, reference, out, prompt=prompt)
    summary(f"{summary_line('superres', r)}  wrote {r['side_by_side']}")


@app.command(epilog="Examples:\n\n  pagoda edit shirt.png --to-class 3\n\n  pagoda edit shirt.png --to-class 3 --class 6 --out edited/"
                    "\n\n  pagoda edit heart.png --checkpoint runs/emoji --to-prompt \"green heart\" --prompt \"red heart\"")
def edit(
    image: str = typer.Argument(..., help="Any image (any mode, size, aspect)."),
    to_class: Optional[int] = typer.Option(None, "--to-class", help="Class to decode the image's latent under."),
    to_prompt: Optional[str] = typer.Option(None, "--to-prompt", help="Caption to decode the latent under (a text model)."),
    checkpoint: str = typer.Option(RUN_DIR, help=MODEL_HELP["checkpoint"]),
    teacher: Optional[str] = typer.Option(None, callback=teacher_file, help=MODEL_HELP["teacher"]),
    class_: Optional[int] = typer.Option(None, "--class", help=MODEL_HELP["class_"]),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Caption of the image (a text model), under which it is "
                                         "encoded; default: the empty caption, an unconditional encode."),
    out: str = typer.Option("edited", help="Output directory."),
):
    """Class (or caption) transfer: encode under the image's class (--prompt), decode the same latent under
    --to-class (--to-prompt)."""
    from pagoda.control import edit_image, summary_line
    r = run(edit_image, image, to_class, checkpoint, teacher, class_, out, prompt=prompt, to_prompt=to_prompt)
    summary(f"{summary_line('edit', r)}  wrote {r['side_by_side']}")


@app.command(epilog="Examples:\n\n  pagoda interpolate a.png b.png\n\n  pagoda interpolate a.png b.png --steps 12 --out interp/")
def interpolate(
    a: str = typer.Argument(..., help="First image."), b: str = typer.Argument(..., help="Second image."),
    steps: int = typer.Option(8, min=2, help="Frames, both ends included."),
    checkpoint: str = typer.Option(RUN_DIR, help=MODEL_HELP["checkpoint"]),
    teacher: Optional[str] = typer.Option(None, callback=teacher_file, help=MODEL_HELP["teacher"]),
    class_: Optional[int] = typer.Option(None, "--class", help="Class of both images; default: each its best class."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP["tool"]),
    out: str = typer.Option("interpolated", help="Output directory."),
):
    """Latent interpolation: encode both images, slerp the latents, decode each frame with G (soft labels across classes)."""
    from pagoda.control import interpolate as interpolate_fn, summary_line
    r = run(interpolate_fn, a, b, steps, checkpoint, teacher, class_, out, prompt=prompt)
    summary(f"{summary_line('interpolate', r)}  wrote {r['side_by_side']}")


@app.command(epilog="Examples:\n\n  pagoda inpaint shirt.png --mask mask.png\n\n  pagoda inpaint shirt.png --mask mask.png --iters 100 --out filled/")
def inpaint(
    image: str = typer.Argument(..., help="Any image (any mode, size, aspect)."),
    mask: str = typer.Option(..., help="Mask image: white = known pixel, black = hole (any size: nearest-resized)."),
    checkpoint: str = typer.Option(RUN_DIR, help=MODEL_HELP["checkpoint"]),
    teacher: Optional[str] = typer.Option(None, callback=teacher_file, help=MODEL_HELP["teacher"]),
    class_: Optional[int] = typer.Option(None, "--class", help=MODEL_HELP["class_"]),
    iters: int = typer.Option(50, min=0, help="Adam steps of the latent optimisation through G."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP["tool"]),

    out: str = typer.Option("inpainted", help="Output directory."),
):
    """Inpainting: optimise G's latent to match the known pixels under the latent prior; known pixels kept exactly."""
    from pagoda.control import inpaint as inpaint_fn, summary_line
    r = run(inpaint_fn, image, mask, checkpoint, teacher, class_, out, iters, prompt=prompt)
    summary(f"{summary_line('inpaint', r)}  wrote {r['side_by_side']}")


@app.command(epilog="Examples:\n\n  pagoda serve --checkpoint runs/demo\n\n"
                    "  curl -s 127.0.0.1:7860/api/sample -d '{\"seed\": 3, \"n\": 16}' -o grid.png\n\n"
                    "  pagoda serve --checkpoint runs/guided --port 8000")
def serve(
    checkpoint: str = typer.Option(RUN_DIR, help="Run directory (every finished stage), stage directory or generator "
                                   "checkpoint (with --teacher)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; other than loopback, anyone who reaches it can "
                             "use the page (there is no authentication)."),
    port: int = typer.Option(7860, min=0, max=65535, help="Port (0: any free one)."),
    teacher: Optional[str] = typer.Option(None, callback=teacher_file, help=MODEL_HELP["teacher"]),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: adapted to the load)."),
):
    """A local web page where one-step samples and the inverse problems answer as you type, and its /api/ (docs/serve.md)."""
    from pagoda.serve import ServeConfig, serve as serve_fn
    cfg = ServeConfig(checkpoint=checkpoint, teacher=teacher, host=host, port=port)
    run(serve_fn, cfg, lambda url: summary(f"serving {checkpoint} at {url}  (Ctrl-C stops)"), threads=threads)


@app.command(epilog="Example:\n\n  pagoda encode --teacher runs/demo --out latents --n 6000")
def encode(
    teacher: str = typer.Option(..., callback=teacher_file, help="Teacher checkpoint or run directory."),
    data: str = typer.Option(DEFAULT.data),
    out: str = typer.Option(..., help="Latent cache directory (resumable)."),
    n: Optional[int] = typer.Option(None, min=1, help="Images to encode (default all)."),
    steps: int = typer.Option(40, min=2, help="Karras grid points (paper: 40)."), method: str = typer.Option(DEFAULT.encode_method, help=choices(METHODS)),
    batch: int = typer.Option(256, min=1), dtype: str = typer.Option("float16", help="float16 | float32"),
    resolution: Optional[int] = typer.Option(None, help="Data resolution (default: the teacher's)."),
):
    """Encode a data set (image + flip) into a sharded on-disk latent cache."""
    from pagoda.inference import encode_dataset
    info = run(encode_dataset, teacher, data, out, n, steps, method, batch, dtype, resolution)
    console.print(f"latent cache {out}: {info.num_images} images x 2 (flip), {info.num_shards} shards", soft_wrap=True)


@teacher_app.command("train", epilog="Examples:\n\n  pagoda teacher train\n\n  pagoda teacher train --steps 200 --out runs/t")
def teacher_train(
    out: str = typer.Option(str(RunDir(RUN_DIR).teacher_dir)),
    preset: str = typer.Option("demo", help=choices(TEACHER_PRESETS)),
    data: Optional[str] = typer.Option(None), resolution: Optional[int] = typer.Option(None),
    steps: Optional[int] = typer.Option(None, min=1), batch: Optional[int] = typer.Option(None, min=1),
    lr: Optional[float] = typer.Option(None, min=0.0), seed: Optional[int] = typer.Option(None),
    text_encoder: Optional[str] = typer.Option(None, help=TEXT_ENCODER_HELP),
    device: str = typer.Option(DEFAULT.device, help="auto | cpu | cuda"), progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Train the EDM diffusion teacher (default: Fashion-MNIST at 8x8)."""
    from dataclasses import replace

    from pagoda.train import check_text_data, train_teacher
    if preset not in TEACHER_PRESETS:
        fail(f"unknown teacher preset {preset!r}: use one of {', '.join(TEACHER_PRESETS)}")
    over = {k: v for k, v in dict(data=data, resolution=resolution, steps=steps, batch=batch, lr=lr, seed=seed,
                                  text_encoder=text_encoder).items() if v is not None}
    cfg = replace(TEACHER_PRESETS[preset], **over)
    run(check_text_data, text_encoder, cfg.data, cfg.resolution)
    path = run(train_teacher, cfg, out, progress, device)
    console.print(f"teacher: {path}", soft_wrap=True)


@teacher_app.command("sample", epilog="Examples:\n\n  pagoda teacher sample --checkpoint runs/demo --method dpmpp_2m --steps 10"
                                      "\n\n  pagoda teacher sample --checkpoint runs/demo/teacher/teacher.pt --n 10000 --npz teacher.npz --guidance 2")
def teacher_sample_cmd(
    checkpoint: str = typer.Option(RUN_DIR, callback=teacher_file, help="Teacher checkpoint or run directory."),
    n: int = typer.Option(100, min=1), steps: int = typer.Option(HEUN_POINTS, min=2, help="Karras grid points (+ final 0)."),
    method: str = typer.Option("heun", help=choices(METHODS)),
    class_: Optional[int] = typer.Option(None, "--class"), seed: int = typer.Option(0),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help=PROMPT_HELP["prompt"]),
    prompts_file: Optional[str] = typer.Option(None, "--prompts", help=PROMPT_HELP["prompts"]),
    out: str = typer.Option("teacher_samples.png"),
    guidance: float = typer.Option(1.0, min=0.0, help="Classifier-free guidance ω: D(x,σ,∅) + ω·(D(x,σ,y) − D(x,σ,∅)); 1 = off."),
    outdir: Optional[str] = typer.Option(None, help=EXPORT_HELP["outdir"]),
    npz: Optional[str] = typer.Option(None, help=EXPORT_HELP["npz"]),
    batch: int = typer.Option(64, min=1, help=EXPORT_HELP["batch"]),
    rgb: bool = typer.Option(False, "--rgb", help=EXPORT_HELP["rgb"]),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Sample the teacher with any solver and NFE (optionally classifier-free guided); the same z and labels as
    `pagoda sample` for the same seed (a text teacher: --prompt, guided against the empty caption)."""
    from pagoda.prompts import gather_prompts
    prompts = run(gather_prompts, prompt, prompts_file)
    if outdir is None and npz is None:
        from pagoda.inference import teacher_grid
        path, nfe = run(teacher_grid, checkpoint, n, steps, method, class_, seed, out, guidance, batch, prompts)
        console.print(f"wrote {path} ({nfe} NFE per image)", soft_wrap=True)
        return
    from pagoda.inference import export_samples
    print_export(run(export_samples, checkpoint, "teacher", n, outdir, npz, class_, seed, batch, rgb, steps, method,
                     guidance, progress, prompts))


@app.command("eval", epilog="Examples:\n\n  pagoda eval --checkpoint runs/demo --n 10000\n\n"
                            "  pagoda eval --checkpoint runs/demo --all-stages --n 500 --ref-n 500\n\n"
                            "  pagoda eval --checkpoint runs/demo/teacher/teacher.pt --solver dpmpp_2m --nfe 10\n\n"
                            "  pagoda eval --checkpoint runs/in128 --n 50000 --ref VIRTUAL_imagenet128_labeled.npz --gpus 8")
def eval_cmd(
    checkpoint: str = typer.Option(RUN_DIR, help="Generator checkpoint, run directory (last finished stage) or teacher checkpoint."),
    n: int = typer.Option(10_000, min=2, help="Samples scored (FID is biased at small n: compare only at equal n)."),
    ref: str = typer.Option(DEFAULT.data, help="Reference: fashion-mnist, emoji (a text run: its training captions in "
                            "turn), an image folder / EDM .zip, or an .npz with mu/sigma."),
    split: str = typer.Option("train", help="Fashion-MNIST split of the reference: train | test."),
    ref_n: Optional[int] = typer.Option(None, min=2, help="Reference images (seeded subset, cached); default all. On CPU pass e.g. --ref-n 2000."),
    solver: str = typer.Option("heun", help=f"Teacher only: {choices(METHODS)}."),
    nfe: int = typer.Option(35, help="Teacher only: denoiser calls per image (heun: odd)."),
    resize: Optional[int] = typer.Option(None, help="Resize samples to this resolution before scoring (bicubic up, ADM down)."),
    all_stages: bool = typer.Option(False, "--all-stages", help="CHECKPOINT is a run: score its teacher and every finished stage."),
    batch: int = typer.Option(64, min=1), seed: int = typer.Option(0), device: str = typer.Option(DEFAULT.device, help="auto | cpu | cuda"),
    out: Optional[str] = typer.Option(None, help="JSON file the rows are merged into; default RUN/eval.json, else ./eval.json."),
    gpus: Optional[int] = typer.Option(None, help="Split the samples over N local workers (torch.distributed elastic launch)."),
    procs: Optional[int] = typer.Option(None, help="With --gpus 0: N CPU worker processes (gloo)."),
    precision_recall: bool = typer.Option(False, "--precision-recall", help="Also improved precision/recall (k = 3) "
                                          "against the reference's stored features."),
    accuracy: bool = typer.Option(False, "--accuracy", help="Also the class accuracy of the same samples: the fraction "
                                  "a Fashion-MNIST classifier puts in their class (trained once into RUN/classifier/)."),
    guidance: float = typer.Option(1.0, min=0.0, help="Guidance ω: classifier-free for a teacher, G(z, y, ω) for a "
                                   "generator trained with --guidance-max; 1 = off."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads per process (default: adapted to the load)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """FID / KID of a generator or a teacher against a reference at the samples' resolution (clean-fid)."""
    import os

    from pagoda.evaluate import results_table, run_eval
    kw = dict(n=n, ref=ref, split=split, ref_n=ref_n, solver=solver, nfe=nfe, resize=resize, batch=batch, seed=seed,
              all_stages=all_stages, out=out, progress=progress, precision_recall=precision_recall,
              accuracy=accuracy, guidance=guidance)
    if gpus is not None or procs is not None:
        from pagoda.launch import launch
        results, path = run(launch, run_eval, (checkpoint,), kw, gpus or 0, procs, threads=threads)
    else:
        results, path = run(run_eval, checkpoint, device=device, threads=threads, **kw)  # one process, or one rank under torchrun
    if os.environ.get("RANK", "0") == "0":
        console.print(results_table(results))
        console.print(f"wrote {path}")


@app.command("report", epilog="Examples:\n\n  pagoda report runs/demo\n\n  pagoda report runs/demo --fid 500")
def report_cmd(
    run_dir: str = typer.Argument(..., help="Run directory (what `pagoda train --out` wrote)."),
    fid: Optional[int] = typer.Option(None, min=2, help="First score the teacher and every stage at N samples (slow on CPU)."),
    ref: str = typer.Option(DEFAULT.data, help="FID reference (with --fid)."),
    ref_n: Optional[int] = typer.Option(None, min=2, help="Reference images with --fid (default: N)."),
    device: str = typer.Option(DEFAULT.device, help="auto | cpu | cuda"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Write RUN/report.html (self-contained) and RUN/report.md: samples, FID, losses, w and α, timings, config; a
    text run's report also shows the same prompts at the teacher and every stage (drawn first: RUN/*/prompts.png)."""
    from pagoda.inference import prompt_grids
    from pagoda.report import write_report
    run(prompt_grids, run_dir)
    if fid:
        from pagoda.evaluate import eval_progress, evaluate_run, record_results
        with eval_progress(progress) as bar:
            rows = run(evaluate_run, run_dir, n=fid, ref=ref, ref_n=ref_n or fid, device=device, progress=bar)
        record_results(rows, RunDir(run_dir).eval)
    html_path, md_path = run(write_report, run_dir)
    console.print(f"wrote {html_path} and {md_path}")


def main():  # python -m pagoda.cli
    app()


if __name__ == "__main__":
    main()
