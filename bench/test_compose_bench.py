"""compose: eager reference vs torch.compile(reference) vs vpfast, forward / backward / both.

B in {32, 256, 1024} on a 224 canvas (164 inner image from 224 x 224 inputs, and from 32 x 32 ones
for the forward),
uint8 -> bfloat16 and float32 -> float32, with and without the per-sample
transform (whose eager reference is the per-sample loop). Without CUDA the
shapes shrink and each case runs once, on the reference path, as a smoke test.
"""

from __future__ import annotations

import pytest
import torch

import vpfast
from harness import median_ms, on_gpu, throughput
from vpfast.ops.compose import Layout, compose_backward_reference, compose_reference

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

if on_gpu():
    DEVICE, SIZE, INNER, BATCHES, SOURCES = "cuda", 224, 164, (32, 256, 1024), (224, 32)
else:
    DEVICE, SIZE, INNER, BATCHES, SOURCES = "cpu", 32, 24, (2,), (32, 8)

DTYPES = {"u8-bf16": (torch.uint8, torch.bfloat16), "f32-f32": (torch.float32, torch.float32)}


def _inputs(batch: int, dtypes: str, transform: bool, source: int = SIZE):
    in_dtype, out_dtype = DTYPES[dtypes]
    g = torch.Generator().manual_seed(batch)
    if in_dtype == torch.uint8:
        images = torch.randint(0, 256, (batch, 3, source, source), generator=g, dtype=torch.uint8)
    else:
        images = torch.rand(batch, 3, source, source, generator=g)
    prompt = torch.randn(3, SIZE, SIZE, generator=g)
    mask = torch.ones(SIZE, SIZE)
    pad = (SIZE - INNER) // 2
    mask[pad:pad + INNER, pad:pad + INNER] = 0
    rows = None
    if transform:
        sizes = torch.randint(SIZE * 7 // 8, SIZE + 1, (batch,), generator=g)
        offsets = [torch.randint(0, SIZE - int(s) + 1, (2,), generator=g) for s in sizes]
        rows = torch.stack([torch.stack([s, o[0], o[1], torch.randint(0, 2, ())]) for s, o in
                            zip(sizes, offsets, strict=True)]).int().to(DEVICE)
    mean, std = torch.tensor(CLIP_MEAN, device=DEVICE), torch.tensor(CLIP_STD, device=DEVICE)
    return (images.to(DEVICE), prompt.to(DEVICE), mask.to(DEVICE), mean, std, rows,
            Layout(SIZE, INNER, pad, pad), out_dtype)


def _forward_fn(impl, images, prompt, mask, mean, std, rows, layout, out_dtype):
    if impl == "vpfast":
        return lambda p=prompt: vpfast.ops.compose(images, p, inner_size=layout.inner, mask=mask, mean=mean,
                                                   std=std, transform=rows, out_dtype=out_dtype)
    ref = torch.compile(compose_reference) if impl == "compile" else compose_reference
    return lambda p=prompt: ref(images, p, mask, mean, std, rows, layout).to(out_dtype)


def _backward_fn(impl, grad_out, mask, std, rows, grad_norm):
    if impl == "vpfast":
        return lambda: torch.ops.vpfast.compose_backward(grad_out, mask, std, rows, "pixel", "prompt",
                                                         grad_norm or "none", torch.float32)
    ref = torch.compile(compose_backward_reference) if impl == "compile" else compose_backward_reference
    return lambda: ref(grad_out, mask, std, rows, "pixel", "prompt", grad_norm)


def _run(benchmark, record, fn, nbytes: int, name: str, **fields) -> None:
    def synced():
        fn()
        if on_gpu():
            torch.cuda.synchronize()

    ms = median_ms(fn)
    benchmark.pedantic(synced, rounds=20 if on_gpu() else 1, warmup_rounds=3 if on_gpu() else 0)
    record("compose", {"op": name, **fields, **throughput(ms, nbytes)})


IMPLS = ["eager", "compile", "vpfast"] if on_gpu() else ["eager", "vpfast"]


def _skip_compile_with_transform(impl, transform):
    if impl == "compile" and transform:
        pytest.skip("the reference's per-sample transform loop is data-dependent: torch.compile re-traces per batch")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("transform", [False, True], ids=["plain", "transform"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def test_forward(benchmark, record, batch, dtypes, transform, source, impl):
    _skip_compile_with_transform(impl, transform)
    images, prompt, mask, mean, std, rows, layout, out_dtype = _inputs(batch, dtypes, transform, source)
    fn = torch.no_grad()(_forward_fn(impl, images, prompt, mask, mean, std, rows, layout, out_dtype))
    nbytes = images.nbytes + prompt.nbytes + mask.nbytes + batch * 3 * SIZE * SIZE * out_dtype.itemsize
    _run(benchmark, record, fn, nbytes, "forward", impl=impl, batch=batch, dtypes=dtypes, transform=transform,
         source=source)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad_norm", [None, "sample_l2"], ids=["sum", "sample_l2"])
@pytest.mark.parametrize("transform", [False, True], ids=["plain", "transform"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def test_backward(benchmark, record, batch, dtypes, transform, grad_norm, impl):
    _skip_compile_with_transform(impl, transform)
    _, prompt, mask, _, std, rows, _, out_dtype = _inputs(batch, dtypes, transform)
    grad_out = torch.randn(batch, 3, SIZE, SIZE, device=DEVICE).to(out_dtype)
    fn = _backward_fn(impl, grad_out, mask, std, rows, grad_norm)
    passes = 2 if grad_norm else 1
    nbytes = passes * grad_out.nbytes + prompt.nbytes + mask.nbytes
    _run(benchmark, record, fn, nbytes, "backward", impl=impl, batch=batch, dtypes=dtypes, transform=transform,
         grad_norm=grad_norm)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("transform", [False, True], ids=["plain", "transform"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def test_forward_backward(benchmark, record, batch, dtypes, transform, impl):
    _skip_compile_with_transform(impl, transform)
    images, prompt, mask, mean, std, rows, layout, out_dtype = _inputs(batch, dtypes, transform)
    prompt.requires_grad_(True)
    forward = _forward_fn(impl, images, prompt, mask, mean, std, rows, layout, out_dtype)
    grad_out = torch.randn(batch, 3, SIZE, SIZE, device=DEVICE).to(out_dtype)

    def fn():
        torch.autograd.grad(forward(prompt), prompt, grad_out)

    nbytes = images.nbytes + 2 * grad_out.nbytes + 2 * prompt.nbytes + 2 * mask.nbytes
    _run(benchmark, record, fn, nbytes, "forward+backward", impl=impl, batch=batch, dtypes=dtypes,
         transform=transform)
