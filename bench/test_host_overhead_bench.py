"""Host time per call of vpfast's ops at tiny shapes, where the device work is negligible.

What a training step pays in Python and the dispatcher before any kernel runs: argument checks,
backend choice, the autograd kernel, launches. Each case issues ``CALLS`` calls back to back (one
synchronization per repeat on a GPU) and reports microseconds per call, the fastest of ``REPEATS``
repeats (what the host can do; other load on the machine only adds to it), eager and vpfast in
alternating repeats so that both see the same load on a shared machine. On the CPU the clock is the thread's CPU
time (time.thread_time): on a shared machine the wall clock also counts the time other processes hold the core.
``eager`` is the op's PyTorch reference on the same inputs, so on the CPU vpfast minus eager is the registration's
overhead alone (the op runs the same reference there, or the C++ kernel for token_mix). Unlike the
other suites this one measures on the CPU as well: run it with OMP_NUM_THREADS=1 there.
"""

from __future__ import annotations

import time

import pytest
import torch

import vpfast
from harness import on_gpu
from vpfast.ops.compose import Layout, compose_reference
from vpfast.ops.token_mix import token_mix_reference

DEVICE = "cuda" if on_gpu() else "cpu"
CALLS, REPEATS = 100, 21
CLOCK = time.perf_counter if on_gpu() else time.thread_time  # the GPU run waits on the device: wall clock
SIZE, INNER = 16, 12


def host_us(fns: dict) -> dict:
    """Wall-clock microseconds per call of each function: the fastest of REPEATS runs of CALLS calls, the
    functions taking turns run by run."""
    for fn in fns.values():
        for _ in range(10):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(REPEATS):
        for name, fn in fns.items():
            if on_gpu():
                torch.cuda.synchronize()
            start = CLOCK()
            for _ in range(CALLS):
                fn()
            if on_gpu():
                torch.cuda.synchronize()
            best[name] = min(best[name], (CLOCK() - start) / CALLS * 1e6)
    return best


def _compose_calls(impl: str):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, INNER, INNER), generator=g, dtype=torch.uint8).to(DEVICE)
    prompt = torch.zeros(3, SIZE, SIZE, device=DEVICE, requires_grad=True)
    mask = torch.ones(SIZE, SIZE, device=DEVICE)
    mean, std = torch.tensor(vpfast.CLIP_MEAN, device=DEVICE), torch.tensor(vpfast.CLIP_STD, device=DEVICE)
    grad = torch.randn(2, 3, SIZE, SIZE, device=DEVICE)
    pad = (SIZE - INNER) // 2
    if impl == "vpfast":
        def forward():
            return vpfast.ops.compose(images, prompt, inner_size=INNER, mask=mask, mean=mean, std=std)
    else:
        def forward():
            return compose_reference(images, prompt, mask, mean, std, None, Layout(SIZE, INNER, pad, pad))
    return forward, lambda: torch.autograd.grad(forward(), prompt, grad)


def _token_mix_calls(impl: str):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, generator=g).to(DEVICE).requires_grad_(True)
    library = torch.randn(8, 16, generator=g).to(DEVICE).requires_grad_(True)
    grad = torch.randn(2, 4, 16, device=DEVICE)
    mix = vpfast.ops.token_mix if impl == "vpfast" else token_mix_reference

    def forward():
        return mix(logits, library, gumbel=True, seed=1)

    return forward, lambda: torch.autograd.grad(forward(), (logits, library), grad)


OPS = {"compose": _compose_calls, "token_mix": _token_mix_calls}
IMPLS = ("eager", "vpfast")


@pytest.mark.parametrize("op", list(OPS))
def test_host_overhead(benchmark, record, op):
    calls = {impl: OPS[op](impl) for impl in IMPLS}
    no_grad = host_us({impl: torch.no_grad()(forward) for impl, (forward, _) in calls.items()})
    both = host_us({impl: forward_backward for impl, (_, forward_backward) in calls.items()})
    benchmark.pedantic(calls["vpfast"][1], rounds=1, iterations=1)
    for impl in IMPLS:
        record("host_overhead", {"op": op, "impl": impl, "device": DEVICE, "calls": CALLS,
                                 "forward_no_grad_us": no_grad[impl], "forward_backward_us": both[impl]})
