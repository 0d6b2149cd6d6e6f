"""token_mix: the reference (the spec) against an independent float64 model; the C++ CPU kernel and the
CUDA kernels (run on the CPU by csrc/cuda/token_mix_emulation.cpp) against the reference; contracts.

Markers: ``cpu`` for the reference and the Python contract, ``interpreter`` for the compiled kernels
run on CPU tensors.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import vpfast
from compose_cases import rel_err
from vpfast import _extension, _warn
from vpfast.ops import _dispatch
from vpfast.ops.token_mix import gumbel_noise, token_mix_backward_reference, token_mix_reference

cpu = pytest.mark.cpu
interpreter = pytest.mark.interpreter
needs_extension = pytest.mark.skipif(not _extension.status().loaded, reason="vpfast._C is not loaded")

ROOT = Path(__file__).resolve().parents[1]
token_mix_module = importlib.import_module("vpfast.ops.token_mix")  # vpfast.ops.token_mix is the function

# Every option alone and in combination (N = 7 in the odd-size shape, so topk=7 keeps all).
CASES = [
    {},
    dict(tau=0.37),
    dict(gumbel=True, seed=0),
    dict(gumbel=True, seed=2**40 + 12345, tau=2.5),
    dict(topk=1),
    dict(topk=3),
    dict(topk=7),
    dict(hard=True),
    dict(hard=True, gumbel=True, seed=9, topk=2, tau=0.5),
    dict(activation="sigmoid"),
    dict(activation="sigmoid", topk=4, tau=0.5, gumbel=True, seed=5),
    dict(activation="sigmoid", hard=True),
]
SOFT_CASES = [c for c in CASES if not c.get("hard")]  # differentiable everywhere (hard is straight-through)


def _ids(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items()) or "plain"


def make_inputs(shape=(1, 3, 7, 5), dtype=torch.float32, seed=0, layout="contiguous"):
    """Fresh random logits (B, M, N) and library (N, d); ``layout="transposed"`` gives strided views."""
    batch, m, n, d = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        logits = (2 * torch.randn(batch, n, m, generator=g, dtype=torch.float64)).transpose(1, 2)
        library = torch.randn(d, n, generator=g, dtype=torch.float64).t()
    else:
        logits = 2 * torch.randn(batch, m, n, generator=g, dtype=torch.float64)
        library = torch.randn(n, d, generator=g, dtype=torch.float64)
    return logits.to(dtype), library.to(dtype)


# --------------------------------------------------------------------------- independent float64 model


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _python_gumbel(seed: int, row: int, col: int) -> float:
    key = _mix32(_mix32(_mix32(seed & 0xFFFFFFFF) ^ (seed >> 32)) ^ row)
    u = ((_mix32(key ^ col) >> 9) + 0.5) / 2**23
    return -math.log(-math.log(u))


def independent(logits, library, grad=None, tau=1.0, gumbel=False, seed=None, topk=None, hard=False,
                activation="softmax"):
    """The contract row by row in numpy float64: P, and with ``grad`` the derived (dZ, dT).

    dA = dP T^T; softmax dS = A (dA - rowsum(A dA)), sigmoid dS = A (1 - A) dA, with A the soft
    weights (also in hard mode), zero outside the top k; dZ = dS / tau; dT = A_fwd^T dP.
    """
    z, t = logits.double().numpy(), library.double().numpy()
    batch, m, n = z.shape
    soft, fwd = np.zeros_like(z), np.zeros_like(z)
    for b in range(batch):
        for i in range(m):
            row = b * m + i
            s = z[b, i] + (np.array([_python_gumbel(seed, row, c) for c in range(n)]) if gumbel else 0.0)
            s = s / tau
            if topk is not None:
                kth = sorted(s, reverse=True)[topk - 1]
                s = np.where(s >= kth, s, -np.inf)
            if activation == "softmax":
                e = np.exp(s - s.max())
                soft[b, i] = e / e.sum()
            else:
                soft[b, i] = 1 / (1 + np.exp(-s))
            fwd[b, i] = np.eye(n)[int(np.argmax(s))] if hard else soft[b, i]
    p = fwd @ t
    if grad is None:
        return p
    dp = grad.double().numpy()
    da = dp @ t.T
    if activation == "softmax":
        ds = soft * (da - (soft * da).sum(-1, keepdims=True))
    else:
        ds = soft * (1 - soft) * da
    return p, ds / tau, np.einsum("bmn,bmd->nd", fwd, dp)


@cpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_matches_independent_float64(case):
    logits, library = make_inputs(dtype=torch.float64, seed=len(_ids(case)))
    np.testing.assert_allclose(token_mix_reference(logits, library, **case).numpy(),
                               independent(logits, library, **case), rtol=1e-12, atol=1e-12)


@cpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_reference_gradients_are_the_derived_formulas(case):
    logits, library = make_inputs((2, 3, 7, 5), torch.float64, seed=3)
    logits.requires_grad_(True)
    library.requires_grad_(True)
    p = token_mix_reference(logits, library, **case)
    grad = torch.randn_like(p)
    dz, dt = torch.autograd.grad(p, (logits, library), grad)
    _, dz_expected, dt_expected = independent(logits.detach(), library.detach(), grad, **case)
    np.testing.assert_allclose(dz.numpy(), dz_expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dt.numpy(), dt_expected, rtol=1e-10, atol=1e-12)
    if case.get("topk") == 1 and case.get("activation", "softmax") == "softmax":
        assert bool((dz == 0).all())  # a single kept entry: softmax is constant 1


@cpu
@pytest.mark.parametrize("case", SOFT_CASES, ids=_ids)
def test_reference_gradcheck_float64(case):
    logits, library = make_inputs((1, 2, 7, 3), torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda z, t: token_mix_reference(z, t, **case),
                                     (logits.requires_grad_(True), library.requires_grad_(True)))


@cpu
def test_gumbel_noise_matches_python_hash_and_distribution():
    for seed in (0, 1, 2**32 + 5, 2**63 - 1):
        noise = gumbel_noise(seed, 3, 5, torch.float64)
        expected = [[_python_gumbel(seed, r, c) for c in range(5)] for r in range(3)]
        np.testing.assert_allclose(noise.numpy(), expected, rtol=1e-15)
    sample = gumbel_noise(123, 1000, 1000, torch.float64)
    assert abs(sample.mean().item() - 0.5772156649) < 0.005  # Euler-Mascheroni
    assert abs(sample.var().item() - math.pi**2 / 6) < 0.02
    assert gumbel_noise(1, 4, 4).dtype == torch.float32


@cpu
def test_hard_gumbel_samples_follow_the_softmax():
    """The Gumbel-max trick: argmax(Z + G) over many rows is distributed as softmax(Z)."""
    z = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    logits = z.expand(1, 40_000, 4)
    picks = token_mix_reference(logits, torch.eye(4, dtype=torch.float64), gumbel=True, seed=7, hard=True)
    assert rel_err(picks.mean((0, 1)), torch.softmax(z, 0)) < 0.02


@cpu
def test_seed_none_draws_from_torch_default_generator():
    logits, library = make_inputs()
    torch.manual_seed(1)
    a = vpfast.ops.token_mix(logits, library, gumbel=True)
    torch.manual_seed(1)
    b = vpfast.ops.token_mix(logits, library, gumbel=True)
    c = vpfast.ops.token_mix(logits, library, gumbel=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


@cpu
def test_seed_is_ignored_without_gumbel():
    logits, library = make_inputs()
    assert torch.equal(vpfast.ops.token_mix(logits, library, seed=3), vpfast.ops.token_mix(logits, library))


@cpu
def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "reference")
    vpfast.ops.read_environment()
    logits, library = make_inputs(seed=2)
    calls = []
    monkeypatch.setattr(token_mix_module, "token_mix_reference",
                        lambda *a, **k: calls.append(1) or token_mix_reference(*a, **k))
    out = vpfast.ops.token_mix(logits, library, topk=2)
    assert calls and torch.equal(out, token_mix_reference(logits, library, topk=2))


@cpu
def test_missing_extension_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.delenv("VPFAST_BACKEND", raising=False)
    vpfast.ops.read_environment()
    missing = _extension.ExtensionStatus(False, False, "vpfast._C not built: test")
    monkeypatch.setattr(_extension, "status", lambda: missing)
    monkeypatch.setattr(_warn, "_warned", set())
    logits, library = make_inputs(seed=4)
    with pytest.warns(RuntimeWarning, match=r"token_mix with float32 cpu tensors runs the reference backend "
                                            r"\(cpp unavailable: vpfast._C not built: test\)"):
        out = vpfast.ops.token_mix(logits, library)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vpfast.ops.token_mix(logits, library)
    assert torch.equal(out, token_mix_reference(logits, library))
    assert _dispatch.backend_table()["token_mix"]["cpu"].startswith("reference (cpp unavailable")


@cpu
def test_backend_table_names_the_cpp_kernel():
    """The C++ CPU kernel is "cpp" (issue 17: it was listed as "cuda"); float64 CUDA runs the reference."""
    row = _dispatch.backend_table()["token_mix"]
    assert set(row) == {"cpu", "cuda"}
    if _extension.status().loaded:
        assert row["cpu"] == "cpp"
    if _extension.status().has_cuda:
        assert row["cuda"] == ("float32, bfloat16, float16: cuda; "
                               "float64: reference (cuda unavailable: cuda takes float32, bfloat16, float16)")


@cpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backward_reference_is_the_gradient_of_the_reference(case):
    """token_mix_backward_reference (the reference backend's backward) against autograd through the forward."""
    logits, library = make_inputs((2, 3, 7, 5), torch.float64, seed=21)
    grad = torch.randn(2, 3, 5, dtype=torch.float64)
    z, t = logits.requires_grad_(True), library.requires_grad_(True)
    expected = torch.autograd.grad(token_mix_reference(z, t, **case), (z, t), grad)
    got = token_mix_backward_reference(grad, logits.detach(), library.detach(), **case)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float64 and rel_err(g, e) < 1e-12


@cpu
def test_forced_reference_backend_runs_inside_the_op(monkeypatch):
    """The reference is a backend of the op: a graph node vpfast_token_mixBackward, its backward the reference's."""
    monkeypatch.setenv("VPFAST_BACKEND", "reference")
    vpfast.ops.read_environment()
    logits, library = make_inputs((2, 3, 7, 5), seed=22)
    z, t = logits.requires_grad_(True), library.requires_grad_(True)
    out = vpfast.ops.token_mix(z, t, gumbel=True, seed=4, topk=3)
    assert type(out.grad_fn).__name__ == "vpfast_token_mixBackward"
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(token_mix_reference(z, t, gumbel=True, seed=4, topk=3), (z, t), grad)
    for g, e in zip(torch.autograd.grad(out, (z, t), grad), expected, strict=True):
        assert rel_err(g, e) < 1e-6


# --------------------------------------------------------------------------- the C++ CPU kernel


def _op_and_reference(logits, library, grad, case):
    """(P, dZ, dT) of the op (dispatch: the C++ kernel) and of the reference's autograd."""
    results = []
    for fn in (vpfast.ops.token_mix, token_mix_reference):
        z, t = logits.detach().requires_grad_(True), library.detach().requires_grad_(True)
        p = fn(z, t, **case)
        results.append((p, *torch.autograd.grad(p, (z, t), grad)))
    return results


@interpreter
@needs_extension
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (2, 5, 40, 9)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpu_kernel_matches_reference_float32(case, shape, layout, monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "cpp")  # the extension's C++ kernel for CPU tensors
    vpfast.ops.read_environment()
    logits, library = make_inputs(shape, seed=hash((_ids(case), shape, layout)) % 1000, layout=layout)
    grad = torch.randn(shape[0], shape[1], shape[3])
    ops, ref = _op_and_reference(logits, library, grad, case)
    for got, expected in zip(ops, ref, strict=True):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert rel_err(got, expected) < 1e-5


@interpreter
@needs_extension
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpu_kernel_matches_reference_float64(case, monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "cpp")
    vpfast.ops.read_environment()
    logits, library = make_inputs((2, 3, 7, 5), torch.float64, seed=8)
    ops, ref = _op_and_reference(logits, library, torch.randn(2, 3, 5, dtype=torch.float64), case)
    for got, expected in zip(ops, ref, strict=True):
        assert rel_err(got, expected) < 1e-12


@interpreter
@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_half_precision(dtype, monkeypatch):
    """16-bit inputs accumulate in float32, as the reference does: only the output rounding differs."""
    monkeypatch.setenv("VPFAST_BACKEND", "cpp")
    vpfast.ops.read_environment()
    logits, library = make_inputs((2, 5, 40, 9), dtype, seed=10)
    case = dict(gumbel=True, seed=3, topk=9, tau=0.8)
    ops, ref = _op_and_reference(logits, library, torch.randn(2, 5, 9).to(dtype), case)
    for got, expected in zip(ops, ref, strict=True):
        assert got.dtype == dtype and rel_err(got, expected) < 2 * torch.finfo(dtype).eps


@interpreter
@needs_extension
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpu_kernel_gradcheck_float64(case, monkeypatch):
    """Hard mode is straight-through (its true logits gradient is 0), so only the library is checked there;
    its logits gradient is compared with the reference in the tests above."""
    monkeypatch.setenv("VPFAST_BACKEND", "cpp")
    vpfast.ops.read_environment()
    logits, library = make_inputs((1, 2, 7, 3), torch.float64, seed=6)
    if case.get("hard"):
        fn, inputs = (lambda t: vpfast.ops.token_mix(logits, t, **case)), (library.requires_grad_(True),)
    else:
        fn = lambda z, t: vpfast.ops.token_mix(z, t, **case)  # noqa: E731
        inputs = (logits.requires_grad_(True), library.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs)


def _op_args(case: dict, logits, library) -> tuple:
    return (logits, library, float(case.get("tau", 1.0)), case.get("gumbel", False), case.get("seed") or 0,
            case.get("topk") or 0, case.get("hard", False), case.get("activation", "softmax"))


@interpreter
@needs_extension
@pytest.mark.parametrize("case", [{}, CASES[8], CASES[10]], ids=_ids)
def test_opcheck(case):
    logits, library = make_inputs((2, 3, 7, 5), seed=12, layout="transposed")
    args = _op_args(case, logits.requires_grad_(True), library.requires_grad_(True))
    torch.library.opcheck(torch.ops.vpfast.token_mix.default, args)
    grad = torch.randn(2, 3, 5)
    torch.library.opcheck(torch.ops.vpfast.token_mix_backward.default,
                          (grad, *_op_args(case, logits.detach(), library.detach())))


@interpreter
@needs_extension
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_cpu(monkeypatch, dynamic):
    monkeypatch.setenv("VPFAST_BACKEND", "cpp")
    vpfast.ops.read_environment()
    logits, library = make_inputs((2, 4, 9, 6), seed=14)

    def step(z, t):
        a = vpfast.ops.token_mix(z, t, gumbel=True, seed=11, topk=5, tau=0.7)
        b = vpfast.ops.token_mix(z, t, hard=True, activation="sigmoid")
        return (a * a).sum() + (a * b).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    grads = []
    for fn in (step, compiled):
        z, t = logits.clone().requires_grad_(True), library.clone().requires_grad_(True)
        loss = fn(z, t)
        grads.append((loss, *torch.autograd.grad(loss, (z, t))))
    for eager, comp in zip(*grads, strict=True):
        assert rel_err(comp, eager) < 1e-6


@interpreter
@needs_extension
def test_cpp_checks_name_the_argument():
    logits, library = make_inputs()
    with pytest.raises(RuntimeError, match=r"tau must be a finite number > 0, got -1"):
        torch.ops.vpfast.token_mix(logits, library, -1.0, False, 0, 0, False, "softmax")
    with pytest.raises(RuntimeError, match=r"topk must be in \[0, N = 7\] \(0 keeps all\), got 8"):
        torch.ops.vpfast.token_mix(logits, library, 1.0, False, 0, 8, False, "softmax")
    with pytest.raises(RuntimeError, match=r"activation must be 'softmax' or 'sigmoid', got 'relu'"):
        torch.ops.vpfast.token_mix(logits, library, 1.0, False, 0, 0, False, "relu")
    with pytest.raises(RuntimeError, match=r"grad must have shape \(B, M, d\) = \(1, 3, 5\)"):
        torch.ops.vpfast.token_mix_backward(torch.ones(1, 3, 4), logits, library, 1.0, False, 0, 0, False, "softmax")


# --------------------------------------------------------------------------- the CUDA kernels, emulated


@pytest.fixture(scope="module")
def emulation(tmp_path_factory) -> ctypes.CDLL:
    """csrc/cuda/token_mix_emulation.cpp built with the host compiler and linked to libtorch (its products
    go through aten::mm, as on CUDA)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler to build the CUDA kernels' CPU emulation")
    library_path = tmp_path_factory.mktemp("emulation") / "token_mix_emulation.so"
    torch_dir = Path(torch.__file__).parent
    subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{torch_dir / 'include'}",
                    str(ROOT / "csrc" / "cuda" / "token_mix_emulation.cpp"), f"-L{torch_dir / 'lib'}", "-ltorch_cpu",
                    "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(library_path)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(library_path))


def launch_plan(emulation: ctypes.CDLL, backward: bool, rows: int, n: int, d: int) -> tuple[int, int]:
    """(kernel launches, GEMMs) that the CUDA launcher issues for rows x n logits and d-wide tokens."""
    kernels, gemms = ctypes.c_int64(), ctypes.c_int64()
    emulation.vpfast_token_mix_launch_plan.restype = None
    emulation.vpfast_token_mix_launch_plan(ctypes.c_int(backward), ctypes.c_int64(rows), ctypes.c_int64(n),
                                           ctypes.c_int64(d), ctypes.byref(kernels), ctypes.byref(gemms))
    return kernels.value, gemms.value


@interpreter
def test_cuda_launch_plan_at_pgn_scale(emulation):
    """PGN's B=256, M=16, N=1024 (d=768): the forward is one weights kernel and one GEMM (one workspace chunk of
    B*M*N = 2^22 weights), the backward two row kernels and two GEMMs; past 2^22 weights the forward works in
    chunks, so its workspace stays bounded."""
    assert launch_plan(emulation, False, 256 * 16, 1024, 768) == (1, 1)
    assert launch_plan(emulation, True, 256 * 16, 1024, 768) == (2, 2)
    assert launch_plan(emulation, False, 1024 * 16, 1024, 768) == (4, 4)
    assert launch_plan(emulation, False, 3, 5, 2) == (1, 1)


@pytest.fixture(scope="module")
def emulated(emulation):
    """Calls the CUDA launch sequences on CPU tensors (csrc/cuda/token_mix_emulation.cpp)."""
    fn = emulation.vpfast_token_mix_emulated
    fn.restype = None
    fn.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 3, ctypes.c_double, ctypes.c_int,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

    def run(logits, library, grad=None, *, chunk_rows=0, tau=1.0, gumbel=False, seed=None, topk=None, hard=False,
            activation="softmax"):
        z, t = logits.contiguous(), library.contiguous()
        (batch, m, n), d = z.shape, t.shape[1]
        out = torch.full((n, d) if grad is not None else (batch, m, d), math.nan, dtype=z.dtype)  # poisoned
        dz = torch.full_like(z, math.nan)
        dp = grad.contiguous() if grad is not None else None
        fn(codes[z.dtype], None if dp is None else dp.data_ptr(), z.data_ptr(), t.data_ptr(), out.data_ptr(),
           dz.data_ptr(), batch * m, n, d, tau, gumbel, seed or 0, topk or 0, hard, activation == "sigmoid", chunk_rows)
        return out if grad is None else (dz, out)

    return run


def eager_in_dtype(logits, library, tau=1.0, gumbel=False, seed=None, topk=None, hard=False, activation="softmax"):
    """The reference's steps run entirely in the inputs' dtype: the error baseline of eager PyTorch."""
    s = logits
    if gumbel:
        noise = gumbel_noise(seed, logits.shape[0] * logits.shape[1], logits.shape[2], device=s.device)
        s = s + noise.view(logits.shape).to(s.dtype)
    s = s / tau
    if topk is not None:
        s = s.masked_fill(s < s.detach().topk(topk, -1).values[..., -1:], -math.inf)
    a = torch.softmax(s, -1) if activation == "softmax" else torch.sigmoid(s)
    if hard:
        a = torch.zeros_like(a).scatter_(-1, s.detach().argmax(-1, keepdim=True), 1.0) + (a - a.detach())
    return a @ library


def _grads(fn, logits, library, grad, case):
    z, t = logits.detach().requires_grad_(True), library.detach().requires_grad_(True)
    p = fn(z, t, **case)
    return (p, *torch.autograd.grad(p, (z, t), grad.to(p.dtype)))


# Several tiles in every direction with ragged edges; top-k on few rows (32 counting passes per row).
EMULATED = [(case, (1, 9, 70, 20) if case.get("topk") else (2, 35, 100, 70)) for case in CASES if case.get("topk") != 7]


@interpreter
@pytest.mark.parametrize("case,shape", EMULATED, ids=[_ids(c) for c, _ in EMULATED])
def test_cuda_kernels_emulated_float32(emulated, case, shape):
    logits, library = make_inputs(shape, seed=hash(_ids(case)) % 1000)
    grad = torch.randn(shape[0], shape[1], shape[3])
    got = (emulated(logits, library, **case), *emulated(logits, library, grad, **case))
    expected = _grads(token_mix_reference, logits, library, grad, case)
    for g, e in zip(got, expected, strict=True):
        assert not g.isnan().any() and rel_err(g, e) < 1e-5


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [{}, dict(gumbel=True, seed=1, topk=5, tau=0.5), dict(hard=True),
                                  dict(activation="sigmoid")], ids=_ids)
def test_cuda_kernels_emulated_half_precision(emulated, case, dtype):
    """The 16-bit path (weights and dA rounded to the dtype, products accumulated in float32): no worse
    than twice eager PyTorch's error in that dtype, both measured against the reference in float32 (which
    shares the kernels' top-k and argmax decisions)."""
    shape = (1, 9, 70, 20) if case.get("topk") else (2, 35, 100, 70)
    logits, library = make_inputs(shape, dtype, seed=21)
    grad = torch.randn(shape[0], shape[1], shape[3]).to(dtype)
    got = (emulated(logits, library, **case), *emulated(logits, library, grad, **case))
    target = _grads(token_mix_reference, logits.float(), library.float(), grad.float(), case)
    eager = _grads(eager_in_dtype, logits, library, grad, case)
    for g, x, e in zip(got, target, eager, strict=True):
        assert g.dtype == dtype and not g.isnan().any()
        assert rel_err(g, x) <= 2 * max(rel_err(e, x), torch.finfo(dtype).eps)


