"""One EVP training step end to end, three ways: the released pipeline's pattern, clean eager, vpfast.

open_clip ViT-B-32 with random weights, B=256, bf16 autocast on a GPU (a tiny config, B=4, once, on
a CPU as a smoke test). (a) "released": the prompt lives on the CPU and is copied each step, float
images are zero-padded on the CPU and copied over, B materialized prompt copies with retain_grad,
text features re-encoded every step, the update computed on the CPU. (b) "eager": the same
semantics on the device in plain PyTorch (the compose reference, cached text features). (c)
"vpfast": EVPrompter + cached zero-shot head + NormalizedSGD. The images are 96 x 96, so every
pipeline resizes them to the 164 inner image. Each pipeline gets 3 warm-up steps (vpfast's include
compiling its kernels), then 5 rounds time STEPS steps of each pipeline in turn; the row is the
median round. Reports images/s, step time and peak memory.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vpfast
from harness import interleaved_step_times, on_gpu
from vpfast.backbones.zero_shot import class_text_embeddings
from vpfast.ops.compose import Layout, compose_reference

if on_gpu():
    DEVICE, BATCH, SIZE, PAD, MODEL_CFG, STEPS, NATIVE = "cuda", 256, 224, 30, None, 20, 96
else:
    DEVICE, BATCH, SIZE, PAD, STEPS, NATIVE = "cpu", 4, 32, 4, 1, 20
    MODEL_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
INNER = SIZE - 2 * PAD
CLASSES = [f"class {i}" for i in range(100)]
TEMPLATE = "this is a photo of a {}"
LR = 70.0


@pytest.fixture(scope="module")
def clip():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None, device=DEVICE, **(MODEL_CFG or {})).eval()
    model.requires_grad_(False)
    return model, open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)


def _autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=on_gpu())


def _mask() -> torch.Tensor:
    mask = torch.ones(SIZE, SIZE)
    mask[PAD:PAD + INNER, PAD:PAD + INNER] = 0
    return mask


def released_step(model, tokenizer, prompt_cpu, images_u8, labels):
    """The released EVP pattern (docs/methods.md, EVP)."""
    x = F.pad(F.interpolate(images_u8.float() / 255, size=(INNER, INNER), mode="bilinear"),
              (PAD, PAD, PAD, PAD)).to(DEVICE)
    prompts = prompt_cpu.to(DEVICE).repeat(x.shape[0], 1, 1, 1).requires_grad_(True)
    prompts.retain_grad()
    mean = torch.tensor(vpfast.CLIP_MEAN, device=DEVICE).view(1, 3, 1, 1)
    std = torch.tensor(vpfast.CLIP_STD, device=DEVICE).view(1, 3, 1, 1)
    with _autocast():
        image = F.normalize(model.encode_image((x + prompts - mean) / std), dim=-1)
        text = F.normalize(model.encode_text(tokenizer([TEMPLATE.format(c) for c in CLASSES]).to(DEVICE)), dim=-1)
        loss = F.cross_entropy(100 * image.float() @ text.float().T, labels)
    loss.backward()
    grad = prompts.grad.mean(0).cpu()
    prompt_cpu -= LR * _mask() * grad / (grad.norm() + 1e-10)


def eager_step(model, text, prompt, mask, mean, std, images_u8, labels):
    """The same semantics on the device in plain PyTorch: the compose reference, cached text features."""
    canvas = compose_reference(images_u8, prompt, None, mean, std, None, Layout(SIZE, INNER, PAD, PAD))
    with _autocast():
        image = F.normalize(model.encode_image(canvas), dim=-1)
        loss = F.cross_entropy(100 * image.float() @ text.T, labels)
    (grad,) = torch.autograd.grad(loss, prompt)
    with torch.no_grad():
        prompt -= LR * mask * grad / (grad.norm() + 1e-10)


def _data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, NATIVE, NATIVE), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, len(CLASSES), (BATCH,), generator=g)


def released(clip):
    model, tokenizer = clip
    images, labels = _data()
    prompt, labels = torch.zeros(3, SIZE, SIZE), labels.to(DEVICE)
    return lambda: released_step(model, tokenizer, prompt, images, labels)


def eager(clip):
    model, tokenizer = clip
    images, labels = _data()
    text = class_text_embeddings(model.encode_text, tokenizer, CLASSES, (TEMPLATE,), DEVICE).float()
    prompt = torch.zeros(3, SIZE, SIZE, device=DEVICE, requires_grad=True)
    mean, std = torch.tensor(vpfast.CLIP_MEAN, device=DEVICE), torch.tensor(vpfast.CLIP_STD, device=DEVICE)
    images, labels, mask = images.to(DEVICE), labels.to(DEVICE), _mask().to(DEVICE)
    return lambda: eager_step(model, text, prompt, mask, mean, std, images, labels)


def vpfast_step(clip):
    model, tokenizer = clip
    images, labels = _data()
    text = class_text_embeddings(model.encode_text, tokenizer, CLASSES, (TEMPLATE,), DEVICE).float()
    prompter = vpfast.EVPrompter(image_size=SIZE, pad=PAD, grad_region="canvas",
                                 out_dtype=torch.bfloat16 if on_gpu() else None).to(DEVICE)
    optimizer = vpfast.NormalizedSGD.for_prompter(prompter, lr=LR)
    images, labels = images.to(DEVICE), labels.to(DEVICE)

    def step():
        with _autocast():
            image = F.normalize(model.encode_image(prompter(images)), dim=-1)
            loss = F.cross_entropy(100 * image.float() @ text.T, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def test_evp_step(benchmark, record, clip):
    pipelines = {"released": released(clip), "eager": eager(clip), "vpfast": vpfast_step(clip)}
    times = interleaved_step_times(pipelines, STEPS)
    benchmark.pedantic(pipelines["vpfast"], rounds=1, iterations=1)
    for name, measured in times.items():
        record("evp_step", {"pipeline": name, "batch": BATCH, "native_size": NATIVE,
                            "images_per_s": BATCH / measured["seconds"], "step_ms": 1e3 * measured["seconds"],
                            "repeats_ms": measured["repeats_ms"], "peak_memory_gib": measured["peak_memory_gib"]})
