"""vpfast ops: argument checks, references (the spec), torch.library registration and dispatch."""

from vpfast.ops.compose import compose, compose_backward_reference, compose_reference
from vpfast.ops.token_mix import token_mix, token_mix_reference

__all__ = ["compose", "compose_reference", "compose_backward_reference", "token_mix", "token_mix_reference"]
