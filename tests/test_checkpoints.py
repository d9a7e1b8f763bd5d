"""The checkpoint convention (docs/checkpoints.md): one config check, and files of the older layouts still load."""
from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch

from helpers import tiny_assets
from pagoda.grow import plan_stages
from pagoda.io import CheckpointError, check_config, load_checkpoint, load_state, save_checkpoint
from pagoda.teacher import Denoiser, load_teacher, teacher_checkpoint
from pagoda.train import TeacherConfig, train_teacher
from pagoda.unet import PRESETS, UNet


def test_check_config_one_line_names_the_file_and_the_fix(tmp_path):
    """Equal configs pass, also when the file predates a field (it takes its default); any other refuses in one line."""
    s = plan_stages(8, 16, "tiny")[1]  # anchor 0 (the default)
    old = {k: v for k, v in asdict(s).items() if k != "anchor"}
    check_config(asdict(s), s, "x.pt")
    check_config(old, s, "x.pt")
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError) as e:
        check_config({**old, "steps": 1}, s, path, delete=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path} holds a training state of another config (steps: 1 vs 3)")
    assert msg.endswith(f"pass another --out, or delete {tmp_path} to start it again")
    for saved in ({**old, "bogus": 1}, None, old):  # an unknown field, no config, a field whose default differs
        with pytest.raises(CheckpointError, match="holds a training state"):
            check_config(saved, replace(s, anchor=1.0) if saved is old else s, path)
    check_config({"seed": 0, "class": None}, {"seed": 0, "class": None}, "export.json")  # plain dicts (settings)
    with pytest.raises(CheckpointError, match=r"export.json holds an export of another config \(seed: 0 vs 1\): "
                                              r"pass another output"):
        check_config({"seed": 0}, {"seed": 1}, "export.json", what="an export", option="output")


def test_old_stage_state_loads(tmp_path):
    """A stage checkpoint of the older layout (its config under "stage") loads under the convention's keys."""
    s = plan_stages(8, 16, "tiny")[0]
    save_checkpoint({"step": 2, "stage": asdict(s), "G": {"w": torch.ones(2)}}, tmp_path / "checkpoint.pt")
    ck = load_state(tmp_path / "checkpoint.pt", s)
    assert ck["config"] == asdict(s) and ck["step"] == 2 and "stage" not in ck
    with pytest.raises(CheckpointError, match="another config"):
        load_state(tmp_path / "checkpoint.pt", replace(s, steps=9))
    for steps in (2, 9):  # the step count may change while step 2 has not passed it (a resume with that count) ...
        assert load_state(tmp_path / "checkpoint.pt", replace(s, steps=steps), total="steps")["step"] == 2
    for other in (replace(s, steps=1), replace(s, steps=9, batch=s.batch + 1)):  # ... and nothing else may
        with pytest.raises(CheckpointError, match="another config"):
            load_state(tmp_path / "checkpoint.pt", other, total="steps")


def test_old_teacher_file_loads(tmp_path):
    """A teacher file whose weights sit under "ema" (before the convention) loads as one under "state_dict"."""
    torch.manual_seed(0)
    D = Denoiser(UNet(PRESETS["tiny"]))
    new = teacher_checkpoint(D)
    old = {("ema" if k == "state_dict" else k): v for k, v in new.items()}
    save_checkpoint(old, tmp_path / "old.pt")
    loaded = load_teacher(tmp_path / "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), D.state_dict().values()))


def test_teacher_resumes_from_an_old_layout_checkpoint(tmp_path, monkeypatch):
    """Teacher training killed at step 1, its checkpoint rewritten in the old layout (model/ema/opt), resumes to the
    same teacher as an uninterrupted run; a checkpoint of another config is refused and kept."""
    _, data = tiny_assets(tmp_path)
    cfg = TeacherConfig(data=str(data), unet="tiny", steps=2, batch=4, grid_every=2, ckpt_every=1, sample_steps=2)
    whole = load_checkpoint(train_teacher(cfg, tmp_path / "whole", progress=False, device="cpu"))["state_dict"]
    monkeypatch.setenv("PAGODA_TEST_FAULT", "0:teacher:1:raise")
    with pytest.raises(RuntimeError, match="test fault"):
        train_teacher(cfg, tmp_path / "cut", progress=False, device="cpu")
    monkeypatch.delenv("PAGODA_TEST_FAULT")
    ckpt_path = tmp_path / "cut" / "checkpoint.pt"
    new = load_checkpoint(ckpt_path)
    assert set(new) == {"step", "config", "teacher", "teacher_ema", "opt_teacher"} and new["step"] == 1
    names = {"teacher": "model", "teacher_ema": "ema", "opt_teacher": "opt"}
    save_checkpoint({names.get(k, k): v for k, v in new.items()}, ckpt_path)
    with pytest.raises(CheckpointError, match="checkpoint.pt holds a training state of another config .*batch: 4 vs 2"):
        train_teacher(replace(cfg, batch=2), tmp_path / "cut", progress=False, device="cpu")
    assert set(load_checkpoint(ckpt_path)) == {"step", "config", "model", "ema", "opt"}  # refused: nothing written
    resumed = load_checkpoint(train_teacher(cfg, tmp_path / "cut", progress=False, device="cpu"))["state_dict"]
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
