"""Define a vpfast op once, in Python: schema, backend kernel, fake and autograd, at low host cost.

An op is an :class:`OpDef`: a name, its tensor arguments and one typed ``NamedTuple`` of options; the
schema is generated from them, and every kernel, fake and autograd function takes
``(*tensors, options)``. :func:`define` registers it in the ``vpfast`` namespace the way
``torch.library.custom_op`` + ``register_autograd`` would (``opcheck``, ``torch.compile(fullgraph=True)``
and gradcheck pass), without custom_op's per-call wrapper (it rebuilds the argument list once per
argument). In plain eager mode (``_torch_shim.plain_eager``) :meth:`Op.__call__` also skips the
dispatcher and calls the autograd and backend kernels directly; anything else (torch.compile, fake
tensors, tracing modes, subclasses) goes through the dispatcher. :func:`declare` defines the schema of
an op whose kernels the compiled extension ``vpfast._C`` registers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple, get_origin, get_type_hints

import torch

from vpfast.ops import _torch_shim

LIB = torch.library.Library("vpfast", "FRAGMENT")

SymInt = Annotated[int, "SymInt"]  # an int option that torch.compile may keep symbolic (dynamic shapes)
_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str", torch.dtype: "ScalarType"}

# Ops whose kernels the compiled extension provides (declare()), as "vpfast::name".
EXTENSION_OPS: list[str] = []


@dataclass(frozen=True)
class OpDef:
    """``vpfast::<name>(*tensors, *options) -> returns``; a tensor name ending in "?" is optional."""

    name: str
    tensors: tuple[str, ...]
    options: type[NamedTuple]
    returns: str = "Tensor"

    @property
    def qualname(self) -> str:
        return f"vpfast::{self.name}"

    def schema(self) -> str:
        hints = get_type_hints(self.options, include_extras=True)
        args = [f"Tensor? {t[:-1]}" if t.endswith("?") else f"Tensor {t}" for t in self.tensors]
        args += [f"{_schema_type(hints[field])} {field}" for field in self.options._fields]
        return f"{self.name}({', '.join(args)}) -> {self.returns}"


def _schema_type(hint: Any) -> str:
    if get_origin(hint) is Annotated:
        return hint.__metadata__[0]
    return _SCHEMA_TYPES[hint]


def _unboxed(opdef: OpDef, fn: Callable) -> Callable:
    """``fn(*tensors, options)`` as the dispatcher calls it: ``(*tensors, *options)``."""
    count, make = len(opdef.tensors), opdef.options._make

    def unboxed(*args):
        return fn(*args[:count], make(args[count:]))

    return unboxed


class Op:
    """A defined op: ``op(tensors, options)`` runs it; ``op.kernel`` is its backend kernel."""

    def __init__(self, opdef: OpDef, kernel: Callable):
        self.opdef = opdef
        self.kernel = kernel
        self.dispatched = getattr(torch.ops.vpfast, opdef.name).default
        self.autograd: Callable | None = None  # (tensors, options, run) -> output, set by register_autograd

    def below_autograd(self, *args):
        """The op below the Autograd keys, through the dispatcher (``args``: tensors, then options)."""
        with _torch_shim.below_autograd():
            return self.dispatched(*args)

    def direct(self, *args):
        """The backend kernel below the Autograd keys, called directly (``args``: tensors, then the options)."""
        with _torch_shim.below_autograd():
            return self.kernel(*args)

    def __call__(self, tensors: tuple, options: NamedTuple):
        if not _torch_shim.plain_eager(tensors):
            return self.dispatched(*tensors, *options)
        if self.autograd is None:
            return self.direct(*tensors, options)
        return self.autograd(tensors, options, self.direct)


def define(opdef: OpDef, kernel: Callable, fake: Callable) -> Op:
    """Define ``opdef`` with ``kernel`` for every device (it selects its backend itself) and ``fake``.

    As with ``custom_op``, torch.compile keeps the op opaque and never traces the kernel's frames.
    """
    LIB.define(opdef.schema(), tags=(torch.Tag.pt2_compliant_tag,))
    LIB.impl(opdef.name, torch.compiler.disable(_unboxed(opdef, kernel)), "CompositeExplicitAutograd")
    torch.library.register_fake(opdef.qualname, _unboxed(opdef, fake), lib=LIB)
    return Op(opdef, kernel)


def declare(opdef: OpDef) -> Callable:
    """Define ``opdef``'s schema for kernels that ``vpfast._C`` registers; returns the op to call."""
    LIB.define(opdef.schema())
    EXTENSION_OPS.append(opdef.qualname)
    return getattr(torch.ops.vpfast, opdef.name).default


def register_autograd(
    op: Op,
    backward: Callable,
    setup_context: Callable[[Any, tuple, NamedTuple, Any], None],
    differentiable: Sequence[int],
) -> None:
    """Register ``op``'s autograd kernel.

    ``setup_context(ctx, tensors, options, output)`` saves what ``backward(ctx, *grads)`` needs;
    ``backward`` returns one gradient per position in ``differentiable`` (the tensor arguments that
    can take one). When none of them requires a gradient (or grad mode is off) the op runs without
    recording a graph node.
    """
    count = len(op.opdef.tensors)

    def forward(ctx, *args):  # args: the tensors, the options, the runner
        output = args[-1](*args[:-1])
        setup_context(ctx, args[:count], args[count], output)
        return output

    def backward_all(ctx, *grads):
        out: list = [None] * (count + 2)  # the tensors, then the options and the runner
        for position, grad in zip(differentiable, backward(ctx, *grads), strict=True):
            out[position] = grad
        return tuple(out)

    # Named per op, so grad_fn reads vpfast_<name>Backward.
    function = type(f"vpfast_{op.opdef.name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_all)})

    def autograd(tensors: tuple, options: NamedTuple, run: Callable):
        if torch.is_grad_enabled():
            for i in differentiable:  # a loop, not any(): this runs on every call
                if tensors[i] is not None and tensors[i].requires_grad:
                    return function.apply(*tensors, options, run)
        return run(*tensors, options)

    def below(*args):
        return op.below_autograd(*args[:count], *args[count])

    op.autograd = autograd
    LIB.impl(op.opdef.name, _unboxed(op.opdef, lambda *a: autograd(a[:-1], a[-1], below)), "Autograd")
