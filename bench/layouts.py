"""Which CPU layout runs the one-step generator fastest: eager vs inference mode, channels-last, a frozen TorchScript
trace, torch.compile and ONNX Runtime, on the top stage of a run (and every other finished stage).

    OMP_NUM_THREADS=1 .venv/bin/python bench/layouts.py --run runs/demo --out results/layouts
    OMP_NUM_THREADS=2 .venv/bin/python bench/layouts.py --run runs/demo --batch 16 64

Each row: the best of --repeats calls after warm-up calls, seconds per call of `--batch` images (the same z ~
N(0, σ_max² I) and labels, in no_grad); "× eager" = eager time / row time; "max |Δ|" = the greatest pixel
difference from eager on [−1, 1] (0 = the same bytes). "setup s" = what the layout costs once (trace, compile,
export); torch.compile pays only when setup / (eager − compiled) calls is small. Rows whose tool is missing
(onnxruntime) or fails are listed with the reason. Writes OUT/layouts.json.
"""
from __future__ import annotations

import io
import time

import torch

from common import device, environment, load_run, parser, print_table, time_call, write_results


def inputs(G, batch: int, seed: int = 0):
    """(z, labels) of one call: z ~ N(0, σ_max² I), labels 0, 1, … (class models) or None."""
    g = torch.Generator().manual_seed(seed)
    C, R = G.unet.config.in_channels, G.base_resolution
    z = G.sigma_max * torch.randn(batch, C, R, R, generator=g)
    ncls = G.unet.config.num_classes
    return z, (torch.arange(batch) % ncls if ncls else None)


def layouts(G, z, y):
    """{name: (setup seconds, call() -> images)} for every layout that builds here, {name: reason} for the rest."""
    built, failed = {}, {}

    def add(name, make):
        t = time.perf_counter()
        try:
            fn = make()
            fn()  # the first call of compile/trace/ORT does its work here: part of the setup
            built[name] = (time.perf_counter() - t, fn)
        except Exception as e:  # noqa: BLE001 - a bench row, reported with its reason
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    args = (z,) if y is None else (z, y)

    def eager():
        return lambda: G(*args)

    def inference_mode():
        def call():
            with torch.inference_mode():
                return G(*args)
        return call

    def channels_last():
        Gc = G.to(memory_format=torch.channels_last)
        return lambda: Gc(*args)

    def frozen_trace():
        with torch.no_grad():
            T = torch.jit.freeze(torch.jit.trace(G, args, check_trace=False).eval())
        return lambda: T(*args)

    def compiled():
        C = torch.compile(G, dynamic=False)
        return lambda: C(*args)

    def onnx_runtime():
        import onnxruntime as ort
        buf = io.BytesIO()
        torch.onnx.export(G, args, buf, dynamo=False, opset_version=17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, [a.numpy() for a in args]))
        return lambda: torch.from_numpy(sess.run(None, feed)[0])

    with torch.no_grad():
        for name, make in [("eager", eager), ("inference_mode", inference_mode), ("frozen trace", frozen_trace),
                           ("onnxruntime", onnx_runtime), ("torch.compile", compiled), ("channels_last", channels_last)]:
            add(name, make)
    return built, failed


def main() -> None:
    p = parser(__doc__, "layouts")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="images per call")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--all-stages", action="store_true", help="every finished stage, not only the top one")
    a = p.parse_args()
    dev = device(a.device)
    _, gens = load_run(a.run, dev)
    rows, failures = [], {}
    for R in sorted(gens) if a.all_stages else [max(gens)]:
        for b in a.batch:
            G = gens[R].eval()
            z, y = inputs(G, b)
            with torch.no_grad():
                ref = G(*((z,) if y is None else (z, y)))
            built, failed = layouts(G, z, y)
            failures.update({f"G{R} b{b} {k}": v for k, v in failed.items()})
            t_eager = None
            for name, (setup, fn) in built.items():
                with torch.no_grad():
                    t = time_call(fn, dev, repeats=a.repeats, warmup=2)
                    diff = (fn() - ref).abs().max().item()
                t_eager = t_eager or t
                rows.append({"stage": f"G{R}", "batch": b, "layout": name, "ms_per_call": 1e3 * t,
                             "img_per_s": b / t, "x_eager": t_eager / t, "max_abs_diff": diff, "setup_s": setup})
            G.to(memory_format=torch.contiguous_format)
    print_table(f"generator layouts ({torch.get_num_threads()} threads)", rows, [
        ("stage", "stage", ""), ("batch", "batch", ""), ("layout", "layout", ""), ("ms_per_call", "ms/call", ".1f"),
        ("img_per_s", "img/s", ".0f"), ("x_eager", "× eager", ".2f"), ("max_abs_diff", "max |Δ|", ".1e"),
        ("setup_s", "setup s", ".1f")])
    for k, v in failures.items():
        print(f"not run: {k}: {v}")
    write_results(a.out, "layouts", {"environment": environment(dev), "rows": rows, "not_run": failures})


if __name__ == "__main__":
    main()