@interpreter
@pytest.mark.parametrize("case", [{}, dict(hard=True), dict(gumbel=True, seed=5, topk=3)], ids=_ids)
def test_cuda_forward_in_row_chunks(emulated, case):
    """The forward writes its weights chunk by chunk (ragged last chunk): the same P as one chunk."""
    logits, library = make_inputs((2, 11, 9, 6), seed=31)
    expected = token_mix_reference(logits, library, **case)
    for chunk_rows in (1, 4, 22):
        assert rel_err(emulated(logits, library, chunk_rows=chunk_rows, **case), expected) < 1e-5


@interpreter
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 5), (3, 1, 7, 1), (1, 2, 33, 3)], ids=str)
def test_cuda_kernels_emulated_degenerate_shapes(emulated, shape):
    """Unit dimensions give the product views size-1 axes; N = 33 leaves one lane with a second column."""
    logits, library = make_inputs(shape, seed=32)
    grad = torch.randn(shape[0], shape[1], shape[3])
    got = (emulated(logits, library), *emulated(logits, library, grad))
    for g, e in zip(got, _grads(token_mix_reference, logits, library, grad, {}), strict=True):
        assert not g.isnan().any() and rel_err(g, e) < 1e-5


@interpreter
@pytest.mark.parametrize("case", [{}, dict(topk=4), dict(hard=True)], ids=_ids)
def test_cuda_kernels_emulated_masked_logits(emulated, case):
    """-inf logits (masked library entries), also leading a row: the one-pass normalizer starts from an
    empty sum, and their weights and gradients are 0 as in the reference."""
    logits, library = make_inputs((1, 6, 40, 5), seed=33)
    logits[0, :, :3] = -math.inf
    logits[0, 2, 10:37] = -math.inf
    grad = torch.randn(1, 6, 5)
    got = (emulated(logits, library, **case), *emulated(logits, library, grad, **case))
    for g, e in zip(got, _grads(token_mix_reference, logits, library, grad, case), strict=True):
        assert not g.isnan().any() and rel_err(g, e) < 1e-5


