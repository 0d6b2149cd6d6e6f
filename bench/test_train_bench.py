"""What users feel: images/s of the real ``vpfast train`` loop next to the pipelines they could write, per method.

Synthetic CIFAR-shaped data (50,000 x 3 x 32 x 32 uint8, 100 classes), open_clip ViT-B/32 with random
weights, batch 256, for EVP, PGN and ProVP. Pipelines, timed in the same run:

- ``released`` (EVP only): the released EVP pattern (``test_evp_step_bench.released_step``);
- ``eager``: clean eager PyTorch with everything on the device, bf16 autocast on float32 weights (EVP: the
  compose reference, as the step bench; PGN and ProVP: vpfast's modules, uncompiled, uncaptured);
- ``vpfast_train``: the real loop (``vpfast.train.loop.train`` with its defaults for the device), fed the
  synthetic set; steps WARM .. WARM + TIMED are timed between two synchronizations, so compiling, warm-up
  and capture are left out;
- ``floor`` (method "none"): the frozen backbone alone, bf16 weights, compiled, forward + input-gradient
  backward on pre-composed bf16 canvases already on the device: the limit of any prompting library there.

``tflops`` is the step's FLOPs (``torch.utils.flop_counter`` on one eager step) over its median time.
Rows go to ``bench/results/train-<device>.json``. Without CUDA: tiny model, tiny data, each case once.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

import vpfast
from harness import flops, interleaved_step_times, on_gpu, sync
from test_evp_step_bench import _mask, eager_step, released_step
from vpfast.backbones import from_open_clip
from vpfast.backbones.zero_shot import class_text_embeddings
from vpfast.train import data, loop
from vpfast.train.build import (
    PromptedClassifier,
    build_adapter,
    build_backbone,
    build_optimizer,
    build_prompter,
    build_tokens,
)
from vpfast.train.config import TrainConfig
from vpfast.train.step import TrainStep

if on_gpu():
    DEVICE, BATCH, N_TRAIN, SIZE, PAD, MODEL_CFG, WARM, TIMED, STEPS = "cuda", 256, 50_000, 224, 30, None, 20, 50, 20
else:
    DEVICE, BATCH, N_TRAIN, SIZE, PAD, WARM, TIMED, STEPS = "cpu", 4, 24, 32, 4, 1, 2, 1
    MODEL_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CLASSES = [f"class {i}" for i in range(100)]
METHODS = {"evp": {}, "pgn": {}, "provp": {}}
TEMPLATE = "this is a photo of a {}"


@pytest.fixture(scope="module")
def cifar_shaped() -> data.TensorImages:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_TRAIN, 3, 32, 32), generator=g, dtype=torch.uint8)
    return data.TensorImages(images, torch.randint(0, len(CLASSES), (N_TRAIN,), generator=g), CLASSES)


def _config(method: str, out, **changes) -> TrainConfig:
    return TrainConfig(method=method, model="open_clip:ViT-B-32", pretrained=None, model_cfg=MODEL_CFG,
                       image_size=SIZE, pad=PAD, epochs=1, batch_size=BATCH, num_workers=0, log_every=10,
                       max_steps=WARM + TIMED + 1, device=DEVICE, out=str(out), **METHODS[method], **changes)


class _Timed:
    """The loop's step, with a synchronization and a clock read before step WARM and step WARM + TIMED."""

    def __init__(self, step, timing: dict) -> None:
        self.step, self.timing, self.calls = step, timing, 0

    def __call__(self, images, labels, *args) -> None:
        if self.calls in (WARM, WARM + TIMED):
            sync()
            self.timing[self.calls] = time.perf_counter()
        self.calls += 1
        self.step(images, labels, *args)


def run_loop(method: str, dataset: data.TensorImages, tmp_path, monkeypatch) -> dict:
    """The real loop on ``dataset``: seconds per timed step, peak memory and the path it took."""
    small = dataset.subset(torch.arange(min(len(dataset), 2 * BATCH)))
    monkeypatch.setattr(loop, "load_datasets", lambda cfg, size: (dataset, small, small, CLASSES))
    timing: dict = {}
    make_step = loop.make_step
    monkeypatch.setattr(loop, "make_step", lambda *args: (lambda step, path: (_Timed(step, timing), path))(
        *make_step(*args)))
    if on_gpu():
        torch.cuda.reset_peak_memory_stats()
    loop.train(_config(method, tmp_path / method), progress=False)
    setup = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[0])
    return {"seconds": (timing[WARM + TIMED] - timing[WARM]) / TIMED,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu() else None,
            "path": {k: setup[k] for k in ("precision", "compile", "train_step", "data_device")}}


