"""A small ViT pretrained here on a packaged source task, for the demos of token-prompting methods.

No ViT weights ship in a pip package, and prompting a random-weight ViT shows nothing. This trains a
4-block timm ViT (patch 4 on 32 px, width 48 = 3 x 4^2, so its patch embedding is invertible as
ViT-B/16's is; 0.12 M parameters) on scikit-learn's 1,437 training digits (8 x 8 scans, upsampled),
once, and caches it as a timm local directory (``config.json`` + ``model.safetensors``) under
``$VPFAST_CACHE`` or ``~/.cache/vpfast``:
``timm.create_model("local-dir:<dir>", pretrained=True)`` or ``vpfast train --model
timm:local-dir:<dir> --pretrained true`` load it. The demo then adapts it to another domain, MNIST
(other writers, 28 x 28 scans).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ARCHITECTURE = "vit_tiny_patch16_224"
MODEL_ARGS = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
RECIPE = dict(source="digits", epochs=15, batch_size=64, lr=3e-3, weight_decay=0.05, seed=0)
VERSION = 2  # part of the cache directory's name: bump it when MODEL_ARGS or RECIPE change


def cache_root() -> Path:
    """``$VPFAST_CACHE``, else ``$XDG_CACHE_HOME/vpfast``, else ``~/.cache/vpfast``."""
    if os.environ.get("VPFAST_CACHE"):
        return Path(os.environ["VPFAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vpfast"


def _accuracy(model: torch.nn.Module, normalize: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(normalize(chunk)).argmax(1) for chunk in images.split(512)])
    return (predictions == labels).float().mean().item()


def train_source_vit(directory: Path, progress: bool = True) -> dict:
    """Train the source ViT on packaged MNIST and save it to ``directory``; returns its record."""
    import timm
    from timm.models import save_for_hf

    from vpfast.train.build import Normalizer
    from vpfast.train.data import epoch_batches, load_packaged

    torch.manual_seed(RECIPE["seed"])
    train, test = load_packaged(RECIPE["source"], seed=RECIPE["seed"])
    model = timm.create_model(ARCHITECTURE, pretrained=False, **MODEL_ARGS)
    normalize = Normalizer(MODEL_ARGS["img_size"], mean=(0.5,) * 3, std=(0.5,) * 3)  # timm's ViT mean and std
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    steps = RECIPE["epochs"] * -(-len(train) // RECIPE["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, RECIPE["lr"], total_steps=steps, pct_start=0.15)
    started = time.perf_counter()
    bar = tqdm(total=steps, desc=f"pretraining the source ViT on {RECIPE['source']} (once)", disable=not progress)
    for epoch in range(RECIPE["epochs"]):
        model.train()
        for batch in epoch_batches(len(train), RECIPE["batch_size"], RECIPE["seed"], epoch):
            loss = F.cross_entropy(model(normalize(train.images[batch])), train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    record = {"architecture": ARCHITECTURE, "model_args": MODEL_ARGS, "recipe": RECIPE,
              "train_images": len(train), "test_acc": _accuracy(model, normalize, test.images, test.labels),
              "seconds": time.perf_counter() - started, "version": VERSION}
    save_for_hf(model.eval(), directory, model_args=MODEL_ARGS, safe_serialization=True)
    (directory / "source.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def source_vit(progress: bool = True) -> Path:
    """The cached source ViT's directory, training it first if it is not there (written atomically)."""
    target = cache_root() / f"source-vit-{RECIPE['source']}-v{VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".source-vit-", dir=target.parent))
    try:
        train_source_vit(staging, progress)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
