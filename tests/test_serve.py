"""`pagoda serve` (pagoda/serve.py): the /api/ routes through an HTTP client on the tiny 8 → 16 px run of
tests/helpers.py, and the page in a real browser (Debian's headless Chromium through selenium)."""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pagoda.control import summary_line
from pagoda.decoder import Generator
from pagoda.images import grid_image, load_image, to_uint8
from pagoda.inference import invert_result, load_models, make_sampler
from pagoda.io import save_checkpoint
from pagoda.serve import ApiError, ServeConfig, Worker, make_server, parse_multipart
from pagoda.teacher import load_teacher

from helpers import build_tiny_run, build_tiny_text_run, invoke, one_line_error


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.getbasetemp())


@contextlib.contextmanager
def running(cfg: ServeConfig):
    """The server of `cfg` answering on a thread; yields its App (with .port)."""
    srv = make_server(cfg, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.app.port = srv.server_address[1]
    try:
        yield srv.app
    finally:
        srv.shutdown()
        srv.server_close()
        srv.app.close()


@pytest.fixture(scope="module")
def server(tiny_run):
    """The server on a free loopback port, small limits, 4-point encodes (fast)."""
    with running(ServeConfig(checkpoint=str(tiny_run), port=0, max_upload_bytes=100_000, max_pixels=200 * 200,
                             max_queue=16, encode_steps=4)) as app:
        yield app


def request(app, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, headers, body) of one request to the test server."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def sample(app, **req):
    return request(app, "POST", "/api/sample", json.dumps(req).encode(), {"Content-Type": "application/json"})


def upload(app, tool: str, **fields):
    """POST a multipart form as curl -F does: bytes values are files (named FIELD.png), others text."""
    boundary = uuid.uuid4().hex
    body = b""
    for k, v in fields.items():
        disp = f'form-data; name="{k}"' + (f'; filename="{k}.png"' if isinstance(v, bytes) else "")
        data = v if isinstance(v, bytes) else str(v).encode()
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return request(app, "POST", f"/api/{tool}", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def error(status_body, status: int, *needles: str) -> str:
    """The one-line JSON error of a refused request, checked to name the problem."""
    got, _, body = status_body
    msg = json.loads(body)["error"]
    assert got == status and "\n" not in msg, (got, msg)
    for needle in needles:
        assert needle in msg, msg
    return msg


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def shirt() -> bytes:
    """A 30×20 grey image (any size: the server crops and resizes as the CLI does)."""
    return png(np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8))


# ---- samples -------------------------------------------------------------------------------------

def test_info_and_the_page(server):
    status, _, body = request(server, "GET", "/api/info")
    info = json.loads(body)
    assert status == 200 and info["resolutions"] == [8, 16] and info["resolution"] == 16
    assert info["num_classes"] == 10 and info["guidance"] == {"8": None, "16": None} and info["text"] is False
    assert set(info["tools"]) == {"invert", "superres", "edit", "interpolate", "inpaint"}
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="grid-img"' in page
    assert b"http://" not in page and b"https://" not in page and b"src=" not in page.split(b"<script>")[0]  # no CDN


def test_sample_is_the_clis_images_in_one_call(server):
    status, headers, body = sample(server, seed=3, n=9, **{"class": 2})
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Labels"] == ",".join(["2"] * 9)
    assert float(headers["X-Server-Ms"]) >= float(headers["X-Compute-Ms"]) > 0
    got = pixels(body)
    assert got.shape == (48, 48)  # 3×3 at 16 px
    # the same z (seeded by (seed, i)) and labels as `pagoda sample`: its 64-image call equals it up to the last bits
    G = server.G[16]
    cli = to_uint8(make_sampler("generator", G, seed=3, class_=2)(0, 9))  # 9 × 16 × 16 × 1
    grid = cli[..., 0].reshape(3, 3, 16, 16).transpose(0, 2, 1, 3).reshape(48, 48)
    assert np.abs(got.astype(int) - grid).max() <= 1
    # defaults: 16 images at the top stage, labels i mod 10; another seed, stage or grid size draws another image
    status, headers, body = sample(server)
    assert status == 200 and pixels(body).shape == (64, 64) and headers["X-Labels"].startswith("0,1,2,")
    assert sample(server, seed=4)[2] != body and pixels(sample(server, resolution=8)[2]).shape == (32, 32)
    assert sample(server, seed=0)[2] == body  # deterministic


def test_a_guided_stage_takes_omega(tiny_run, tmp_path):
    """A run whose stage was trained with --guidance-max 3 (stand-in: an ω embedding set to random values)."""
    run = tmp_path / "guided"
    shutil.copytree(tiny_run / "teacher", run / "teacher")
    config = json.loads((tiny_run / "config.json").read_text())
    config["train"]["guidance_max"] = 3.0
    (run / "config.json").write_text(json.dumps(config))
    G = Generator.from_teacher(load_teacher(run / "teacher" / "teacher.pt"), guidance=True)
    torch.nn.init.normal_(G.unet.guidance_embed[2].weight, std=0.1, generator=torch.Generator().manual_seed(0))
    save_checkpoint(G.to_checkpoint(), run / "stage-08" / "generator.pt")
    with running(ServeConfig(checkpoint=str(run), port=0)) as app:
        assert json.loads(request(app, "GET", "/api/info")[2])["guidance"] == {"8": [1.0, 3.0]}
        one, two = sample(app, guidance=1), sample(app, guidance=2)
        assert one[0] == two[0] == 200 and one[2] == sample(app)[2] and two[2] != one[2]
        error(sample(app, guidance=-1), 400, "`guidance` -1")


@pytest.mark.parametrize("req, status, needles", [
    (dict(n=0), 400, ("`n` 0", "out of range")),
    (dict(n=65), 400, ("`n` 65", "limit")),
    (dict(n=2.5), 400, ("not an integer",)),
    ({"class": 10}, 400, ("class 10", "0..9")),
    (dict(resolution=32), 400, ("resolution 32", "8, 16")),
    (dict(guidance=2), 400, ("no guidance embedding",)),
    (dict(prompt="a red shirt"), 400, ("not text-conditional", "--class")),
    (dict(colour=1), 400, ("unknown field 'colour'",)),
])
def test_sample_refuses_bad_requests(server, req, status, needles):
    error(sample(server, **req), status, *needles)


def test_unknown_routes_methods_and_bodies(server):
    error(request(server, "GET", "/api/nope"), 404, "no route /api/nope")
    error(request(server, "GET", "/etc/passwd"), 404, "no route")  # no client path is ever opened
    error(request(server, "GET", "/api/sample"), 405, "POST")
    error(request(server, "POST", "/api/sample", b"{seed", {"Content-Type": "application/json"}), 400, "not JSON")
    error(request(server, "POST", "/api/invert", b"x", {"Content-Type": "text/plain"}), 415, "multipart")


# ---- tools ---------------------------------------------------------------------------------------

def test_each_tool_shows_the_clis_numbers_and_images(server, tiny_run, shirt, tmp_path):
    (tmp_path / "shirt.png").write_bytes(shirt)
    mask = np.full((20, 30), 255, np.uint8)
    mask[5:15, 10:20] = 0
    cases = {"invert": {}, "superres": dict(reference=shirt), "edit": dict(to_class=3),
             "interpolate": dict(image2=png(255 - pixels(shirt)), frames=3), "inpaint": dict(mask=png(mask), iters=2)}
    for tool, extra in cases.items():
        status, headers, body = upload(server, tool, image=shirt, **extra)
        assert status == 200, body
        r = json.loads(body)
        assert r["tool"] == tool and r["summary"] == summary_line(tool, r["numbers"]) and r["compute_ms"] > 0
        assert float(headers["X-Server-Ms"]) >= r["compute_ms"]
        for key in ("image", "side_by_side"):
            assert r[key].startswith("data:image/png;base64,")
    # invert: the upload is decoded as the CLI reads the file, and the result is invert_result's
    r = json.loads(upload(server, "invert", image=shirt, **{"class": 4})[2])
    G, D = load_models(str(tiny_run))
    want = invert_result(G, D, load_image(tmp_path / "shirt.png", 16, 1)[None], 4, steps=4)
    assert r["numbers"] == want.numbers and r["numbers"]["label"] == 4
    assert np.array_equal(pixels(base64.b64decode(r["image"].split(",")[1])), to_uint8(want.image)[..., 0])
    r = json.loads(upload(server, "edit", image=shirt, to_class=3, resolution=8)[2])
    assert r["numbers"]["to_class"] == 3 and pixels(base64.b64decode(r["image"].split(",")[1])).shape == (8, 8)


def test_tools_refuse_bad_fields(server, shirt):
    error(upload(server, "edit", image=shirt), 400, "--to-class")
    error(upload(server, "edit", image=shirt, to_class=10), 400, "--class 10")
    error(upload(server, "interpolate", image=shirt), 400, "no `image2` field")
    error(upload(server, "interpolate", image=shirt, image2=shirt, frames=17), 400, "`frames` 17")
    error(upload(server, "inpaint", image=shirt, mask=png(np.full((4, 4), 255, np.uint8))), 400, "all white")
    error(upload(server, "inpaint", image=shirt, mask=shirt, iters=201), 400, "`iters` 201")
    error(upload(server, "invert", to_class=1), 400, "no `image` field", "curl -F image=@FILE")


def test_bad_uploads_get_the_clis_one_line_error_and_the_server_keeps_serving(server, tiny_run, tmp_path):
    noise = png(np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8))
    bad = {"notes": b"these are not pixels", "torn": noise[:100]}
    for stem, data in bad.items():
        (tmp_path / f"{stem}.png").write_bytes(data)
        cli = one_line_error(invoke("invert", tmp_path / f"{stem}.png", "--checkpoint", tiny_run, "--out", tmp_path))
        api = error(upload(server, "invert", image=data), 400, "upload 'image.png'")
        assert api.split(": ", 1)[1] == cli.split(": ", 2)[2]  # the same message after the file's name
    assert request(server, "GET", "/api/info")[0] == 200