def _batches(dataset: data.TensorImages):
    """An endless cycle of device batches (the data already on the device, as the loop keeps it)."""
    images, labels = dataset.images[:4 * BATCH].to(DEVICE), dataset.labels[:4 * BATCH].to(DEVICE)
    index = 0
    while True:
        yield images[index:index + BATCH], labels[index:index + BATCH]
        index = (index + BATCH) % (3 * BATCH)


def eager_modules(method: str, dataset: data.TensorImages, tmp_path):
    """PGN/ProVP in clean eager: vpfast's modules, float32 weights under bf16 autocast, no compile or graph."""
    cfg = _config(method, tmp_path, precision="fp32", compile="off", cuda_graph="off").resolved()
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg, CLASSES, torch.device(DEVICE))
    backbone.autocast_dtype = torch.bfloat16 if on_gpu() else None  # float32 weights under bf16 autocast
    model = PromptedClassifier(build_prompter(cfg, backbone), backbone, None, build_tokens(cfg, backbone),
                               build_adapter(cfg, backbone)).to(DEVICE)
    optimizer, _ = build_optimizer(cfg, model, cfg.epochs)
    model.train()

    def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        value = F.cross_entropy(model(images), labels)
        extra = model.auxiliary_loss()  # computed in the forward
        return value if extra is None else value + extra

    step = TrainStep(loss, optimizer, torch.device(DEVICE))
    batches = _batches(dataset)
    return lambda: step(*next(batches))


def evp_eager(dataset: data.TensorImages, clip, released: bool = False):
    """EVP as the step bench writes it: the released pattern (host data) or clean eager on the device."""
    model, tokenizer = clip
    prompt = torch.zeros(3, SIZE, SIZE) if released else torch.zeros(3, SIZE, SIZE, device=DEVICE,
                                                                     requires_grad=True)
    if released:
        images, labels = dataset.images[:BATCH], dataset.labels[:BATCH].to(DEVICE)
        return lambda: released_step(model, tokenizer, prompt, images, labels)
    text = class_text_embeddings(model.encode_text, tokenizer, CLASSES, (TEMPLATE,), DEVICE).float()
    mean, std = torch.tensor(vpfast.CLIP_MEAN, device=DEVICE), torch.tensor(vpfast.CLIP_STD, device=DEVICE)
    mask, batches = _mask().to(DEVICE), _batches(dataset)
    return lambda: eager_step(model, text, prompt, mask, mean, std, *next(batches))


def floor(compile: bool):
    """Forward + input-gradient backward of the bf16 frozen backbone on pre-composed canvases."""
    torch.manual_seed(0)
    backbone = from_open_clip("ViT-B-32", None, classnames=CLASSES, model_cfg=MODEL_CFG, device=DEVICE,
                              precision="bf16", compile=compile)
    canvas = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, len(CLASSES), (BATCH,), device=DEVICE)

    def step() -> None:
        canvas.grad = None
        F.cross_entropy(backbone(canvas), labels).backward()

    return step


@pytest.fixture(scope="module")
def clip():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None, device=DEVICE, **(MODEL_CFG or {})).eval()
    model.requires_grad_(False)
    return model, open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)


def _row(record, pipeline: str, method: str, measured: dict, step_flops: int, **extra) -> None:
    seconds = measured["seconds"]
    record("train", {"pipeline": pipeline, "method": method, "batch": BATCH, "images_per_s": BATCH / seconds,
                     "step_ms": 1e3 * seconds, "peak_memory_gib": measured["peak_memory_gib"],
                     "tflops": step_flops / seconds / 1e12, **extra})


@pytest.mark.parametrize("method", METHODS)
def test_train_loop(method, benchmark, record, cifar_shaped, clip, tmp_path, monkeypatch):
    pipelines = {"eager": evp_eager(cifar_shaped, clip) if method == "evp" else
                 eager_modules(method, cifar_shaped, tmp_path)}
    if method == "evp":
        pipelines["released"] = evp_eager(cifar_shaped, clip, released=True)
    step_flops = {name: flops(run) for name, run in pipelines.items()}
    for name, measured in interleaved_step_times(pipelines, STEPS).items():
        _row(record, name, method, measured, step_flops[name], repeats_ms=measured["repeats_ms"])
    measured = run_loop(method, cifar_shaped, tmp_path, monkeypatch)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _row(record, "vpfast_train", method, measured, step_flops["eager"], **measured["path"])


def test_floor(benchmark, record):
    step_flops = flops(floor(compile=False))
    measured = interleaved_step_times({"floor": floor(compile=on_gpu())}, STEPS)["floor"]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _row(record, "floor", "none", measured, step_flops, repeats_ms=measured["repeats_ms"])
