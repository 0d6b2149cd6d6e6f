"""Checkpoints: trainer state without pickle, crash safety in every window of a save, clear errors on damage."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from vpfast.train import checkpoint
from vpfast.train.config import TrainConfig

pytestmark = pytest.mark.cpu


class Payload:
    """Unpickling this creates ``path``: the proof that a loader executed code from a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def _optimizer_states() -> dict:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    states = {}
    for name, optimizer in (("sgd", torch.optim.SGD([a, b], lr=0.1, momentum=0.9)),
                            ("adam", torch.optim.Adam([a, b], lr=1e-3, betas=(0.8, 0.95)))):
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7)
        for _ in range(2):
            (a.square().sum() + b.sum()).backward()
            optimizer.step()
            schedule.step()
        states[name] = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    return states


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and list(x) == list(y) and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_same, x, y))
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    return type(x) is type(y) and x == y


def _save(directory: Path, value: float, trainer_state: dict | None = None) -> Path:
    return checkpoint.save(directory, {"prompter.prompt": torch.full((2, 3), value)}, TrainConfig(lr=value),
                           trainer_state)


def test_trainer_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    state = {**_optimizer_states(), "state": {"epoch": 3, "best_val": -1.0, "validate": True, "note": None,
                                              "odd": [float("inf"), float("nan"), (1, "x")], 7: "int key"},
             "rng": torch.get_rng_state()}
    _save(tmp_path / "last", 1.0, state)
    loaded = checkpoint.load_trainer_state(tmp_path / "last")
    assert _same(state, loaded)
    assert isinstance(loaded["adam"]["optimizer"]["param_groups"][0]["betas"], tuple)
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == [
        "config.json", "manifest.json", "prompt.safetensors", "trainer.json", "trainer.safetensors"]


def test_an_unsupported_trainer_state_value_is_refused_on_save(tmp_path):
    with pytest.raises(TypeError, match=r"state\['bad'\] is a Payload: a checkpoint saves tensors"):
        _save(tmp_path / "last", 1.0, {"bad": Payload(tmp_path / "x")})


def _rewrite_manifest(directory: Path) -> None:
    """What an attacker can do: make the manifest match planted files."""
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["trainer.pt", "trainer.safetensors", "trainer.json"])
def test_a_pickle_planted_in_the_trainer_state_is_never_executed(tmp_path, target):
    _save(tmp_path / "last", 1.0, {"state": {"epoch": 0}})
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "last" / target)  # a pickle, as trainer.pt used to be
    _rewrite_manifest(tmp_path / "last")
    if target == "trainer.pt":  # the old file name is not read at all
        assert checkpoint.load_trainer_state(tmp_path / "last") == {"state": {"epoch": 0}}
    else:
        with pytest.raises(checkpoint.CorruptCheckpoint, match=f"cannot read .*last/{target}"):
            checkpoint.load_trainer_state(tmp_path / "last")
    assert not marker.exists()


def _value(directory: Path) -> float:
    return float(checkpoint.load_tensors(directory)["prompter.prompt"][0, 0])


class Crash(Exception):
    pass


def _crash_at(monkeypatch, point: int) -> list[int]:
    """Make the ``point``-th file-system step of a save (fsync, rename, rmtree) raise, as a power cut would."""
    count = [0]

    def step(real):
        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == point:
                raise Crash(point)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(checkpoint.os, "fsync", step(os.fsync))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", step(shutil.rmtree))
    monkeypatch.setattr(Path, "rename", step(Path.rename))
    return count


def _steps_of_a_save(tmp_path, monkeypatch) -> int:
    _save(tmp_path / "probe" / "last", 0.0)
    with monkeypatch.context() as m:
        count = _crash_at(m, -1)
        _save(tmp_path / "probe" / "last", 1.0)
    return count[0]


def test_a_crash_in_any_window_of_two_saves_in_a_row_keeps_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    steps = _steps_of_a_save(tmp_path, monkeypatch)
    assert steps >= 8
    for first in range(1, steps + 1):
        for second in range(1, steps + 1):
            run = tmp_path / f"run{first}-{second}" / "last"
            _save(run, 1.0)
            with monkeypatch.context() as m:
                _crash_at(m, first)
                with pytest.raises(Crash):
                    _save(run, 2.0)
            after_first = _value(run)
            assert after_first in (1.0, 2.0)
            with monkeypatch.context() as m:
                _crash_at(m, second)
                with pytest.raises(Crash):
                    _save(run, 3.0)
            assert _value(run) in (after_first, 3.0), (first, second)
            _save(run, 4.0)
            assert _value(run) == 4.0
            assert sorted(p.name for p in run.parent.iterdir()) == ["last"]