def test_oversize_uploads_are_refused_before_decoding(server, shirt):
    big = png(np.random.default_rng(1).integers(0, 256, (400, 400), dtype=np.uint8))  # > 100 kB
    error(upload(server, "invert", image=big), 413, "over the server's limit of 100,000")
    wide = png(np.zeros((10, 5000), np.uint8))  # 50 000 pixels > 200², small file
    error(upload(server, "invert", image=wide), 400, "5000×10 image refused before decoding")
    assert upload(server, "invert", image=shirt)[0] == 200  # and the server keeps serving


# ---- a text run ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    """The server on the tiny emoji run of tests/helpers.py."""
    run = build_tiny_text_run(tmp_path_factory.getbasetemp())[1]
    with running(ServeConfig(checkpoint=str(run), port=0, encode_steps=4)) as app:
        yield app


def test_text_run_samples_a_prompt_and_refuses_bad_ones_in_one_line(text_server):
    info = json.loads(request(text_server, "GET", "/api/info")[2])
    assert info["text"] is True and info["num_classes"] is None and info["resolutions"] == [8, 16]
    assert len(info["examples"]) == 8 and all(isinstance(e, str) and e.strip() for e in info["examples"])
    status, headers, body = sample(text_server, prompt="red apple", n=4, seed=1)
    assert status == 200 and headers["X-Labels"] == ""
    want = make_sampler("generator", text_server.G[16], seed=1, call_size=4, prompts=["red apple"], per_prompt=4)(0, 4)
    assert np.array_equal(pixels(body), np.asarray(grid_image(want)))  # every image under the prompt
    assert not np.array_equal(pixels(sample(text_server, prompt="cat face", n=4, seed=1)[2]), pixels(body))
    error(sample(text_server, prompt=""), 400, "empty prompt")
    error(sample(text_server, prompt="x" * 200), 400, "longer than the text context")
    error(sample(text_server), 400, "text-conditional", "--prompt")
    error(sample(text_server, **{"class": 1, "prompt": "red apple"}), 400, "instead of --class")
    error(sample(text_server, prompt=3), 400, "`prompt` 3 is not a string")
    assert sample(text_server, prompt="red apple", n=1)[0] == 200  # and the server keeps serving


