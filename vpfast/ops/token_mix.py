"""token_mix: PGN token-library soft sampling, ``P = A @ T`` with ``A = softmax((Z + G) / tau)``.

The op behind PGN's prompt generator (contract: docs/ops.md, token_mix; docs/methods.md, PGN). This
file holds the argument checks, the reference implementation (plain PyTorch: the specification, on
any device, float64-capable) of the forward and the backward, the Gumbel noise they share with the
compiled kernels, and the ops ``vpfast::token_mix`` / ``vpfast::token_mix_backward``
(vpfast/ops/_library.py): options, fakes, autograd and backends (the extension's C++ kernels, whose
schemas ``vpfast::_ext_token_mix*`` are declared here, and the reference).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vpfast.ops import _dispatch, _library

ACTIVATIONS = ("softmax", "sigmoid")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SEED_LIMIT = 2**63  # the op schema's seed is an int64
_MASK32 = 0xFFFFFFFF


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check(logits, library, tau, gumbel, seed, topk, hard, activation) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a 3-d tensor (B, M, N), got {_shape(logits)}")
    if not isinstance(library, torch.Tensor) or library.dim() != 2 or library.shape[0] != logits.shape[2]:
        raise ValueError(f"library must have shape (N, d) with N = {logits.shape[2]} (the logits' last dimension), "
                         f"got {_shape(library)}")
    if logits.numel() == 0 or library.numel() == 0:
        raise ValueError(f"logits and library must be non-empty, got {tuple(logits.shape)} and "
                         f"{tuple(library.shape)}")
    if logits.dtype not in DTYPES:
        raise ValueError(f"logits must have a dtype in {DTYPES}, got {logits.dtype}")
    if library.dtype != logits.dtype:
        raise ValueError(f"library must have the logits' dtype {logits.dtype}, got {library.dtype}")
    if library.device != logits.device:
        raise ValueError(f"library is on {library.device} but logits are on {logits.device}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:  # also rejects nan
        raise ValueError(f"tau must be a finite Python number > 0 (a fixed temperature, not learnable), got {tau!r}")
    n = logits.shape[2]
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n):
        raise ValueError(f"topk must be None or an int in [1, {n}] (N), got {topk!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    if not isinstance(gumbel, bool) or not isinstance(hard, bool):
        raise ValueError(f"gumbel and hard must be bools, got gumbel={gumbel!r}, hard={hard!r}")
    if logits.shape[0] * logits.shape[1] > _MASK32 or n > _MASK32:
        raise ValueError(f"B * M and N must be < 2**32 (rows and columns are hashed as 32-bit counters), "
                         f"got logits of shape {tuple(logits.shape)}")


def token_mix(
    logits: torch.Tensor,
    library: torch.Tensor,
    *,
    tau: float = 1.0,
    gumbel: bool = False,
    seed: int | None = None,
    topk: int | None = None,
    hard: bool = False,
    activation: str = "softmax",
) -> torch.Tensor:
    """Mix a library of N tokens into M prompt tokens per sample: ``P = A @ T``, shape (B, M, d).

    ``logits`` Z (B, M, N) and ``library`` T (N, d), same dtype (float32, float64, bfloat16,
    float16) and device, any strides. ``S = (Z + G) / tau`` with Gumbel noise G when ``gumbel``
    (drawn from ``seed``: a hash of (seed, row, column), identical in forward, backward and on every
    backend; ``seed=None`` draws one from torch's default generator, which is a graph break under
    torch.compile: pass a seed there; without ``gumbel`` the seed is ignored). ``topk`` keeps the k
    largest entries of each row of S (all entries equal to the k-th largest are kept), the others
    become -inf. ``A = softmax(S)`` over N, or ``sigmoid(S)`` without row normalization. ``hard``
    uses onehot(argmax S) in the forward and the soft gradient in the backward (straight-through).
    Gradients reach Z and T; ``tau`` is a fixed float, not learnable. Returns P in the logits' dtype.

    Backends (``vpfast info``): ``cpp``, the C++ kernel of ``vpfast._C`` for CPU tensors; ``cuda``,
    its row kernels around cuBLAS products for float32, bfloat16 and float16 CUDA tensors (float64 on
    CUDA runs the reference); else the reference with a one-time warning. ``VPFAST_BACKEND=reference``
    forces the reference. The backend is chosen inside the op on every call, also in a compiled
    function. On CUDA one warp per row computes the row's statistics (max, normalizer, top-k
    threshold, argmax) and weights; the three products go to ``aten::mm`` (tensor cores, float32
    accumulation, the user's matmul precision settings). No B x M x N tensor is allocated besides dZ:
    the forward writes its weights in chunks of at most 2**22 entries (one chunk, so one weights
    kernel and one GEMM, at PGN's B=256, M=16, N=1024), the backward keeps them in dZ's own storage
    and recomputes A from Z and the row statistics (csrc/cuda/token_mix_kernels.cuh).

    Verified where (tests/test_token_mix*.py): the reference against an independent float64 model,
    its gradients against the derived formulas; the C++ CPU kernel against the reference for every
    option (float32 within 1e-5, float64 within 1e-12, non-contiguous inputs), float64 gradcheck,
    opcheck, torch.compile(fullgraph=True) on CPU. The CUDA kernels compile for sm_80 and sm_90
    without spills, and their launch sequence runs on the CPU under a thread-level emulation of CUDA
    (csrc/cuda/token_mix_emulation.cpp, with aten::mm on the CPU in place of cuBLAS) within 1e-5
    of the reference in float32 and within twice eager PyTorch's error in bfloat16/float16. On a GPU:
    tests/test_token_mix_gpu.py (PGN shapes, compile, CUDA graphs, memory) and
    bench/test_token_mix_bench.py.
    """
    _check(logits, library, tau, gumbel, seed, topk, hard, activation)
    if gumbel and seed is None:
        seed = int(torch.empty((), dtype=torch.int64).random_())  # uniform in [0, 2**63)
    options = TokenMixOptions(float(tau), gumbel, seed if gumbel else 0, topk or 0, hard, activation)
    return token_mix_op((logits, library), options)


# --------------------------------------------------------------------------- reference


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32): c is split in 16-bit halves so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer finalizer of csrc/token_mix.h on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: int, rows: int, cols: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The (rows, cols) Gumbel noise of ``seed``, as every backend computes it (csrc/token_mix.h).

    ``h = mix32(mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ row) ^ col)``, ``u = ((h >> 9) + 1/2) / 2**23``
    (exact in float32 and float64, inside (0, 1)), ``G = -log(-log(u))``; rows are b * M + m.
    """
    seed_lo = torch.tensor(seed & _MASK32, dtype=torch.int64, device=device)
    key = mix32(mix32(mix32(seed_lo) ^ (seed >> 32)) ^ torch.arange(rows, device=device))
    h = mix32(key[:, None] ^ torch.arange(cols, device=device))
    u = ((h >> 9).to(dtype) + 0.5) * 2.0**-23
    return -torch.log(-torch.log(u))


def token_mix_reference(
    logits: torch.Tensor,
    library: torch.Tensor,
    *,
    tau: float = 1.0,
    gumbel: bool = False,
    seed: int | None = None,
    topk: int | None = None,
    hard: bool = False,
    activation: str = "softmax",
) -> torch.Tensor:
    """The specification (docs/ops.md, token_mix), differentiable in ``logits`` and ``library``.

    Computes in float64 for float64 inputs, else in float32, and returns the logits' dtype.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = logits.to(acc)
    if gumbel:
        if seed is None:
            raise ValueError("token_mix_reference needs a seed with gumbel=True")
        batch, m, n = logits.shape
        s = s + gumbel_noise(seed, batch * m, n, acc, logits.device).view(batch, m, n)
    s = s / tau
    if topk is not None:
        kth = s.detach().topk(topk, dim=-1).values[..., -1:]
        s = s.masked_fill(s < kth, -math.inf)
    a = torch.softmax(s, dim=-1) if activation == "softmax" else torch.sigmoid(s)
    if hard:
        onehot = torch.zeros_like(a).scatter_(-1, s.detach().argmax(-1, keepdim=True), 1.0)
        a = onehot + (a - a.detach())  # exactly onehot forward, the soft gradient backward
    return (a @ library.to(acc)).to(logits.dtype)


def token_mix_backward_reference(
    grad: torch.Tensor,
    logits: torch.Tensor,
    library: torch.Tensor,
    *,
    tau: float = 1.0,
    gumbel: bool = False,
    seed: int | None = None,
    topk: int | None = None,
    hard: bool = False,
    activation: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient specification: (dZ, dT) of token_mix_reference for the output gradient ``grad``.

    ``dT = W^T dP`` with W the forward weights (onehot(argmax S) in hard mode, else A);
    ``dA = dP T^T``; ``dS = A (dA - rowsum(A dA))`` for softmax, ``A (1 - A) dA`` for sigmoid (the soft
    A also in hard mode: straight-through); ``dZ = dS / tau``. Same precision rules as the forward.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = logits.to(acc)
    if gumbel:
        if seed is None:
            raise ValueError("token_mix_backward_reference needs a seed with gumbel=True")
        batch, m, n = logits.shape
        s = s + gumbel_noise(seed, batch * m, n, acc, logits.device).view(batch, m, n)
    s = s / tau
    if topk is not None:
        s = s.masked_fill(s < s.topk(topk, dim=-1).values[..., -1:], -math.inf)
    a = torch.softmax(s, dim=-1) if activation == "softmax" else torch.sigmoid(s)
    weights = torch.zeros_like(a).scatter_(-1, s.argmax(-1, keepdim=True), 1.0) if hard else a
    dp, t = grad.to(acc), library.to(acc)
    da = dp @ t.T
    if activation == "softmax":
        ds = a * (da - (a * da).sum(-1, keepdim=True))
    else:
        ds = a * (1 - a) * da
    dt = weights.flatten(0, 1).T @ dp.flatten(0, 1)
    return (ds / tau).to(logits.dtype), dt.to(library.dtype)


# --------------------------------------------------------------------------- the op


class TokenMixOptions(NamedTuple):
    """token_mix's non-tensor arguments as the ops take them: seed 0 without gumbel, topk 0 for all N."""

    tau: float
    gumbel: bool
    seed: int
    topk: int
    hard: bool
    activation: str

    def reference_kwargs(self) -> dict:
        """The keyword arguments of token_mix_reference and token_mix_backward_reference."""
        return dict(tau=self.tau, gumbel=self.gumbel, seed=self.seed if self.gumbel else None,
                    topk=self.topk or None, hard=self.hard, activation=self.activation)


TOKEN_MIX = _library.OpDef("token_mix", ("logits", "library"), TokenMixOptions)
TOKEN_MIX_BACKWARD = _library.OpDef("token_mix_backward", ("grad", "logits", "library"), TokenMixOptions,
                                    returns="(Tensor, Tensor)")
# The compiled extension's kernels (csrc/token_mix.cpp for CPU tensors, csrc/cuda/token_mix.cu for CUDA ones).
_extension_forward = _library.declare(_library.OpDef("_ext_token_mix", TOKEN_MIX.tensors, TokenMixOptions))
_extension_backward = _library.declare(_library.OpDef("_ext_token_mix_backward", TOKEN_MIX_BACKWARD.tensors,
                                                      TokenMixOptions, returns="(Tensor, Tensor)"))


def _compiled_forward(logits, library, o: TokenMixOptions) -> torch.Tensor:
    return _extension_forward(logits, library, *o)


def _compiled_backward(grad, logits, library, o: TokenMixOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return _extension_backward(grad, logits, library, *o)


def _reference_forward(logits, library, o: TokenMixOptions) -> torch.Tensor:
    return token_mix_reference(logits, library, **o.reference_kwargs())


def _reference_backward(grad, logits, library, o: TokenMixOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return token_mix_backward_reference(grad, logits, library, **o.reference_kwargs())


_dispatch.register("token_mix", (
    _dispatch.Backend("cpp", ("cpu",), DTYPES, _compiled_forward, _compiled_backward,
                      _dispatch.extension_runs_on("cpu")),
    _dispatch.Backend("cuda", ("cuda",), (torch.float32, torch.bfloat16, torch.float16), _compiled_forward,
                      _compiled_backward, _dispatch.extension_runs_on("cuda")),
    _dispatch.Backend("reference", _dispatch.DEVICE_TYPES, DTYPES, _reference_forward, _reference_backward),
))


def _select(tensors: tuple, options: TokenMixOptions) -> _dispatch.Backend:
    """The backend for (logits, library): by the logits' device and dtype."""
    return _dispatch.select("token_mix", tensors[0].device, tensors[0].dtype)


def _fake(logits, library, options: TokenMixOptions) -> torch.Tensor:
    return logits.new_empty((logits.shape[0], logits.shape[1], library.shape[1]))


def _select_backward(tensors: tuple, options: TokenMixOptions) -> _dispatch.Backend:
    """The backend for (grad, logits, library): by the logits' device and dtype."""
    return _dispatch.select("token_mix", tensors[1].device, tensors[1].dtype)


def _backward_fake(grad, logits, library, options: TokenMixOptions) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.new_empty(logits.shape), library.new_empty(library.shape)


def _setup_context(ctx, tensors: tuple, options: TokenMixOptions, output) -> None:
    ctx.save_for_backward(*tensors)
    ctx.options = options


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _library.call_backward(ctx, token_mix_backward_op, (grad, *ctx.saved_tensors), ctx.options)


token_mix_op = _library.define(TOKEN_MIX, _select, _fake)
token_mix_backward_op = _library.define(TOKEN_MIX_BACKWARD, _select_backward, _backward_fake, method="backward")
_library.register_autograd(token_mix_op, _backward, _setup_context, differentiable=(0, 1))
