"""The run report (pagoda.report.write_report, `pagoda report`, and its call at the end of a training run).

Built from a tiny real run (teacher 8 px, stages 8 and 16); FID rows use a 16-d stand-in for Inception
(see tests/test_eval.py) so the `--fid` path runs in seconds.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image
from typer.testing import CliRunner

from helpers import build_tiny_run

from pagoda import metrics as M
from pagoda.cli import app
from pagoda.evaluate import record_results
from pagoda.report import SECTIONS, _smooth, logged_seconds, write_report

runner = CliRunner()
IMG = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy (tests write into it)."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "eval.json").unlink(missing_ok=True)
    return run


def embedded_images(page: str) -> list[Image.Image]:
    """Every base64 PNG of the page, decoded and fully loaded by PIL."""
    out = []
    for b64 in IMG.findall(page):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
        out.append(img)
    return out


def test_train_writes_a_complete_report(tiny_run):
    """`train()` ends by writing the report: every section, every image decodes, grids byte-identical to the run's."""
    page = (tiny_run / "report.html").read_text()
    for key, title in SECTIONS:
        assert f"<h2 id='{key}'>{title}</h2>" in page
    images = embedded_images(page)
    grids = [tiny_run / "teacher" / "grid-000010.png", tiny_run / "stage-08" / "grid-final.png",
             tiny_run / "stage-16" / "grid-final.png"]
    assert len(images) == len(grids) + 2  # + the loss and the w/α plots
    b64 = IMG.findall(page)
    for g in grids:
        assert base64.b64encode(g.read_bytes()).decode() in b64
    assert all(img.format == "PNG" and min(img.size) > 0 for img in images)
    assert "no RUN/eval.json yet" in page  # FID is not computed by default
    assert "src='http" not in page and "<link" not in page  # self-contained


def test_report_md_links_resolve_and_tables_match_the_run(run):
    html_path, md_path = write_report(run)
    md = md_path.read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 5
    for link in links:
        Image.open(run / link).load()  # relative to RUN, and a real PNG
    timing = json.loads((run / "stage-16" / "timing.json").read_text())
    assert (f"| stage-16 | {timing['steps']} | {timing['seconds']:.1f} | {timing['cpu_seconds']:.1f} | "
            f"{timing['img_per_s']:.1f} | stage-16/timing.json |") in md
    assert "| teacher | 10 |" in md and "teacher/timing.json" in md
    enc = json.loads((run / "latents" / "timing.json").read_text())  # the latent cache's build, a row of its own
    assert enc["images"] > 0 and f"| latent cache ({enc['images']} images + flips) | – | {enc['seconds']:.1f} |" in md
    page = html_path.read_text()
    pre = re.search(r"<pre>(.*)</pre>", page, re.S).group(1)
    assert json.loads(html.unescape(pre)) == json.loads((run / "config.json").read_text())


def test_report_fid_table_from_eval_json_and_from_fid_option(run, tmp_path, monkeypatch):
    record_results([{"model": "G 16px, 1 NFE", "checkpoint": str(run / "stage-16" / "generator.pt"), "n": 50,
                     "fid": 123.456, "kid": 0.0123, "kid_std": 0.001, "ref": "fashion-mnist:train@16", "ref_n": 50,
                     "mode": "clean"}], run / "eval.json")
    page = write_report(run)[0].read_text()
    assert "123.46" in page and "12.30 ± 1.00" in page and "no RUN/eval.json yet" not in page
    # --fid N: score the teacher and every stage first (stand-in Inception, private cache), then report
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    w = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(M, "load_inception", lambda *a, **k: (lambda x: F.adaptive_avg_pool2d(x / 255, 4).flatten(1) @ w))
    res = runner.invoke(app, ["report", str(run), "--fid", "20", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = json.loads((run / "eval.json").read_text())["results"]
    assert [(r["model"].split(",")[0], r["n"]) for r in rows] == [("G 16px", 50), ("teacher 8px", 20), ("G 8px", 20), ("G 16px", 20)]
    md = (run / "report.md").read_text()
    for r in rows:
        assert f"| {r['model']} | {r['n']} | {r['fid']:.2f} |" in md


def test_report_of_an_empty_or_partial_run(tmp_path, run):
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty)[0].read_text()
    assert all(f"id='{k}'" in page for k, _ in SECTIONS) and "no grids yet" in page
    assert len(embedded_images(page)) == 2  # the (empty) plots still decode
    shutil.rmtree(run / "stage-16")
    page = write_report(run)[0].read_text()
    assert "stage-08 (G, 1 NFE)" in page and "stage-16" not in page.split("<h2 id='config'>")[0]
    res = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_report_failure_only_warns_at_the_end_of_train(run, monkeypatch):
    import pagoda.launch
    from pagoda.train import TrainConfig

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pagoda.launch, "write_report", broken)
    with pytest.warns(UserWarning, match="run report not written.*disk full"):
        out = pagoda.launch.run_worker(TrainConfig(out=str(run), res=16, teacher_preset="tiny", preset="tiny",
                                                   encode_images=16, encode_steps=4, ckpt_every=100), progress=False)
    assert out == run


@settings(max_examples=25, deadline=None)
@given(v=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=30), k=st.integers(1, 8))
def test_smooth_is_a_trailing_mean(v, k):
    s = _smooth(v, k)
    assert len(s) == len(v) and s[0] == pytest.approx(v[0])
    for i in range(len(v)):
        window = v[max(0, i - k + 1):i + 1]
        assert s[i] == pytest.approx(sum(window) / len(window), abs=1e-6)


def test_logged_seconds_sums_sessions():
    # session 1: steps 1-4 at a cumulative 8 img/s; killed, resumed at step 3: steps 3-5 at 4 img/s (batch 2)
    log = [{"step": s, "img_per_s": 8.0} for s in (1, 2, 3, 4)] + [{"step": s, "img_per_s": 4.0} for s in (3, 4, 5)]
    assert logged_seconds(log, 2) == pytest.approx(4 * 2 / 8 + 3 * 2 / 4)
    assert logged_seconds([], 2) == 0.0
