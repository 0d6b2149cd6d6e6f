"""The speed settings of ``vpfast train``: precision, compile, CUDA graphs, where the data lives.

Each is "auto" by default and resolved against the training device: on CUDA, bf16 weights (and bf16
canvases out of the pixel prompters), a compiled backbone (pixel methods) or prompted forward (token and
adapter methods), the step captured in CUDA graphs where the
method allows it and the data on the GPU when it fits; on the CPU, float32 eager (the demo and quick
start stay as they were).
"""

from __future__ import annotations

import torch

from vpfast.train import data

PRECISIONS = ("auto", "fp32", "bf16")
SWITCHES = ("auto", "on", "off")


def precision(cfg, device: torch.device) -> str:
    """The backbone's precision: "auto" is bf16 on CUDA, fp32 elsewhere."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


COMPILE_BACKEND: bool | str = True  # what --compile passes as ``compile=``: True is inductor (tests use "aot_eager")


def compile_target(cfg, device: torch.device, kind: str) -> str:
    """What ``--compile`` compiles ("auto": on with CUDA only), for a method of ``kind`` (vpfast/methods.py).

    "backbone" for pixel methods: the frozen backbone (their prompters draw random values from a generator on
    the host, so compose runs eagerly in front of it). "prompted forward" for token and adapter methods: the
    normalization, the prompt generator or adapter and the backbone with its hooks, traced as one graph
    (no graph break: tests/test_train_fast.py traces PGN, ProVP, VPT and Pro-tuning on a tiny open_clip ViT and
    Pro-tuning on timm's EfficientNet-Lite0 and torchvision's ResNet-18). "off" otherwise.
    """
    if not (cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")):
        return "off"
    return "backbone" if kind == "pixel" else "prompted forward"


def cuda_graph(cfg) -> bool | None:
    """``--cuda-graph``: True (required), False (off) or None (where supported)."""
    return {"on": True, "off": False, "auto": None}[cfg.cuda_graph]


def decode_size(cfg) -> int:
    """The side image files are decoded to: the prompter's inner image (EVP: 164 of a 224 canvas), else the
    canvas; 224 when the canvas is the backbone's default size."""
    canvas = cfg.image_size or 224
    if cfg.method != "evp":
        return canvas
    return canvas - 2 * (cfg.pad or max(1, round(30 * canvas / 224)))


def report(model, train_set, step_path: str, not_graphed: str | None) -> dict:
    """The path a run takes, as written to metrics.jsonl and results.json."""
    return {"precision": model.backbone.precision, "compile": model.compiled, "train_step": step_path,
            "train_step_not_graphed": not_graphed, "data_device": data.stored_on(train_set)}
