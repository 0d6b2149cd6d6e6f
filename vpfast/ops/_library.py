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

import sys
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
    """A defined op: ``op(tensors, options)`` runs it.

    ``select(tensors, options)`` picks its backend (vpfast/ops/_dispatch.py) and ``method`` names the
    backend's implementation it runs ("forward", or "backward" for a backward op).
    """

    def __init__(self, opdef: OpDef, select: Callable, method: str):
        self.opdef = opdef
        self.select = select
        self.method = method
        self.dispatched = getattr(torch.ops.vpfast, opdef.name).default
        # Set by register_autograd: whether a call records a graph node, and apply(tensors, options, backend), which
        # runs the op through its autograd.Function.
        self.records: Callable[[tuple], bool] = _never
        self.apply: Callable | None = None

    def kernel(self, *args):
        """The op's kernel on every device: its backend's implementation (``args``: tensors, then the options)."""
        return getattr(self.select(args[:-1], args[-1]), self.method)(*args)

    def below_autograd(self, *args):
        """The op below the Autograd keys, through the dispatcher (``args``: tensors, then the options)."""
        with _torch_shim.below_autograd():
            return self.dispatched(*args)

    def __call__(self, tensors: tuple, options: NamedTuple):
        if not _torch_shim.plain_eager(tensors):
            return self.dispatched(*tensors, *options)
        if self.records(tensors):  # the Function's forward runs with grad mode off: no graph inside
            return self.apply(tensors, options, self.select(tensors, options))
        with _torch_shim.below_autograd():
            return self.kernel(*tensors, options)


def _never(tensors: tuple) -> bool:
    return False


@dataclass(frozen=True)
class _Redispatch:
    """Stands in for the backend in the Autograd kernel: the forward goes back through the dispatcher."""

    forward: Callable
    backward: None = None


class _CompilerDisabled:
    """``torch.compiler.disable(fn)``, built on the first call made once torch._dynamo is loaded.

    Disabling at definition time imports torch._dynamo, which took 6 of the 11 s of ``import vpfast`` on the
    2-core machine. Until something imports it nothing can trace the kernel's frames, so calls run ``fn`` directly.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn, self.disabled = fn, None

    def __call__(self, *args):
        if self.disabled is None:
            if "torch._dynamo" not in sys.modules:
                return self.fn(*args)
            self.disabled = torch.compiler.disable(self.fn)
        return self.disabled(*args)


def define(opdef: OpDef, select: Callable, fake: Callable, method: str = "forward") -> Op:
    """Define ``opdef``: its kernel runs ``select(tensors, options).<method>`` on every device; ``fake``.

    As with ``custom_op``, torch.compile keeps the op opaque and never traces the kernel's frames.
    """
    LIB.define(opdef.schema(), tags=(torch.Tag.pt2_compliant_tag,))
    op = Op(opdef, select, method)
    LIB.impl(opdef.name, _CompilerDisabled(_unboxed(opdef, op.kernel)), "CompositeExplicitAutograd")
    torch.library.register_fake(opdef.qualname, _unboxed(opdef, fake), lib=LIB)
    return op


def call_backward(ctx: Any, op: Op, tensors: tuple, options: NamedTuple):
    """Run the backward op ``op`` from an autograd ``backward`` (``tensors``: the gradient, then tensors the forward
    saved): in plain eager mode directly on the backend the forward ran (saved by the Function's forward as
    ``ctx.backend``), else through ``op``. A forward that ran on its backend directly had plain tensors: only the
    gradient and the modes are checked again."""
    backward = ctx.backend.backward
    if backward is not None and _torch_shim.plain_eager(tensors[:1]):
        return backward(*tensors, options)
    return op(tensors, options)


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
    can take one), computed with :func:`call_backward`. When none of them requires a gradient (or grad
    mode is off) the op runs without recording a graph node.
    """
    count = len(op.opdef.tensors)
    picks = tuple(differentiable)

    def forward(ctx, *args):  # args: the differentiable tensors, then the call (tensors, options, backend)
        tensors, options, backend = args[-1]
        ctx.backend = backend
        output = backend.forward(*tensors, options)
        setup_context(ctx, tensors, options, output)
        return output

    def backward_all(ctx, *grads):  # one gradient per differentiable tensor, none for the call
        return *backward(ctx, *grads), None

    def records(tensors: tuple) -> bool:
        if torch.is_grad_enabled():
            for i in picks:  # a loop, not any(): this runs on every call
                if tensors[i] is not None and tensors[i].requires_grad:
                    return True
        return False

    # Named per op, so grad_fn reads vpfast_<name>Backward. Autograd sees only the differentiable tensors (each more
    # input costs it per call); the others travel in the call, and setup_context saves those the backward needs.
    function = type(f"vpfast_{op.opdef.name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_all)})

    def apply(tensors: tuple, options: NamedTuple, backend) -> torch.Tensor:
        return function.apply(*map(tensors.__getitem__, picks), (tensors, options, backend))

    op.apply = apply
    op.records = records

    def below(*args):
        return op.below_autograd(*args[:count], *args[count])

    redispatch = _Redispatch(below)

    def autograd_kernel(*args):
        tensors, options = args[:-1], args[-1]
        if records(tensors):
            return apply(tensors, options, redispatch)
        return below(*tensors, options)

    LIB.impl(op.opdef.name, _unboxed(op.opdef, autograd_kernel), "Autograd")
