"""Checkpoint I/O: atomic writes (temp file + fsync + rename), safe loads (weights_only=True), and the one
checkpoint convention (docs/checkpoints.md).

A checkpoint is a dict of tensors and plain containers (dict/list/str/int/float/bool/None), so
`torch.load(path, weights_only=True)` can read it; configs live inside as plain dicts. Model files say what
they are in `"kind"` (a teacher, a generator) and hold their weights under `"state_dict"`; a raw ADM state dict
(edm_imagenet64_ema.pt) has no kind. A training state (RUN/…/checkpoint.pt) is {"step", "config", "<net>",
"<net>_ema", "opt_<net>"}; `load_state` reads it (older key names renamed) and `check_config` refuses a file (or a
cache's or export's settings) written under another config, in one line naming the file and the fix.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch


TEACHER, GENERATOR, ADM = "teacher", "pagoda.generator", "adm"  # what checkpoint_kind tells apart
_WHAT = {TEACHER: "a teacher (RUN/teacher/teacher.pt)", GENERATOR: "a generator (RUN/stage-XX/generator.pt)",
         ADM: "a raw ADM state dict (e.g. edm_imagenet64_ema.pt)"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the fix."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, write_fn) -> Path:
    """Call write_fn(fileobj) on a temp file next to `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomically save a dict of tensors / plain containers with torch.save."""
    return atomic_write_bytes(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write pretty JSON."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write_bytes(path, lambda f: f.write(data))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load with weights_only=True (mmap=True: tensors stay on disk, paged in on use); refuse code-running pickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass the path of a .pt file or a run directory")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a plain-tensor checkpoint and was refused for safety "
            f"(weights_only load failed: {first}); re-save it as a state dict of tensors"
        ) from None
    except Exception as e:  # any other failure to unpickle = a torn or foreign file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({msg}); use an intact copy or delete it and retrain"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict: it was not written by pagoda")
    return obj


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """TEACHER or GENERATOR (ours say so), ADM (tensors, no kind: a UNet state dict), else "training state"."""
    if isinstance(ckpt.get("kind"), str):
        return ckpt["kind"]
    sd = ckpt.get("state_dict", ckpt)
    return ADM if isinstance(sd, dict) and any(torch.is_tensor(v) for v in sd.values()) else "training state"


def check_kind(ckpt: dict[str, Any], path: str | os.PathLike, expect: tuple[str, ...]) -> str:
    """checkpoint_kind(ckpt), or a one-line CheckpointError naming the file when it is not one of `expect`."""
    kind = checkpoint_kind(ckpt)
    if kind not in expect:
        wanted = " or ".join(_WHAT.get(k, k) for k in expect)
        raise CheckpointError(f"{path} is {_WHAT.get(kind, f'a {kind!r} checkpoint')}, not {wanted}: pass that instead")
    return kind


def open_checkpoint(path: str | os.PathLike, expect: tuple[str, ...], map_location: str | torch.device = "cpu"
                    ) -> tuple[str, dict[str, Any]]:
    """(kind, checkpoint) of a model file whose kind must be one of `expect` (see check_kind)."""
    ckpt = load_checkpoint(path, map_location)
    return check_kind(ckpt, path, expect), ckpt


def _plain(config) -> dict[str, Any]:
    """A config (dataclass or dict) as JSON would store it (tuples as lists)."""
    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else dict(config)))


def check_config(saved: dict[str, Any] | None, config, path: str | os.PathLike, what: str = "a training state",
                 option: str = "--out", delete: str | os.PathLike | None = None) -> None:
    """Refuse `path` unless the config saved in it is `config` (a dataclass or a dict): a one-line CheckpointError
    naming the file, the first fields that differ and the fix (another `option`, or delete `delete` to start again).
    Fields of a dataclass `config` that the file lacks take their defaults (files written before they existed)."""
    defaults = {} if not is_dataclass(config) else _plain(
        {f.name: f.default for f in fields(config) if f.default is not MISSING})
    ours, theirs = _plain(config), {**defaults, **_plain(saved or {})}
    if saved is not None and theirs == ours:
        return
    diff = ", ".join(f"{k}: {theirs.get(k)!r} vs {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
                     if theirs.get(k) != ours.get(k))
    why = f"of another config ({diff[:300]})" if saved is not None else "without a config"
    raise CheckpointError(f"{path} holds {what} {why}: pass another {option}, or delete {delete or path} to start "
                          f"it again")


def load_state(path: str | os.PathLike, config, map_location: str | torch.device = "cpu",
               renamed: dict[str, str] | None = None, delete: str | os.PathLike | None = None,
               total: str | None = None) -> dict[str, Any]:
    """A training state {"step", "config", "<net>", "<net>_ema", "opt_<net>"} written under `config` (check_config);
    keys of an older layout are renamed (`renamed`: old -> new; "stage" -> "config" always). `total` names the config
    field of the step count, which may differ while the state's step has not passed it: a run resumed with more or
    fewer steps is the run with that count (its draws are a function of the step)."""
    renamed = {"stage": "config", **(renamed or {})}
    ckpt = {renamed.get(k, k): v for k, v in load_checkpoint(path, map_location).items()}
    saved, want = ckpt.get("config"), _plain(config)
    if total and saved is not None and ckpt.get("step", 0) <= want[total]:
        saved = {**saved, total: want[total]}
    check_config(saved, config, path, delete=delete)
    return ckpt
