"""token_mix: PGN token-library soft sampling, ``P = A @ T`` with ``A = softmax((Z + G) / tau)``.

The op behind PGN's prompt generator (contract: docs/ops.md, token_mix; docs/methods.md, PGN). This
file holds the argument checks, the reference implementation (plain PyTorch: the specification, on
any device, float64-capable), the Gumbel noise both share with the compiled kernels, the fake and
autograd registrations of the compiled ops ``vpfast::token_mix`` / ``vpfast::token_mix_backward``
(defined in ``csrc/``) and the dispatch between the two.
"""

from __future__ import annotations

import math

import torch

from vpfast import _extension
from vpfast.ops import _dispatch, _library

ACTIVATIONS = ("softmax", "sigmoid")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SEED_LIMIT = 2**63  # the op schema's seed is an int64
_MASK32 = 0xFFFFFFFF

_dispatch.register_op("token_mix", {"cpu": ("cuda",), "cuda": ("cuda",)})


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

    Backends (``vpfast info``): the compiled extension ``vpfast._C`` (a C++ kernel for CPU tensors;
    for float32, bfloat16 and float16 CUDA tensors, row kernels around cuBLAS products; float64 on
    CUDA runs the reference), else the reference with a one-time warning;
    ``VPFAST_BACKEND=reference`` forces the reference. On CUDA one warp per row computes the row's
    statistics (max, normalizer, top-k threshold, argmax) and weights; the three products go to
    ``aten::mm`` (tensor cores, float32 accumulation, the user's matmul precision settings). No
    B x M x N tensor is allocated besides dZ: the forward writes its weights in chunks of at most
    2**19 entries, the backward keeps them in dZ's own storage and recomputes A from Z and the row
    statistics (csrc/cuda/token_mix_kernels.cuh).

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
    if not gumbel:
        seed = None
    if _use_extension(logits.device, logits.dtype):
        return torch.ops.vpfast.token_mix(logits, library, float(tau), gumbel, seed or 0, topk or 0, hard,
                                          activation)
    return token_mix_reference(logits, library, tau=tau, gumbel=gumbel, seed=seed, topk=topk, hard=hard,
                               activation=activation)


@torch.compiler.assume_constant_result
def _use_extension(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this call runs the compiled kernels (dispatch picks them and they take the dtype).

    A constant for torch.compile (read once while tracing, not traced into), so the choice costs
    no graph break; a compiled function keeps the backend it was traced with.
    """
    if _dispatch.choose("token_mix", device) != "cuda":
        return False
    if device.type == "cuda" and dtype == torch.float64:
        _dispatch.warn_once("token_mix:cuda:float64", "vpfast: token_mix with float64 CUDA tensors runs the "
                                                      "reference (the CUDA kernels take float32, bfloat16, float16)")
        return False
    return True


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


# --------------------------------------------------------------------------- compiled ops


def _fake(logits, library, tau, gumbel, seed, topk, hard, activation):
    return logits.new_empty((logits.shape[0], logits.shape[1], library.shape[1]))


def _backward_fake(grad, logits, library, tau, gumbel, seed, topk, hard, activation):
    return logits.new_empty(logits.shape), library.new_empty(library.shape)


def _setup_context(ctx, inputs, output) -> None:
    logits, library, *options = inputs
    ctx.save_for_backward(logits, library)
    ctx.options = options


def _backward(ctx, grad: torch.Tensor):
    logits, library = ctx.saved_tensors
    grad_logits, grad_library = torch.ops.vpfast.token_mix_backward(grad, logits, library, *ctx.options)
    return (grad_logits, grad_library) + (None,) * len(ctx.options)


if _extension.status().loaded:  # the ops exist only in the compiled extension
    torch.library.register_fake("vpfast::token_mix", _fake, lib=_library.LIB)
    torch.library.register_fake("vpfast::token_mix_backward", _backward_fake, lib=_library.LIB)
    _library.register_autograd("token_mix", _backward, _setup_context, differentiable=(0, 1))
