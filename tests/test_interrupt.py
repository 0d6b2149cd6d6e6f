"""Interruptions lose nothing: SIGINT/SIGTERM mid-epoch, during validation and during a checkpoint write, and an
exception, each save a run that resumes bit for bit; the user gets one line and an exit code; output for logs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from test_train import TINY_CLIP, tiny
from vpfast.train import checkpoint
from vpfast.train import progress as progress_output
from vpfast.train.loop import TrainingInterrupted, train
from vpfast.train.resume import resume_config

pytestmark = pytest.mark.cpu


def _outcome(run) -> dict:
    """Everything a finished run leaves that must not depend on interruptions (not the throughput)."""
    results = json.loads((run / "results.json").read_text())
    results.pop("train_images_per_s")
    return {"last": checkpoint.load_tensors(run / "last"), "best": checkpoint.load_tensors(run / "best"),
            "metrics": (run / "metrics.jsonl").read_text(), "results": results}


def _assert_same(a: dict, b: dict) -> None:
    for name in ("last", "best"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert a["metrics"] == b["metrics"]
    assert a["results"] == b["results"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(out), progress=False)
    return _outcome(out)


def _signal_at(point: str, signum: int, monkeypatch):
    """A hook (and, for a checkpoint write, a patched save) that sends ``signum`` to this process at ``point``."""
    seen = {"validation": 0}

    def hook(event, state):
        if (point, event) == ("after-training", "trained") or \
                (point == "mid-epoch" and event == "step" and state["step"] == 3):
            os.kill(os.getpid(), signum)
        if point == "validation" and event == "validation" and state["epoch"] == 1:
            seen["validation"] += 1
            if seen["validation"] == 2:
                os.kill(os.getpid(), signum)

    if point == "checkpoint-write":
        real_write = checkpoint._write
        calls = []

        def write_and_signal(path, writer):
            if path.parent.name == "last.tmp":
                calls.append(path)
                if len(calls) == 2:  # between two files of the first save of last/
                    os.kill(os.getpid(), signum)
            return real_write(path, writer)

        monkeypatch.setattr(checkpoint, "_write", write_and_signal)
    return hook


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point,where", [
    ("mid-epoch", r"at epoch 1/2, step 3/4"),
    ("validation", r"during the validation after epoch 1/2 \(redone on resume\)"),
    ("checkpoint-write", r"at epoch 2/2, step 1/4"),
    ("after-training", r"after the last epoch \(2\), before the test evaluation \(done on resume\)"),
])
def test_a_signal_saves_and_the_resumed_run_equals_an_uninterrupted_one(straight, tmp_path, monkeypatch, signum,
                                                                       point, where):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        hook = _signal_at(point, signum, m)
        with pytest.raises(TrainingInterrupted) as caught:
            train(tiny(out), progress=False, hook=hook)
    assert caught.value.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(rf"vpfast: {signal.Signals(signum).name}: training stopped {where}; saved {out}/last; "
                        rf"continue with: vpfast train --resume --out {out}", message), message
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    assert not (out / "results.json").exists()
    train(resume_config(out, {}), resume=True, progress=False)
    _assert_same(_outcome(out), straight)


def test_an_exception_saves_last_and_the_resumed_run_equals_an_uninterrupted_one(straight, tmp_path):
    out = tmp_path / "run"

    def corrupt_image_at_step_3(event, state):
        if event == "step" and state["step"] == 3:
            raise OSError("image file is truncated")

    with pytest.raises(OSError, match="image file is truncated"):
        train(tiny(out), progress=False, hook=corrupt_image_at_step_3)
    assert checkpoint.load_trainer_state(out / "last")["state"]["step"] == 3
    train(resume_config(out, {}), resume=True, progress=False)
    _assert_same(_outcome(out), straight)


def _wait_for_a_logged_step(metrics, process, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and '"loss"' in metrics.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"no training step logged: {process.communicate()}")


def test_sigterm_from_outside_saves_and_exits_with_one_line(tmp_path):
    """A real SIGTERM from another process, as a batch scheduler sends it."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        from vpfast.train.config import TrainConfig
        from vpfast.train.loop import TrainingInterrupted, train
        cfg = TrainConfig(model="open_clip:ViT-B-32", pretrained=None, model_cfg={TINY_CLIP!r}, data="digits",
                          epochs=1000, batch_size=16, train_limit=64, num_workers=0, device="cpu", out={str(out)!r})
        try:
            train(cfg, progress=False)
        except TrainingInterrupted as exc:
            print(exc, file=sys.stderr)
            sys.exit(exc.exit_code)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for_a_logged_step(out / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    state = checkpoint.load_trainer_state(out / "last")["state"]
    where = (rf"during the validation after epoch {state['epoch']}/1000 \(redone on resume\)" if state["validate"]
             else rf"at epoch {state['epoch'] + 1}/1000, step {state['step_in_epoch']}/4")
    assert re.fullmatch(rf"vpfast: SIGTERM: training stopped {where}; saved {out}/last; "
                        rf"continue with: vpfast train --resume --out {out}", stderr.strip().splitlines()[-1]), stderr


def test_cli_sigint_prints_one_line_and_exits_130(tmp_path):
    """Needs vpfast/cli.py to catch TrainingInterrupted (print str(exc), return exc.exit_code)."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "vpfast", "train", "--device", "cpu", "--pretrained", "none", "--model-cfg",
         json.dumps(TINY_CLIP), "--data", "digits", "--epochs", "1000", "--batch-size", "16", "--train-limit", "64",
         "--num-workers", "0", "--log-every", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for_a_logged_step(out / "metrics.jsonl", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.search(rf"^vpfast: SIGINT: training stopped .*; saved {out}/last; continue with: vpfast train "
                     rf"--resume --out {out}$", stderr, re.M), stderr


def test_output_that_is_not_a_terminal_gets_plain_lines_and_the_validation_accuracy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress_output, "PLAIN_EVERY_S", 0.0)
    train(tiny(tmp_path / "run", log_every=2), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    steps = [f"evp epoch {e}/2: step {s}/4" + ("" if s == 1 else r", loss \d+\.\d{4}") for e in (1, 2)
             for s in (1, 2, 3, 4)]
    validation = r"evp epoch {}/2: validation accuracy \d\.\d{{4}} \(best \d\.\d{{4}}\)"
    expected = [*steps[:4], validation.format(1), *steps[4:], validation.format(2)]
    assert len(lines) == len(expected), err
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)


def test_a_terminal_gets_a_bar_and_the_validation_accuracy(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress_output, "on_terminal", lambda: True)
    train(tiny(tmp_path / "run", epochs=1), progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "evp epoch 1/1:" in err
    assert re.search(r"(^|\r)evp epoch 1/1: validation accuracy \d\.\d{4} \(best \d\.\d{4}\)$", err, re.M)


def test_last_is_also_saved_on_a_timer_so_a_kill_loses_little(tmp_path, monkeypatch):
    from vpfast.train import loop

    seen = {}

    def record(event, state):
        if event == "step" and state["step"] == 2:
            seen["default"] = (tmp_path / "run" / "last").exists()

    train(tiny(tmp_path / "run", max_steps=3), progress=False, hook=record)
    monkeypatch.setattr(loop, "CHECKPOINT_EVERY_S", 0.0)

    def saved_step(event, state):
        if event == "step":
            last = checkpoint.load_trainer_state(tmp_path / "timed" / "last")
            seen.setdefault("timer", []).append(last["state"]["step"])

    train(tiny(tmp_path / "timed", max_steps=3), progress=False, hook=saved_step)
    assert seen == {"default": False, "timer": [1, 2]}
