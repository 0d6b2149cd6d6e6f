"""Checkpoints that cannot execute code and survive a crash at any moment.

A checkpoint is a directory: the trainable tensors (``prompt.safetensors``), the config (``config.json``),
optionally the trainer state (``trainer.safetensors`` for its tensors, ``trainer.json`` for the rest: optimizer,
schedule, position in the data, RNG states), and ``manifest.json``, written last, with each file's size and
SHA-256. Nothing is unpickled: a file that does not match the manifest is reported, never loaded.

``save`` writes ``NAME.tmp``, fsyncs it, then swaps it in (``NAME`` -> ``NAME.old``, ``NAME.tmp`` -> ``NAME``)
with the directory fsynced after each rename. Readers take the newest complete candidate (``NAME.tmp``, then
``NAME``, then ``NAME.old``), so a crash in any window, even again during the next save, loses at most the
save in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS, CONFIG, MANIFEST = "prompt.safetensors", "config.json", "manifest.json"
TRAINER_TENSORS, TRAINER_JSON = "trainer.safetensors", "trainer.json"
FORMAT = "vpfast-checkpoint-1"


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated or altered (it does not match the manifest)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _candidates(final: Path) -> tuple[Path, Path, Path]:
    """Newest first: a complete ``.tmp`` is a finished save whose swap was interrupted."""
    return final.with_name(final.name + ".tmp"), final, final.with_name(final.name + ".old")


def problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint (a sentence naming the file), or None if it is."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        if (directory / "trainer.pt").exists():
            return (f"{manifest_path} is missing: written by an older vpfast, whose trainer.pt is a pickle, "
                    f"which is never loaded")
        return f"{manifest_path} is missing (an unfinished write, or not a vpfast checkpoint)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"] if manifest.get("format") == FORMAT else None
    except (ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, dict) or TENSORS not in files or CONFIG not in files or \
            not all(isinstance(entry, dict) for entry in files.values()):
        return f"{manifest_path} is not a {FORMAT} manifest"
    for name, expected in files.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{path} has {size} bytes, its manifest says {expected.get('bytes')} (truncated or altered)"
        if _sha256(path) != expected.get("sha256"):
            return f"{path} does not match the SHA-256 in its manifest (altered or damaged)"
    return None


def _other(final: Path) -> str:
    sibling = {"last": "best", "best": "last"}.get(final.name)
    return f"; try the other checkpoint, {final.with_name(sibling)}" if sibling else ""


def resolve(directory: str | Path) -> Path:
    """The newest complete checkpoint at ``directory``: the directory itself, or a leftover of an interrupted
    save. Raises FileNotFoundError if there is none, CorruptCheckpoint (naming the file) if one is damaged."""
    final = Path(directory)
    tmp, _, old = _candidates(final)
    damaged = None
    for candidate in _candidates(final):
        if not candidate.is_dir():
            continue
        reason = problem(candidate)
        if reason is None:
            if candidate == old and final.is_dir():
                warnings.warn(f"{damaged}: using the previous checkpoint {old}", stacklevel=2)
            return candidate
        if candidate != tmp and damaged is None:  # an incomplete .tmp is an interrupted save, not damage
            damaged = reason
    if damaged is not None:
        raise CorruptCheckpoint(f"cannot read the checkpoint {final}: {damaged}{_other(final)}")
    raise FileNotFoundError(f"no checkpoint at {final} (expected {TENSORS}, {CONFIG} and {MANIFEST} inside)")


def locate(path: str | Path) -> Path:
    """The checkpoint a user means by ``path``: a run directory's ``best/``, else ``path`` itself."""
    path = Path(path)
    best = path / "best"
    return best if any(candidate.is_dir() for candidate in _candidates(best)) else path


