"""Backend choice: defaults per device, VPFAST_BACKEND forcing, clear errors."""

from __future__ import annotations

import pytest
import torch

from vpfast.ops import _dispatch

pytestmark = pytest.mark.cpu


def test_cpu_tensors_take_the_reference_by_default(monkeypatch):
    monkeypatch.delenv("VPFAST_BACKEND", raising=False)
    assert _dispatch.choose("compose", torch.device("cpu")) == "reference"


def test_forcing_a_backend_the_op_lacks_raises(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"VPFAST_BACKEND=cuda, but compose has no cuda backend"):
        _dispatch.choose("compose", torch.device("cpu"))
    assert _dispatch.backend_table()["compose"]["cpu"].startswith("error: compose has no cuda backend")


def test_unknown_backend_names_the_choices(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"VPFAST_BACKEND must be one of \('reference', 'triton', 'cuda'\), got 'tpu'"):
        _dispatch.choose("compose", torch.device("cpu"))


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
        _dispatch.choose("compose", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.choose("compose", torch.device("cpu")) == "triton"
