"""vpfast ops: argument checks, references (the spec), op definitions and backend selection.

``OPS`` is the one list of ops (name -> backends, filled as each op module is imported here): the
ahead-of-time compile, the self-test, the test configuration and ``vpfast info`` all read it.
``read_environment()`` re-reads ``VPFAST_BACKEND`` and ``TRITON_INTERPRET`` (read once, at import).
"""

from vpfast.ops._dispatch import OPS, kernel_modules, read_environment
from vpfast.ops.compose import compose, compose_backward_reference, compose_reference
from vpfast.ops.token_mix import token_mix, token_mix_backward_reference, token_mix_reference

__all__ = ["OPS", "kernel_modules", "read_environment", "compose", "compose_reference", "compose_backward_reference",
           "token_mix", "token_mix_reference", "token_mix_backward_reference"]