def _write(path: Path, writer) -> dict:
    writer(path)
    with path.open("rb+") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _recover(final: Path) -> None:
    """Make ``final`` the newest complete checkpoint and remove the leftovers of an interrupted save."""
    tmp, _, old = _candidates(final)
    if tmp.is_dir() and problem(tmp) is None:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            _fsync(final.parent)
        tmp.rename(final)
        _fsync(final.parent)
    elif old.is_dir() and problem(old) is None and (not final.exists() or problem(final) is not None):
        shutil.rmtree(final, ignore_errors=True)
        old.rename(final)
        _fsync(final.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    if final.is_dir() and problem(final) is None:
        shutil.rmtree(old, ignore_errors=True)


def save(directory: str | Path, tensors: dict[str, torch.Tensor], config, trainer_state: dict | None = None) -> Path:
    """Write the checkpoint ``directory`` (replacing an older one) so that a crash at any point leaves the old or
    the new one complete and found by ``resolve``."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    tmp, _, old = _candidates(final)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    files = {TENSORS: _write(tmp / TENSORS, lambda p: save_file(tensors, str(p))),
             CONFIG: _write(tmp / CONFIG, config.save)}
    if trainer_state is not None:
        plain, trainer_tensors = encode(trainer_state)
        files[TRAINER_TENSORS] = _write(tmp / TRAINER_TENSORS, lambda p: save_file(trainer_tensors, str(p)))
        files[TRAINER_JSON] = _write(tmp / TRAINER_JSON, lambda p: p.write_text(json.dumps(plain) + "\n"))
    _write(tmp / MANIFEST, lambda p: p.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n"))
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # left only if both it and final are damaged (_recover)
        final.rename(old)
        _fsync(final.parent)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _load_safetensors(path: Path, final: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CorruptCheckpoint(f"cannot read {path}: {exc}{_other(final)}") from exc


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """The trainable tensors of the checkpoint at ``directory``."""
    return _load_safetensors(resolve(directory) / TENSORS, Path(directory))


def config_path(directory: str | Path) -> Path:
    """The ``config.json`` of the checkpoint at ``directory`` (checked against its manifest)."""
    return resolve(directory) / CONFIG


def load_trainer_state(directory: str | Path) -> dict:
    """The trainer state saved with the checkpoint at ``directory`` (tensors from safetensors, the rest JSON)."""
    found = resolve(directory)
    if not (found / TRAINER_JSON).is_file():
        raise FileNotFoundError(f"{found / TRAINER_JSON} is missing: this checkpoint holds a prompt only, "
                                f"it cannot resume training")
    tensors = _load_safetensors(found / TRAINER_TENSORS, Path(directory))
    try:
        return decode(json.loads((found / TRAINER_JSON).read_text()), tensors)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"cannot read {found / TRAINER_JSON}: {exc}{_other(Path(directory))}") from exc


def encode(value, tensors: dict[str, torch.Tensor] | None = None, path: str = "state"):
    """(JSON-able data, tensors): ``value`` (dicts, lists, tuples, tensors, numbers, strings, None) with every
    tensor moved out into ``tensors`` and referenced by key. Dict keys that are not strings and tuples are tagged
    so that ``decode`` restores them exactly (optimizer states are keyed by int)."""
    tensors = {} if tensors is None else tensors
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}, tensors
    if isinstance(value, dict):
        items = [[k, encode(v, tensors, f"{path}[{k!r}]")[0]] for k, v in value.items()]
        for k, _ in items:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{path} has a key {k!r} of type {type(k).__name__}: only str and int keys are saved")
        return {"dict": items}, tensors
    if isinstance(value, (list, tuple)):
        encoded = [encode(v, tensors, f"{path}[{i}]")[0] for i, v in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": encoded}, tensors
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}, tensors
    raise TypeError(f"{path} is a {type(value).__name__}: a checkpoint saves tensors, numbers, strings, None, "
                    f"lists, tuples and dicts only")


def decode(data, tensors: dict[str, torch.Tensor]):
    """The value ``encode`` turned into ``data`` and ``tensors``; anything else is rejected, nothing is executed."""
    if not isinstance(data, dict) or len(data) != 1:
        raise CorruptCheckpoint(f"unexpected entry {str(data)[:80]!r} in the trainer state")
    (kind, payload), = data.items()
    if kind == "tensor" and payload in tensors:
        return tensors[payload]
    if kind == "dict" and isinstance(payload, list) and all(
            isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int)) for item in payload):
        return {k: decode(v, tensors) for k, v in payload}
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [decode(v, tensors) for v in payload]
        return tuple(items) if kind == "tuple" else items
    if kind == "value" and (payload is None or isinstance(payload, (bool, int, float, str))):
        return payload
    raise CorruptCheckpoint(f"unexpected entry {str(data)[:80]!r} in the trainer state")
