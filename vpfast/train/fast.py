"""The speed settings of ``vpfast train``: precision, compile, CUDA graphs, where the data lives.

Each is "auto" by default and resolved against the training device: on CUDA, bf16 weights (and bf16
canvases out of the pixel prompters), a compiled backbone, the step captured in CUDA graphs where the
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


def compile_backbone(cfg, device: torch.device, whole_backbone: bool) -> bool:
    """Whether the frozen backbone is compiled: "auto" is on with CUDA only. Only for methods that call the
    whole backbone (``whole_backbone``: EVP, pad, patch): token and adapter methods insert hooks and blocks
    into it per call, which would recompile the compiled forward every step."""
    return whole_backbone and (cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"))


def cuda_graph(cfg) -> bool | None:
    """``--cuda-graph``: True (required), False (off) or None (where supported)."""
    return {"on": True, "off": False, "auto": None}[cfg.cuda_graph]


def host_inputs(cfg) -> bool:
    """Whether the method draws per-step values on the host (input diversity, random patch locations)."""
    return cfg.diversity > 0 or cfg.method == "patch"


def decode_size(cfg) -> int:
    """The side image files are decoded to: the prompter's inner image (EVP: 164 of a 224 canvas), else the
    canvas; 224 when the canvas is the backbone's default size."""
    canvas = cfg.image_size or 224
    if cfg.method != "evp":
        return canvas
    return canvas - 2 * (cfg.pad or max(1, round(30 * canvas / 224)))


def report(model, train_set, step_path: str, not_graphed: str | None) -> dict:
    """The path a run takes, as written to metrics.jsonl and results.json."""
    backbone = model.backbone
    return {"precision": backbone.precision, "compile": bool(backbone.compile), "train_step": step_path,
            "train_step_not_graphed": not_graphed, "data_device": data.stored_on(train_set)}