def test_text_run_tools_take_prompt_and_to_prompt(text_server):
    img = png(np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    mask = np.full((20, 20), 255, np.uint8)
    mask[5:15, 5:15] = 0
    cases = {"invert": {}, "superres": {}, "edit": dict(to_prompt="green heart"),
             "interpolate": dict(image2=img, frames=3), "inpaint": dict(mask=png(mask), iters=2)}
    for tool, extra in cases.items():
        status, _, body = upload(text_server, tool, image=img, prompt="red heart", **extra)
        assert status == 200, body
        r = json.loads(body)
        assert r["numbers"]["prompt"] == "red heart" and r["summary"] == summary_line(tool, r["numbers"])
    r = json.loads(upload(text_server, "edit", image=img, to_prompt="green heart")[2])
    assert (r["numbers"]["prompt"], r["numbers"]["to_prompt"]) == ("", "green heart")  # default: unconditional encode
    error(upload(text_server, "edit", image=img), 400, "--to-prompt")
    error(upload(text_server, "edit", image=img, to_prompt="x" * 200), 400, "longer than the text context")
    error(upload(text_server, "invert", image=img, **{"class": 2}), 400, "text-conditional")


def test_multipart_is_binary_safe():
    data = bytes(range(256)) * 3 + b"\r\n--x\r\n\r\r\n"
    body = (b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + data +
            b'\r\n--B\r\nContent-Disposition: form-data; name="to_class"\r\n\r\n3\r\n--B--\r\n')
    assert parse_multipart(body, "multipart/form-data; boundary=B") == {"image": ("a.png", data), "to_class": (None, b"3")}


# ---- concurrency and limits ----------------------------------------------------------------------

def test_concurrent_requests_are_queued_and_none_is_lost(server):
    want = {seed: sample(server, seed=seed, n=4)[2] for seed in range(8)}
    got, threads = {}, [threading.Thread(target=lambda s=s: got.__setitem__(s, sample(server, seed=s, n=4)))
                        for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {s: r[0] for s, r in got.items()} == {s: 200 for s in range(8)}
    assert {s: r[2] for s, r in got.items()} == want


def test_a_full_queue_and_a_slow_request_are_refused():
    worker, gate = Worker(max_queue=2), threading.Event()
    try:
        running = worker.submit(gate.wait)
        time.sleep(0.1)  # taken by the worker: the queue is empty again
        waiting = [worker.submit(lambda k=k: k) for k in range(2)]
        with pytest.raises(ApiError, match="busy") as e:
            worker.submit(lambda: 3)
        assert e.value.status == 503
        gate.set()
        assert running.result(5) is True and [f.result(5) for f in waiting] == [0, 1]
    finally:
        gate.set()
        worker.close()


def test_a_request_past_its_deadline_is_refused(server):
    old = server.cfg.timeout_s
    server.cfg.timeout_s = 0.001
    try:
        error(sample(server, n=64), 503, "took longer than 0.001 s")
    finally:
        server.cfg.timeout_s = old
    assert sample(server, n=1)[0] == 200


def test_cli_serve_refuses_a_bad_run_or_a_taken_port(tiny_run, tmp_path):
    one_line_error(invoke("serve", "--checkpoint", tmp_path), "no finished stage")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        one_line_error(invoke("serve", "--checkpoint", tiny_run, "--port", s.getsockname()[1]), "cannot listen on",
                       "--port")


# ---- the page in a real browser ------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser():
    """Headless Chromium through selenium; skipped (not in CI) when either is absent."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = [name for name, ok in (("selenium", webdriver), ("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER))
               if not ok]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{', '.join(missing)} missing in CI: ./dev setup installs them")
        pytest.skip(f"{', '.join(missing)} not installed: run ./dev setup (apt chromium chromium-driver, pip selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_page_in_chromium_redraws_on_next_seed_and_shows_errors(server, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait
    driver, notes = browser(), tmp_path / "notes.png"
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 20)
        shown = ("const i = document.getElementById('grid-img'); if (!i.complete || !i.naturalWidth) return null;"
                 "const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
                 "c.getContext('2d').drawImage(i, 0, 0); return [i.dataset.seed, c.toDataURL()];")
        wait.until(lambda d: (d.execute_script(shown) or [None])[0] == "0")
        first = driver.execute_script(shown)[1]
        assert "ms" in driver.find_element("id", "sample-status").text
        driver.find_element("id", "next-seed").click()
        wait.until(lambda d: (d.execute_script(shown) or [None])[0] == "1")
        assert driver.find_element("id", "seed").get_attribute("value") == "1"
        assert driver.execute_script(shown)[1] != first  # a new image
        assert driver.find_element("id", "sample-error").text == ""
        # a bad upload: the server's one-line error shown on the page
        notes.write_text("these are not pixels")
        driver.execute_script("document.getElementById('file').hidden = false")
        driver.find_element("id", "file").send_keys(str(notes))
        wait.until(lambda d: "not a readable PNG/JPEG/WebP/BMP image" in d.find_element("id", "tool-error").text)
    finally:
        driver.quit()
