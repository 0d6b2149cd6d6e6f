"""Test tiers (markers cpu / interpreter / gpu / aot) and shared fixtures.

Without CUDA the Triton kernels run on CPU tensors under TRITON_INTERPRET=1,
which must be set before triton is first imported: that happens here.
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def poison(monkeypatch):
    """Make every Triton kernel file's allocations start as NaN, so unwritten outputs cannot pass."""
    from vpfast.ops import kernel_modules

    def nan_empty(*shape, **kwargs):
        return torch.empty(*shape, **kwargs).fill_(float("nan"))

    for module in kernel_modules("triton"):
        monkeypatch.setattr(importlib.import_module(module), "_empty", nan_empty)


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (under the interpreter, on CPU tensors) for every op call in the test."""
    from vpfast.ops import _dispatch

    if not _dispatch.interpreter_enabled():
        pytest.skip("the interpreter tier runs Triton on CPU tensors: set TRITON_INTERPRET=1 (automatic without CUDA)")
    if why := _dispatch.interpreter_problem():
        pytest.skip(why)
    monkeypatch.setenv("VPFAST_BACKEND", "triton")
    _dispatch.read_environment()
