"""pagoda/loop.py: progress that reads in a log file (plain lines when stdout is not a terminal); the label rule of
every grid and export."""
from __future__ import annotations

import io
import json
import time

import pytest
import torch

from pagoda.loop import LineProgress, LoopSpec, index_labels, progress_bar, run_loop


def test_line_progress_writes_full_lines_with_step_numbers_and_eta():
    buf = io.StringIO()
    with LineProgress(every=0, stream=buf) as bar:
        task = bar.add_task("stage-16 (16px)", total=4, completed=1, info="")
        for k in (2, 3, 4):
            bar.update(task, completed=k, info=f"rec {0.1 * k:.4g}  adv 0.05  126 img/s")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("stage-16 (16px)  step 2/4  rec 0.2  adv 0.05  126 img/s  elapsed 0m")
    assert all(" ETA " in ln for ln in lines) and lines[-1].startswith("stage-16 (16px)  step 4/4")


def test_line_progress_prints_at_most_every_interval_and_always_the_end():
    buf = io.StringIO()
    with LineProgress(every=3600, stream=buf) as bar:
        task = bar.add_task("encode", total=None, info="")
        for k in range(1, 6):
            bar.update(task, completed=k, info="9 img/s")  # total unknown: no ETA
        bar.update(task, completed=6, total=6)
    lines = buf.getvalue().splitlines()
    assert [ln.split("  ")[1] for ln in lines] == ["step 1/?", "step 6/6"]  # the first update and the end
    assert lines[0].endswith("ETA ?")


def test_run_loop_logs_plain_lines_when_stdout_is_a_file(tmp_path, capsys):
    """`pagoda train > train.log`: every line names the loop, the step, the losses, images/s and the ETA."""
    assert isinstance(progress_bar(True), LineProgress)  # pytest's captured stdout is not a terminal
    steps = iter(range(100))

    def step() -> dict[str, float]:
        return {"rec": 1.0 / (1 + next(steps)), "adv": 0.5}
    run_loop(step, lambda: None, LoopSpec("stage-08 (8px)", total=3, batch=4, ckpt_every=10), 0, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("stage-08 (8px)  step 1/3  rec 1  adv 0.5  ") and "img/s" in out[0] and "ETA" in out[0]
    assert out[-1].startswith("stage-08 (8px)  step 3/3  rec 0.3333  adv 0.5")
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    (tmp_path / "q").mkdir()
    run_loop(step, lambda: None, LoopSpec("quiet", total=2, batch=4, ckpt_every=10), 0, tmp_path / "q", progress=False)
    assert capsys.readouterr().out == ""


def test_timing_adds_up_the_sessions_of_a_resumed_loop(tmp_path):
    """timing.json is the cost of every timed session: a loop resumed at step 3 adds its steps and seconds."""
    def step() -> dict[str, float]:
        time.sleep(0.01)
        return {}
    run_loop(step, lambda: None, LoopSpec("a", total=3, batch=4, ckpt_every=10), 0, tmp_path, progress=False)
    first = json.loads((tmp_path / "timing.json").read_text())
    run_loop(step, lambda: None, LoopSpec("a", total=5, batch=4, ckpt_every=10), 3, tmp_path, progress=False)
    both = json.loads((tmp_path / "timing.json").read_text())
    assert (first["steps"], both["steps"]) == (3, 5)
    assert both["seconds"] >= first["seconds"] + 0.02 and both["cpu_seconds"] >= first["cpu_seconds"]
    assert both["img_per_s"] == pytest.approx(5 * 4 / both["seconds"])
    run_loop(step, lambda: None, LoopSpec("b", total=2, batch=4, ckpt_every=10), 0, tmp_path, progress=False)
    assert json.loads((tmp_path / "timing.json").read_text())["steps"] == 2  # a fresh start replaces it


def test_index_labels_image_i_has_class_i_mod_C():
    """Image i is labelled i mod C however the sequence is cut; `class_` labels all; None when unconditional."""
    whole = index_labels(0, 25, 10)
    assert whole.tolist() == [k % 10 for k in range(25)]
    assert torch.equal(torch.cat([index_labels(0, 7, 10), index_labels(7, 18, 10)]), whole)
    assert torch.equal(index_labels(0, 100, 10).view(10, 10), torch.arange(10).repeat(10, 1))  # a 10-wide grid: one class a column
    assert index_labels(3, 4, 10, class_=7).tolist() == [7] * 4
    assert index_labels(0, 4, None) is None and index_labels(0, 4, None, class_=None) is None
