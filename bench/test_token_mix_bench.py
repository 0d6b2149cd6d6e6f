"""token_mix: eager reference vs torch.compile(reference) vs vpfast (the extension), forward / backward / both.

PGN's shapes: B = 256, M = 16, N in {256, 1024}, d = 768, bfloat16 and float32. Each row records the
median time, logical bytes and GB/s, TFLOP/s of the products (2 B M N d FLOPs each: one forward, two
backward) and the peak memory the call allocates beyond its inputs. Without CUDA the shapes shrink and
each case runs once as a smoke test (vpfast is then the C++ CPU kernel).
"""

from __future__ import annotations

import pytest
import torch

import vpfast
from harness import median_ms, on_gpu, throughput
from vpfast.ops.token_mix import token_mix_reference

if on_gpu():
    DEVICE, BATCH, TOKENS, DIM, LIBRARY_SIZES = "cuda", 256, 16, 768, (256, 1024)
else:
    DEVICE, BATCH, TOKENS, DIM, LIBRARY_SIZES = "cpu", 2, 4, 24, (32,)

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
IMPLS = ["eager", "compile", "vpfast"] if on_gpu() else ["eager", "vpfast"]
OPTIONS = dict(gumbel=True, seed=1, tau=0.5)  # PGN's plain softmax plus the noise the kernels regenerate


@pytest.fixture(autouse=True)
def _extension_backend(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "cuda" if on_gpu() else "cpp")  # the extension, or an error without it
    vpfast.ops.read_environment()


def _inputs(n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(BATCH, TOKENS, n, generator=g).to(DEVICE, dtype)
    library = (0.02 * torch.randn(n, DIM, generator=g)).to(DEVICE, dtype)
    grad = torch.randn(BATCH, TOKENS, DIM, generator=g).to(DEVICE, dtype)
    return logits, library, grad


def _forward(impl: str):
    if impl == "vpfast":
        return lambda z, t: vpfast.ops.token_mix(z, t, **OPTIONS)
    ref = torch.compile(token_mix_reference) if impl == "compile" else token_mix_reference
    return lambda z, t: ref(z, t, **OPTIONS)


def _peak_extra_mib(fn) -> float | None:
    """Memory the call allocates at its peak beyond what was allocated before it."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _run(benchmark, record, fn, name: str, nbytes: int, products: int, **fields) -> None:
    def synced():
        fn()
        if on_gpu():
            torch.cuda.synchronize()

    fn()  # warm-up: compiles, allocates
    ms = median_ms(fn)
    benchmark.pedantic(synced, rounds=20 if on_gpu() else 1, warmup_rounds=3 if on_gpu() else 0)
    n = fields["n"]
    flops = products * 2 * BATCH * TOKENS * n * DIM
    record("token_mix", {"op": name, **fields, **throughput(ms, nbytes), "tflop_per_s": flops / ms / 1e9,
                         "peak_extra_mib": _peak_extra_mib(fn)})


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.nbytes for t in tensors)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", LIBRARY_SIZES)
def test_forward(benchmark, record, n, dtype, impl):
    logits, library, grad = _inputs(n, DTYPES[dtype])
    forward = _forward(impl)
    fn = torch.no_grad()(lambda: forward(logits, library))
    _run(benchmark, record, fn, "forward", _bytes(logits, library, grad), 1, impl=impl, n=n, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", LIBRARY_SIZES)
def test_backward(benchmark, record, monkeypatch, n, dtype, impl):
    if impl == "compile":  # one compiled forward, its backward timed repeatedly with retain_graph=True
        monkeypatch.setattr(torch._functorch.config, "donated_buffer", False)
    logits, library, grad = _inputs(n, DTYPES[dtype])
    if impl == "vpfast":
        options = (OPTIONS["tau"], OPTIONS["gumbel"], OPTIONS["seed"], 0, False, "softmax")

        def fn():
            return torch.ops.vpfast.token_mix_backward(grad, logits, library, *options)
    else:
        z, t = logits.clone().requires_grad_(True), library.clone().requires_grad_(True)
        out = _forward(impl)(z, t)

        def fn():
            return torch.autograd.grad(out, (z, t), grad, retain_graph=True)
    nbytes = _bytes(grad, logits, library) * 2 - grad.nbytes  # reads dP, Z, T; writes dZ, dT
    _run(benchmark, record, fn, "backward", nbytes, 2, impl=impl, n=n, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", LIBRARY_SIZES)
def test_forward_backward(benchmark, record, n, dtype, impl):
    logits, library, grad = _inputs(n, DTYPES[dtype])
    z, t = logits.clone().requires_grad_(True), library.clone().requires_grad_(True)
    forward = _forward(impl)

    def fn():
        return torch.autograd.grad(forward(z, t), (z, t), grad)

    nbytes = 2 * _bytes(logits, library) + 2 * grad.nbytes + _bytes(logits, library)
    _run(benchmark, record, fn, "forward+backward", nbytes, 3, impl=impl, n=n, dtype=dtype)
