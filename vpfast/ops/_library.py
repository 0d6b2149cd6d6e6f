"""The ``vpfast`` op namespace on the Python side: schemas, and autograd kernels at low host cost.

Ops defined here (compose) or in ``csrc/`` (token_mix) get a backend kernel, a fake kernel
(``torch.library.register_fake``) and an autograd kernel from :func:`register_autograd`. That is
what ``torch.library.custom_op`` + ``register_autograd`` set up, and it passes the same checks
(``torch.library.opcheck``, ``torch.compile(fullgraph=True)``, gradcheck), but per call it skips
torch's generic wrapper, which rebuilds the op's argument list once per argument
(``torch._library.utils.fill_defaults``: 125 us per call for compose's 17 arguments, 34 us for
token_mix's 8, on the 2-core CI machine). The wrapper's cost lands on every training step, and
on a GPU it is time the device waits (``bench/test_host_overhead_bench.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LIB = torch.library.Library("vpfast", "FRAGMENT")


def define(schema: str, kernel: Callable) -> None:
    """Define ``vpfast::<schema>`` with ``kernel`` for every backend (it dispatches on the device itself).

    As with ``custom_op``, torch.compile keeps the op opaque and never traces the kernel's frames.
    """
    LIB.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    LIB.impl(schema.split("(", 1)[0], torch._disable_dynamo(kernel), "CompositeExplicitAutograd")


def register_autograd(
    name: str,
    backward: Callable,
    setup_context: Callable[[object, tuple, object], None],
    differentiable: Sequence[int],
) -> None:
    """Register ``vpfast::<name>``'s autograd kernel: ``backward`` and ``setup_context`` as in
    ``torch.library.register_autograd``.

    ``differentiable``: positions of the tensor arguments that can take a gradient. When none of
    them requires one (or grad mode is off) the kernel goes straight to the backend, without
    recording a graph node.
    """
    op = getattr(torch.ops.vpfast, name).default

    def below_autograd(args: tuple):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def forward(ctx, *args):
        output = below_autograd(args)
        setup_context(ctx, args, output)
        return output

    # Named per op, so grad_fn reads vpfast_<name>Backward.
    function = type(f"vpfast_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and any(args[i] is not None and args[i].requires_grad for i in differentiable):
            return function.apply(*args)
        return below_autograd(args)

    LIB.impl(name, autograd_kernel, "Autograd")
