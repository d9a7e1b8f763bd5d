"""`pagoda serve`: a local page where one-step generation answers as you type, and the /api/ routes it calls.

    pagoda serve --checkpoint runs/demo                                   # http://127.0.0.1:7860
    curl -s 127.0.0.1:7860/api/info
    curl -s 127.0.0.1:7860/api/sample -d '{"seed": 3, "n": 16}' -o grid.png
    curl -s 127.0.0.1:7860/api/edit -F image=@shirt.png -F to_class=3   # JSON: numbers, summary, PNGs as data URLs
    curl -s 127.0.0.1:7860/api/sample -d '{"prompt": "red apple"}' -o apple.png      # a text run

The standard library only (docs/serve.md says why): http.server's ThreadingHTTPServer reads each request on its own
thread and decodes its uploads (pagoda.images, the CLI's size-checked decode); one worker thread owns the models and
runs the jobs in arrival order from a bounded queue, so none is lost and a full queue or a job past its deadline is
refused with a one-line message. Multipart bodies are parsed with email.parser (the cgi module is gone in Python
3.13). The model work is pagoda.inference's and pagoda.control's; this file owns no model logic.
"""
from __future__ import annotations

import base64
import concurrent.futures
import email.parser
import email.policy
import io
import json
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable
from urllib.parse import urlsplit

import torch

from pagoda.control import edit_result, inpaint_result, interpolate_result, summary_line, superres_result
from pagoda.decoder import Generator
from pagoda.dist import update_threads
from pagoda.images import decode_image, decode_mask, first_line, grid_image, png_bytes, tensor_to_pil
from pagoda.loop import index_labels
from pagoda.inference import ToolOutput, guidance_range, invert_result, load_stages, make_sampler
from pagoda.prompts import EXAMPLES, check_condition, run_captions, spread

PAGE = "serve_page.html"  # shipped inside the package (pyproject package-data): no CDN, no other file


@dataclass
class ServeConfig:
    """`pagoda serve` options; every limit is checked before any model work starts."""
    checkpoint: str = "runs/demo"  # a run directory (every finished stage), a stage directory or a generator .pt
    teacher: str | None = None  # teacher checkpoint (default: the run's)
    host: str = "127.0.0.1"  # loopback only unless asked: the page has no authentication
    port: int = 7860  # 0 = any free port
    max_upload_bytes: int = 8 * 2**20  # one request body (all its files together)
    max_pixels: int = 4096 * 4096  # one uploaded image, checked from its header before it is decoded
    max_n: int = 64  # images in one /api/sample grid
    max_frames: int = 16  # interpolation frames
    max_iters: int = 200  # inpainting Adam steps
    encode_steps: int = 40  # teacher PF-ODE grid points of every encode (the CLI's default)
    max_queue: int = 8  # requests waiting for the model worker; more are refused (503)
    timeout_s: float = 60.0  # a request not answered by then is refused (503); one not yet started is dropped