def test_a_complete_temporary_checkpoint_is_recovered(tmp_path):
    """The issue's case: a crash between the two renames leaves last.old and a complete last.tmp."""
    _save(tmp_path / "last", 1.0)
    _save(tmp_path / "staging", 2.0)
    (tmp_path / "last").rename(tmp_path / "last.old")
    (tmp_path / "staging").rename(tmp_path / "last.tmp")
    assert _value(tmp_path / "last") == 2.0
    _save(tmp_path / "last", 3.0)  # the next save must not throw the recovered one away before it is replaced
    assert _value(tmp_path / "last") == 3.0


def test_an_incomplete_temporary_checkpoint_is_ignored(tmp_path):
    _save(tmp_path / "last", 1.0)
    _save(tmp_path / "last.tmp", 2.0)
    (tmp_path / "last.tmp" / checkpoint.MANIFEST).unlink()
    assert _value(tmp_path / "last") == 1.0


@pytest.mark.parametrize("name", ["prompt.safetensors", "config.json", "trainer.safetensors", "manifest.json"])
def test_a_truncated_file_is_named_with_the_other_checkpoint_to_try(tmp_path, name):
    _save(tmp_path / "best", 0.5)
    _save(tmp_path / "last", 1.0, {"state": {"epoch": 1}})
    path = tmp_path / "last" / name
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(checkpoint.CorruptCheckpoint,
                       match=rf"cannot read the checkpoint .*last: .*last/{name} .*try the other checkpoint, .*best"):
        checkpoint.load_tensors(tmp_path / "last")


def test_a_damaged_checkpoint_with_an_intact_previous_one_warns_and_uses_it(tmp_path):
    _save(tmp_path / "last", 1.0)
    shutil.copytree(tmp_path / "last", tmp_path / "last.old")
    (tmp_path / "last" / "prompt.safetensors").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning, match=r"last/prompt.safetensors has 10 bytes.*using the previous checkpoint"):
        assert _value(tmp_path / "last") == 1.0


def test_missing_checkpoint_and_run_directory_locate(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nothing \(expected prompt.safetensors"):
        checkpoint.load_tensors(tmp_path / "nothing")
    _save(tmp_path / "run" / "best", 1.0)
    assert checkpoint.locate(tmp_path / "run") == tmp_path / "run" / "best"
    assert checkpoint.locate(tmp_path / "run" / "best") == tmp_path / "run" / "best"


@pytest.mark.parametrize("manifest", [
    {"format": "other", "files": {}},
    {"format": checkpoint.FORMAT, "files": {"prompt.safetensors": 5, "config.json": 5}},
    {"format": checkpoint.FORMAT, "files": {"prompt.safetensors": {}, "config.json": {}, "../outside": {}}},
    [1, 2],
], ids=["format", "entries", "traversal", "not-an-object"])
def test_a_malformed_manifest_is_a_clear_error(tmp_path, manifest):
    _save(tmp_path / "last", 1.0)
    (tmp_path / "last" / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"cannot read the checkpoint .*last: .*last/"):
        checkpoint.load_tensors(tmp_path / "last")


def test_a_checkpoint_of_the_old_pickle_format_is_named_and_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    _save(tmp_path / "last", 1.0)
    (tmp_path / "last" / checkpoint.MANIFEST).unlink()
    torch.save({"state": Payload(marker)}, tmp_path / "last" / "trainer.pt")
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"written by an older vpfast, whose trainer.pt is a pickle"):
        checkpoint.load_trainer_state(tmp_path / "last")
    assert not marker.exists()


def test_saving_over_a_damaged_checkpoint_and_a_damaged_previous_one_works(tmp_path):
    for name in ("last", "last.old"):
        _save(tmp_path / name, 1.0)
        (tmp_path / name / "prompt.safetensors").write_bytes(b"\0" * 10)
    _save(tmp_path / "last", 2.0)
    assert _value(tmp_path / "last") == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
