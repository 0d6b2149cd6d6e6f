"""Backend selection: one function for calls and `vpfast info`, per device and dtype, VPFAST_BACKEND forcing,
fallbacks that warn once, clear errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from vpfast import _warn
from vpfast.ops import OPS, _dispatch

pytestmark = pytest.mark.cpu
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def fake_ops(monkeypatch):
    """A registry with one op "demo": fast on CUDA for float32 when "fast is here", else the reference."""
    state = {"fast": ""}
    fast = _dispatch.Backend("triton", ("cuda",), (torch.float32,), "fast-forward", "fast-backward",
                             lambda device_type: state["fast"])
    reference = _dispatch.Backend("reference", _dispatch.DEVICE_TYPES, (torch.float32, torch.float64), "ref-forward",
                                  "ref-backward")
    monkeypatch.setattr(_dispatch, "OPS", {})
    monkeypatch.setattr(_warn, "_warned", set())
    monkeypatch.delenv("VPFAST_BACKEND", raising=False)
    _dispatch.read_environment()
    monkeypatch.setattr(_dispatch, "_chosen", {})
    _dispatch.register("demo", (fast, reference))
    return state


def test_every_op_is_registered_with_the_reference_last():
    assert set(OPS) == {"compose", "token_mix"}
    for backends in OPS.values():
        assert backends[-1].name == "reference" and all(b.name in _dispatch.BACKENDS for b in backends)


def test_selection_per_device_and_dtype(fake_ops):
    assert _dispatch.select("demo", CUDA, torch.float32).forward == "fast-forward"
    assert _dispatch.select("demo", CPU, torch.float32).name == "reference"  # no warning: not a fallback
    with pytest.warns(RuntimeWarning, match=r"demo with float64 cuda tensors runs the reference backend "
                                            r"\(triton unavailable: triton takes float32\)"):
        assert _dispatch.select("demo", CUDA, torch.float64).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dispatch.select("demo", CUDA, torch.float64)  # once
    assert _dispatch.backend_table() == {"demo": {
        "cpu": "reference", "cuda": "float32: triton; float64: reference (triton unavailable: triton takes float32)"}}


def test_unavailable_backend_falls_back_and_says_why(fake_ops):
    fake_ops["fast"] = "no GPU compiler"
    _dispatch._chosen.clear()  # availability is read once per (op, device, dtype, environment read, extension status)
    with pytest.warns(RuntimeWarning, match=r"triton unavailable: no GPU compiler"):
        assert _dispatch.select("demo", CUDA, torch.float32).name == "reference"
    expected = ("float32: reference (triton unavailable: no GPU compiler); "
                "float64: reference (triton unavailable: triton takes float32)")
    assert _dispatch.backend_table()["demo"]["cuda"] == expected


def test_forcing_a_backend_the_op_lacks_raises(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "cuda")
    _dispatch.read_environment()
    with pytest.raises(RuntimeError, match=r"VPFAST_BACKEND=cuda, but compose has no cuda backend"):
        _dispatch.choose("compose", CPU)
    assert _dispatch.backend_table()["compose"]["cpu"].startswith("error: compose has no cuda backend")


def test_forced_backend_that_cannot_take_the_dtype_raises(fake_ops, monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "triton")
    _dispatch.read_environment()
    with pytest.raises(RuntimeError, match=r"VPFAST_BACKEND=triton cannot run demo on cuda with float64: "
                                           r"triton takes float32"):
        _dispatch.select("demo", CUDA, torch.float64)
    assert _dispatch.select("demo", CUDA, torch.float32).name == "triton"
    monkeypatch.setenv("VPFAST_BACKEND", "reference")
    _dispatch.read_environment()
    assert _dispatch.select("demo", CUDA, torch.float32).name == "reference"


def test_unknown_backend_names_the_choices(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "tpu")
    _dispatch.read_environment()
    with pytest.raises(ValueError, match=r"VPFAST_BACKEND must be one of \('reference', 'triton', 'cpp', 'cuda'\), "
                                         r"got 'tpu'"):
        _dispatch.choose("compose", CPU)


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "interpreter_problem", lambda: "")
    monkeypatch.setenv("VPFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _dispatch.read_environment()
    with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
        _dispatch.choose("compose", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch.read_environment()
    assert _dispatch.choose("compose", CPU) == "triton"


@pytest.mark.parametrize(("triton_version", "numpy_version", "refused"),
                         [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False),
                          ("3.8.0", "2.4.6", False)])
def test_the_interpreter_is_refused_where_triton_cannot_run_the_kernels(monkeypatch, triton_version, numpy_version,
                                                                        refused):
    """Triton 3.6's interpreter fails on every vpfast kernel with numpy 2.4 (triton-lang/triton#9171)."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    why = _dispatch.interpreter_problem.__wrapped__()
    assert bool(why) == refused
    if refused:
        assert why == (f"Triton {triton_version}'s interpreter cannot run these kernels with numpy {numpy_version} "
                       "(triton-lang/triton#9171): use Triton >= 3.7 or numpy < 2.4")
        monkeypatch.setattr(_dispatch, "interpreter_problem", lambda: why)
        monkeypatch.setenv("VPFAST_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        _dispatch.read_environment()
        with pytest.raises(RuntimeError, match=r"triton-lang/triton#9171"):
            _dispatch.choose("compose", CPU)


def test_compose_float64_is_not_reported_as_triton(monkeypatch):
    """issue 17: `vpfast info` said "triton" for a float64 compose that runs the reference."""
    monkeypatch.delenv("VPFAST_BACKEND", raising=False)
    _dispatch.read_environment()
    row = _dispatch.backend_table()["compose"]
    assert row["cpu"] == "reference"
    assert "float64: reference" in row["cuda"]


def test_kernel_modules_list_the_triton_files():
    assert _dispatch.kernel_modules("triton") == ("vpfast.kernels.compose",)
    assert _dispatch.kernel_modules("cuda") == ()


@pytest.fixture
def picky_ops(fake_ops, monkeypatch):
    """fake_ops, with a "triton" backend that takes calls of at most 4 rows (its supports predicate)."""
    def supports(tensors, options):
        return f"it takes at most 4 rows, got {tensors[0].shape[0]}" if tensors[0].shape[0] > 4 else ""

    fast, reference = _dispatch.OPS["demo"]
    picky = _dispatch.Backend("triton", ("cuda",), (torch.float32,), "fast-forward", "fast-backward",
                              fast.runs_on, supports=supports, limits="rows <= 4")
    _dispatch.register("demo", (picky, reference))


def test_a_call_the_backend_cannot_take_falls_back_with_one_warning(picky_ops):
    small, large = torch.empty(4, 2, device="meta"), torch.empty(5, 2, device="meta")
    assert _dispatch.select("demo", CUDA, torch.float32, (small,), ()).name == "triton"
    with pytest.warns(RuntimeWarning, match=r"demo runs the reference backend for a call that the triton backend "
                                            r"cannot take: it takes at most 4 rows, got 5"):
        assert _dispatch.select("demo", CUDA, torch.float32, (large,), ()).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.select("demo", CUDA, torch.float32, (large,), ()).name == "reference"  # once
    assert _dispatch.backend_table()["demo"]["cuda"].startswith("float32: triton [rows <= 4]; ")


def test_a_forced_backend_that_cannot_take_the_call_raises_saying_why(picky_ops, monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "triton")
    _dispatch.read_environment()
    with pytest.raises(RuntimeError, match=r"VPFAST_BACKEND=triton cannot run this demo call: "
                                           r"it takes at most 4 rows, got 5"):
        _dispatch.select("demo", CUDA, torch.float32, (torch.empty(5, 2, device="meta"),), ())


def test_the_reference_must_take_every_call():
    picky = _dispatch.Backend("reference", _dispatch.DEVICE_TYPES, (torch.float32,), "f", "b", supports=lambda t, o: "")
    with pytest.raises(ValueError, match="the last backend must be the reference.*taking every call"):
        _dispatch.register("demo", (picky,))


def test_the_environment_is_read_at_import_and_on_request(monkeypatch):
    """select reads VPFAST_BACKEND from module state (no environment read per call): a change takes effect when
    read_environment() reads it, and `vpfast info` reports the value in force."""
    from vpfast import info

    monkeypatch.delenv("VPFAST_BACKEND", raising=False)
    _dispatch.read_environment()
    assert _dispatch.choose("compose", CPU) == "reference"
    monkeypatch.setenv("VPFAST_BACKEND", "cuda")
    assert _dispatch.choose("compose", CPU) == "reference"  # not read yet
    assert info.collect()["env"]["VPFAST_BACKEND"] is None
    _dispatch.read_environment()
    assert info.collect()["env"]["VPFAST_BACKEND"] == "cuda"
    with pytest.raises(RuntimeError, match=r"VPFAST_BACKEND=cuda, but compose has no cuda backend"):
        _dispatch.choose("compose", CPU)


def test_a_test_that_set_the_environment_leaves_nothing_behind():
    """After the previous test (its monkeypatch undone, tests/conftest.py's fixture read it again) the values in
    force are the environment's again."""
    assert _dispatch.environment() == {name: os.environ.get(name) for name in _dispatch.ENV_VARS}