# --------------------------------------------------------------------------- argument errors

BAD_CALLS = [
    (dict(logits=lambda a: a["logits"][0]), r"logits must be a 3-d tensor \(B, M, N\), got \(3, 7\)"),
    (dict(logits=lambda a: a["logits"].int()), r"logits must have a dtype in .*got torch.int32"),
    (dict(logits=lambda a: a["logits"][:, :0]), r"logits and library must be non-empty, got \(1, 0, 7\)"),
    (dict(library=lambda a: a["library"][:6]), r"library must have shape \(N, d\) with N = 7 .*got \(6, 5\)"),
    (dict(library=lambda a: a["library"].double()), r"library must have the logits' dtype torch.float32, "
                                                     r"got torch.float64"),
    (dict(library=lambda a: a["library"].to("meta")), r"library is on meta but logits are on cpu"),
    (dict(tau=0.0), r"tau must be a finite Python number > 0 \(a fixed temperature, not learnable\), got 0.0"),
    (dict(tau=-2), r"tau must be a finite Python number > 0 .*got -2"),
    (dict(tau=math.inf), r"tau must be .*got inf"),
    (dict(tau=torch.tensor(1.0)), r"tau must be a finite Python number > 0 .*got tensor\(1.\)"),
    (dict(topk=0), r"topk must be None or an int in \[1, 7\] \(N\), got 0"),
    (dict(topk=8), r"topk must be None or an int in \[1, 7\] \(N\), got 8"),
    (dict(topk=2.0), r"topk must be None or an int in \[1, 7\] \(N\), got 2.0"),
    (dict(activation="relu"), r"activation must be one of \('softmax', 'sigmoid'\), got 'relu'"),
    (dict(gumbel=True, seed=-1), r"seed must be None or an int in \[0, 2\*\*63\), got -1"),
    (dict(seed=2**63), r"seed must be None or an int in \[0, 2\*\*63\), got 9223372036854775808"),
    (dict(gumbel=True, seed="7"), r"seed must be None or an int in \[0, 2\*\*63\), got '7'"),
    (dict(hard=1), r"gumbel and hard must be bools, got gumbel=False, hard=1"),
]


@cpu
@pytest.mark.parametrize("changes,message", BAD_CALLS, ids=[m[:40] for _, m in BAD_CALLS])
def test_bad_arguments_name_the_argument(changes, message):
    logits, library = make_inputs()
    args = {"logits": logits, "library": library}
    args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
    with pytest.raises(ValueError, match=message):
        vpfast.ops.token_mix(args.pop("logits"), args.pop("library"), **args)
