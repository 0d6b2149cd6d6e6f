"""--resume: the saved config is the run's; a differing flag is an error naming it and changes nothing on disk;
--epochs extends a run on a defined schedule; hostile run files execute nothing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from test_checkpoint import Payload, _rewrite_manifest
from test_train import TINY_CLIP, tiny
from vpfast.train import checkpoint
from vpfast.train.loop import evaluate_checkpoint, train
from vpfast.train.resume import SAFE_OVERRIDES, resume_config

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch tiny EVP run (copy it before changing it) and its results."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, train(tiny(out), progress=False)


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(run) -> dict:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


def test_resume_with_no_flags_takes_the_saved_config_and_continues(tmp_path):
    straight = train(tiny(tmp_path / "a"), progress=False)
    train(tiny(tmp_path / "b", max_steps=3), progress=False)
    cfg = resume_config(tmp_path / "b", {})
    expected = dataclasses.replace(tiny(tmp_path / "b").resolved(), out=str(tmp_path / "b"))
    assert cfg == expected  # the saved config (max_steps stops only the invocation that set it)
    resumed = train(cfg, resume=True, progress=False)
    assert {k: v for k, v in resumed.items() if k != "train_images_per_s"} == \
        {k: v for k, v in straight.items() if k != "train_images_per_s"}
    assert torch.equal(checkpoint.load_tensors(tmp_path / "a" / "last")["prompter.prompt"],
                       checkpoint.load_tensors(tmp_path / "b" / "last")["prompter.prompt"])


@pytest.mark.parametrize("given,message", [
    ({"lr": 5.0}, r"--lr differs from the run being resumed: .* was trained with 70.0, --resume was given 5.0"),
    ({"method": "pad"}, r"--method differs .* trained with 'evp', --resume was given 'pad'"),
    ({"batch_size": 8}, r"--batch-size differs .* trained with 16, --resume was given 8.* only --epochs, "),
    ({"epochs": 1}, r"--epochs 1 is fewer than the 2 epoch\(s\) .* has already trained"),
    ({"colour": "red"}, r"unknown setting\(s\) colour"),
])
def test_a_flag_that_differs_is_refused_and_nothing_in_the_run_changes(finished, tmp_path, given, message):
    run = _copy(finished[0], tmp_path)
    before = _snapshot(run)
    with pytest.raises(ValueError, match=message):
        resume_config(run, given)
    if "colour" not in given:  # the same check from Python: train(cfg, resume=True)
        cfg = dataclasses.replace(tiny(run), **given)
        with pytest.raises(ValueError, match=message):
            train(cfg, resume=True, progress=False)
    assert _snapshot(run) == before


def test_the_same_values_and_safe_overrides_are_accepted(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    cfg = resume_config(run, {"lr": 70, "method": "evp", "log_every": 3, "num_workers": 1, "device": "cpu"})
    assert (cfg.lr, cfg.log_every, cfg.num_workers) == (70.0, 3, 1)
    assert {"epochs", "log_every", "num_workers", "checkpoint_every", "device"} <= set(SAFE_OVERRIDES)


def test_epochs_extends_a_finished_run_on_the_longer_schedule(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path)
    results = train(resume_config(run, {"epochs": 3}), resume=True)
    assert results["epochs"] == 3 and results["steps"] == 12
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    extension = [r for r in records if "epochs_to" in r]
    # epoch 3 of a 3-epoch cosine from lr 70: 70 / 2 * (1 + cos(2 pi / 3)) = 17.5, not the 0 of the old schedule
    assert extension == [{"step": 8, "epoch": 2, "epochs_from": 2, "epochs_to": 3, "lr": pytest.approx(17.5)}]
    third = [r["lr"] for r in records if "loss" in r and r["epoch"] == 2]
    assert len(third) == 4 and all(math.isclose(lr, 17.5, rel_tol=1e-12) for lr in third)
    assert "--epochs 2 -> 3: the schedule is now the one of a 3-epoch run, continuing at epoch 3 with lr 17.5" \
        in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


def _plant_hostile_config(checkpoint_dir, marker, **changes) -> None:
    """A config.json that asks open_clip to unpickle a file of the run directory (and a matching manifest)."""
    payload = checkpoint_dir.parent / "weights.pt"
    torch.save(Payload(marker), payload)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    config.update(pretrained=str(payload), **changes)
    (checkpoint_dir / "config.json").write_text(json.dumps(config))
    _rewrite_manifest(checkpoint_dir)


@pytest.mark.parametrize("changes", [{"model_cfg": {**TINY_CLIP, "weights_only": False}}, {}],
                         ids=["weights_only-false", "pretrained-pickle"])
@pytest.mark.parametrize("where", ["resume", "eval"])
def test_a_hostile_run_config_executes_nothing(finished, tmp_path, changes, where):
    run = _copy(finished[0], tmp_path)
    marker = tmp_path / "pwned"
    _plant_hostile_config(run / ("last" if where == "resume" else "best"), marker, **changes)
    with pytest.raises(Exception, match="model_cfg may only change|unknown|Weights only load failed|weights_only"):
        if where == "resume":
            train(resume_config(run, {}), resume=True, progress=False)
        else:
            evaluate_checkpoint(run, progress=False)
    assert not marker.exists()


def test_eval_of_a_run_directory_uses_its_best_checkpoint(finished):
    run, results = finished
    evaluated = evaluate_checkpoint(run, progress=False)
    assert evaluated["checkpoint"] == str(run / "best") and evaluated["test_acc"] == results["test_acc"]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpfast", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_resume_takes_the_saved_config_and_refuses_a_changed_flag(finished, tmp_path):
    """Needs vpfast/cli.py to build the config with resume_config(args.out, <the flags typed>)."""
    train(tiny(tmp_path / "run", max_steps=3), progress=False)
    refused = _cli("train", "--resume", "--out", str(tmp_path / "run"), "--lr", "5")
    assert refused.returncode == 2
    assert re.search(r"--lr differs from the run being resumed: .* was trained with 70.0, --resume was given 5.0",
                     refused.stderr), refused.stderr
    done = _cli("train", "--resume", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test_acc"] == finished[1]["test_acc"] and results["steps"] == finished[1]["steps"]


def test_eval_never_downloads_what_a_run_config_asks_for(finished, tmp_path):
    run = _copy(finished[0], tmp_path)
    config = json.loads((run / "best" / "config.json").read_text())
    config.update(data="torchvision:MNIST", download=True, data_root=str(tmp_path / "written-here"))
    (run / "best" / "config.json").write_text(json.dumps(config))
    _rewrite_manifest(run / "best")
    with pytest.raises(Exception, match="(?i)not found|download"):
        evaluate_checkpoint(run, progress=False)
    assert not any((tmp_path / "written-here").rglob("*"))