class ApiError(Exception):
    """A refused request: HTTP status and the one line shown to the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


USER_ERRORS = (ValueError, KeyError)  # the CLI's bad-input errors (ImageError, CheckpointError are ValueErrors)


class Worker:
    """One thread that owns the models and runs jobs in arrival order; at most `max_queue` wait for it."""

    def __init__(self, max_queue: int):
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="pagoda-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.jobs.put_nowait((fn, future))
        except queue.Full:
            raise ApiError(503, f"the server is busy ({self.jobs.maxsize} requests waiting): retry in a moment") from None
        return future

    def _loop(self) -> None:
        while True:
            fn, future = self.jobs.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():  # False: its request gave up waiting
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the waiting request
                    future.set_exception(e)

    def close(self) -> None:
        self.jobs.put((None, None))
        self.thread.join()


class App:
    """The run's models (every finished stage, by resolution, and the teacher) and the API's routes."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.worker = Worker(cfg.max_queue)  # loads the models too: every torch op of the server runs on its thread

        def load():
            Gs, D = load_stages(cfg.checkpoint, cfg.teacher)
            return Gs, D, {G.resolution: guidance_range(G, cfg.checkpoint) for G in Gs}
        try:
            Gs, self.D, self.guidance = self.worker.submit(load).result()
        except BaseException:
            self.worker.close()
            raise
        self.G: dict[int, Generator] = {G.resolution: G for G in Gs}
        self.top = max(self.G)
        self.ncls = self.G[self.top].unet.config.num_classes
        self.text = self.G[self.top].text_encoder is not None  # a text run: prompts instead of classes
        self.examples = self.worker.submit(lambda: spread(run_captions(cfg.checkpoint) or [], EXAMPLES)).result() \
            if self.text else []
        self.routes: dict[str, tuple[str, Callable]] = {
            "/": ("GET", self.page), "/api/info": ("GET", self.info), "/api/sample": ("POST", self.sample),
            **{f"/api/{tool}": ("POST", self.tool) for tool in TOOLS}}

    # ---- routes: (path, body, content type) -> (content type, body bytes, extra headers) ----------
    def page(self, path: str, body: bytes, ctype: str):
        return "text/html; charset=utf-8", resources.files("pagoda").joinpath(PAGE).read_bytes(), {}

    def info(self, path: str, body: bytes, ctype: str):
        G = self.G[self.top]
        info = {"checkpoint": str(self.cfg.checkpoint), "resolutions": sorted(self.G), "resolution": self.top,
                "teacher_resolution": self.D.resolution, "channels": G.channels, "num_classes": self.ncls,
                "guidance": {str(r): g for r, g in self.guidance.items()}, "text": self.text,
                "examples": self.examples,
                "limits": {k: v for k, v in asdict(self.cfg).items() if k.startswith("max_") or k == "timeout_s"},
                "routes": {p: m for p, (m, _) in self.routes.items()}, "tools": TOOLS}
        return "application/json", json.dumps(info).encode(), {}

    def sample(self, path: str, body: bytes, ctype: str):
        """A grid of n one-step samples: image i has z seeded by (seed, i) and label `class` or i mod C (a text run:
        every image under `prompt`)."""
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, 'the body is not JSON: send e.g. {"seed": 0, "n": 16}') from None
        if not isinstance(req, dict):
            raise ApiError(400, 'the body must be a JSON object, e.g. {"seed": 0, "n": 16}')
        unknown = sorted(set(req) - set(SAMPLE_FIELDS))
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}: use {', '.join(SAMPLE_FIELDS)}")
        G = self.stage(number(req, "resolution", None, int))
        seed, n = number(req, "seed", 0, int), number(req, "n", 16, int, 1, self.cfg.max_n)
        class_ = number(req, "class", None, int)
        guidance = number(req, "guidance", 1.0, float, 0.0)
        prompt = req.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ApiError(400, f'`prompt` {prompt!r} is not a string: send e.g. {{"prompt": "red apple"}}')
        prompts = None if prompt is None else [prompt]
        check_condition(G, class_, prompts, need_prompt=True)  # the CLI's one-line errors
        generate = make_sampler("generator", G, seed=seed, class_=class_, guidance=guidance, call_size=n,
                                prompts=prompts, per_prompt=n)
        png, ms = self.run(lambda: generate(0, n), lambda x: png_bytes(grid_image(x)))
        labels = index_labels(0, n, self.ncls, class_)
        return "image/png", png, {
            "X-Compute-Ms": f"{ms:.1f}", "X-Resolution": str(G.resolution), "X-Seed": str(seed),
            "X-Labels": "" if labels is None else ",".join(map(str, labels.tolist()))}

    def tool(self, path: str, body: bytes, ctype: str):
        """One inverse problem on the uploaded image(s): JSON of its numbers, the CLI's line and the PNGs."""
        name = path.rsplit("/", 1)[-1]
        f = parse_multipart(body, ctype)
        G = self.stage(form(f, "resolution", None, int))
        class_ = form(f, "class", None, int)
        prompt = form(f, "prompt", None, str)  # a text run's caption of the image (absent: the empty caption)
        check_condition(G, class_, None if prompt is None else [prompt])  # before the upload is decoded
        steps, D = self.cfg.encode_steps, self.D
        if name == "invert":
            x = self.upload(f, "image", G.resolution, G.channels)
            job = lambda: invert_result(G, D, x, class_, steps, prompt)  # noqa: E731
        elif name == "superres":
            x = self.upload(f, "image", D.resolution, D.channels)
            ref = self.upload(f, "reference", G.resolution, G.channels) if "reference" in f else None
            job = lambda: superres_result(G, D, x, class_, steps, ref, prompt)  # noqa: E731
        elif name == "edit":
            to_class, to_prompt = form(f, "to_class", None, int), form(f, "to_prompt", None, str)
            x = self.upload(f, "image", G.resolution, G.channels)
            job = lambda: edit_result(G, D, x, to_class, class_, steps, prompt, to_prompt)  # noqa: E731
        elif name == "interpolate":
            frames = form(f, "frames", 8, int, 2, self.cfg.max_frames)
            x = torch.cat([self.upload(f, k, G.resolution, G.channels) for k in ("image", "image2")])
            job = lambda: interpolate_result(G, D, x, frames, class_, steps, prompt)  # noqa: E731
        else:  # inpaint
            iters = form(f, "iters", 50, int, 0, self.cfg.max_iters)
            x = self.upload(f, "image", G.resolution, G.channels)
            m = self.upload(f, "mask", G.resolution, 1, decode=decode_mask)[None]
            job = lambda: inpaint_result(G, D, x, m, class_, iters, steps, "the mask", prompt)  # noqa: E731
        out, ms = self.run(job, lambda r: shown(name, r))
        return "application/json", json.dumps({**out, "compute_ms": round(ms, 1)}).encode(), {"X-Compute-Ms": f"{ms:.1f}"}

    # ---- helpers -----------------------------------------------------------------------------------
    def stage(self, resolution: int | None) -> Generator:
        if resolution is None:
            return self.G[self.top]
        if resolution not in self.G:
            raise ApiError(400, f"resolution {resolution} is not a finished stage of this run: use one of "
                                f"{', '.join(map(str, sorted(self.G)))}")
        return self.G[resolution]

    def upload(self, fields: dict, key: str, resolution: int, channels: int, decode=None) -> torch.Tensor:
        """The multipart file `key` decoded as the CLI decodes a file (size-checked from its header, ADM crop)."""
        if key not in fields:
            raise ApiError(400, f"no `{key}` field: send the image as the multipart field `{key}` (curl -F {key}=@FILE)")
        filename, data = fields[key]
        name = f"upload {filename or key!r}"
        if decode is not None:
            return decode(io.BytesIO(data), name, resolution, self.cfg.max_pixels)
        return decode_image(io.BytesIO(data), name, resolution, channels, self.cfg.max_pixels)[None]

    def run(self, job: Callable, finish: Callable):
        """(finish(job's result), the job's milliseconds) from the model worker, or a 503 once cfg.timeout_s has
        passed. `finish` (images -> PNG/JSON) runs on the worker too. Why one thread for every torch op: a second
        thread's OpenMP team makes libgomp count more threads than cores and stop spinning between ops (measured on
        2 cores, 2 threads, a 4×4 grid at 32 px: 22 ms on one thread, 55 ms with the models loaded on another)."""
        def timed():
            update_threads()  # the CLI's thread policy: the cores other processes leave free
            t0 = time.perf_counter()
            out = job()  # each job turns gradients off itself (inpainting needs them inside)
            ms = 1000 * (time.perf_counter() - t0)
            return finish(out), ms
        future = self.worker.submit(timed)
        try:
            return future.result(timeout=self.cfg.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # not started: dropped; running: finishes, its result unused
            raise ApiError(503, f"the request took longer than {self.cfg.timeout_s:g} s: ask for less (fewer "
                                f"images, frames or iterations) or retry when the server is idle") from None

    def close(self) -> None:
        self.worker.close()


TOOLS = ("invert", "superres", "edit", "interpolate", "inpaint")
SAMPLE_FIELDS = ("seed", "n", "class", "prompt", "guidance", "resolution")


def shown(tool: str, r: ToolOutput) -> dict:
    """The JSON of a tool's result: numbers, the CLI's summary line, the result and side-by-side PNGs as data URLs."""
    def url(img) -> str:
        return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    return {"tool": tool, "numbers": r.numbers, "summary": summary_line(tool, r.numbers),
            "image": url(tensor_to_pil(r.image)), "side_by_side": url(r.side_by_side())}


def number(req: dict, key: str, default, kind: type, lo: float | None = None, hi: float | None = None):
    """req[key] as `kind` within [lo, hi] (default when absent or null); ... as default = required."""
    v = req.get(key)
    if v is None:
        if default is ...:
            raise ApiError(400, f"`{key}` is required")
        return default
    try:
        if isinstance(v, bool) or (kind is int and isinstance(v, float) and not v.is_integer()):
            raise ValueError
        v = kind(v)
    except (TypeError, ValueError):
        raise ApiError(400, f"`{key}` {v!r} is not {'an integer' if kind is int else 'a number'}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        why = "the server's limit" if hi is not None and v > hi else "the smallest allowed"
        raise ApiError(400, f"`{key}` {v} is out of range {lo:g}..{hi if hi is not None else '∞'} ({why}): ask for "
                            f"{'less' if hi is not None and v > hi else 'more'}")
    return v


def form(fields: dict, key: str, default, kind: type, lo: float | None = None, hi: float | None = None):
    """A multipart text field as `kind` (number()'s rules; an empty field is absent)."""
    raw = fields.get(key, (None, b""))[1].decode("utf-8", "replace").strip() or None
    return raw if kind is str else number({key: raw}, key, default, kind, lo, hi)


def parse_multipart(body: bytes, ctype: str) -> dict[str, tuple[str | None, bytes]]:
    """{field: (file name or None, bytes)} of a multipart/form-data body (email.parser; binary-safe)."""
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the image as the multipart/form-data field `image` (curl -F image=@FILE)")
    head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or msg.defects:
        raise ApiError(400, "malformed multipart/form-data body: send it as a browser or curl -F does")
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class Handler(BaseHTTPRequestHandler):
    """One request: route, read the body (capped), answer bytes or a one-line JSON error; logs one line each."""
    server_version = "pagoda-serve"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once (Nagle + delayed ACK would add 40 ms)
    app: App  # set by make_server

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def dispatch(self, method: str) -> None:
        t0 = time.perf_counter()
        path = urlsplit(self.path).path
        try:
            if path not in self.app.routes:
                raise ApiError(404, f"no route {path}: GET /api/info lists the routes")
            want, fn = self.app.routes[path]
            if method != want:
                raise ApiError(405, f"{path} takes {want}, not {method}")
            body = self.read_body() if method == "POST" else b""
            ctype, data, headers = fn(path, body, self.headers.get("Content-Type", ""))
            status = 200
        except ApiError as e:
            status, ctype, data, headers = e.status, "application/json", error_json(str(e)), {}
        except USER_ERRORS as e:  # bad input met by the model code: the CLI's one-line message
            msg = first_line(e) if not isinstance(e, KeyError) else f"unknown name {first_line(e)}"
            status, ctype, data, headers = 400, "application/json", error_json(msg), {}
        except Exception as e:  # a bug: logged with its traceback, answered in one line; the server keeps serving
            traceback.print_exc(file=sys.stderr)
            status, ctype, data, headers = 500, "application/json", error_json(f"internal error: {type(e).__name__}: "
                                                                               f"{first_line(e)}"), {}
        self.send_response(status)
        for k, v in {"Content-Type": ctype, "Content-Length": str(len(data)), "Cache-Control": "no-store",
                     "X-Server-Ms": f"{1000 * (time.perf_counter() - t0):.1f}", **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise ApiError(411, "send a Content-Length header (no chunked uploads)")
        if int(length) > self.app.cfg.max_upload_bytes:
            self.close_connection = True  # the body is never read
            raise ApiError(413, f"upload of {int(length):,} bytes is over the server's limit of "
                                f"{self.app.cfg.max_upload_bytes:,}: send a smaller image")
        return self.rfile.read(int(length))

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr, as http.server does
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def error_json(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def make_server(cfg: ServeConfig, quiet: bool = False) -> ThreadingHTTPServer:
    """The HTTP server of `cfg` with its models loaded (`.app`); serve_forever() answers, server_close() + app.close() end."""
    app = App(cfg)
    handler = type("RunHandler", (Handler,), {"app": app})
    if quiet:
        handler.log_message = lambda self, format, *args: None
    try:
        server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    except OSError as e:
        app.close()
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}: pass another --port or --host") from None
    server.daemon_threads = True
    server.app = app
    return server


def serve(cfg: ServeConfig, ready: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C or SIGTERM; `ready` gets the page's URL once the models are loaded and the port is bound."""
    server = make_server(cfg)
    host, port = server.server_address[:2]
    ready(f"http://{host}:{port}/")
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, before)
        server.server_close()
        server.app.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
