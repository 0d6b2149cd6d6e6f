"""The private torch APIs vpfast's op layer uses, each behind one function.

Works on torch 2.14.1, the version tests/test_op_registration.py has run on (vpfast's extension loads on
torch >= 2.10; the shim has not been tested there). Those tests check each function's behaviour, so a
torch release that changes one fails there, in one place. Everything else in vpfast/ops uses public
torch APIs only.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def below_autograd() -> AbstractContextManager:
    """Dispatch below the Autograd keys: an op's autograd kernel calls the op again inside this."""
    return torch._C._AutoDispatchBelowAutograd()


def plain_eager(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether a call with ``tensors`` would reach the op's own kernels unchanged through the dispatcher.

    True outside torch.compile, with no TorchDispatchMode (fake tensors, tracing, functionalization),
    no functorch transform, and only plain tensors (torch.Tensor or nn.Parameter, not meta): then an op
    may call its autograd and backend kernels directly and skip two dispatcher round trips.
    """
    if _is_compiling() or _dispatch_modes() or _functorch_level() is not None:
        return False
    for t in tensors:  # a loop, not all(): this runs on every call
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return True


# Bound once: plain_eager runs on every call, and each attribute lookup on the torch modules costs.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_level = torch._C._functorch.maybe_current_level



def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether the op ``vpfast::name`` has a kernel registered for ``dispatch_key`` (e.g. "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
