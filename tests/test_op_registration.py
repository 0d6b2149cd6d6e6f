"""The ops' autograd kernels (vpfast/ops/_library.py): a graph node only when a gradient is wanted,
gradients only for the differentiable inputs, and the op bodies opaque to torch.compile."""

from __future__ import annotations

import pytest
import torch

import vpfast
from vpfast import _extension

pytestmark = pytest.mark.cpu


def _compose_inputs():
    images = torch.rand(2, 3, 6, 6)
    prompt = torch.randn(3, 8, 8)
    return images, prompt


def test_compose_records_a_node_only_when_the_prompt_wants_a_gradient():
    images, prompt = _compose_inputs()
    images.requires_grad_(True)  # not differentiable through the op: no node for it alone
    assert vpfast.ops.compose(images, prompt, inner_size=6).grad_fn is None
    prompt.requires_grad_(True)
    with torch.no_grad():
        assert vpfast.ops.compose(images, prompt, inner_size=6).grad_fn is None
    y = vpfast.ops.compose(images, prompt, inner_size=6)
    assert type(y.grad_fn).__name__ == "vpfast_composeBackward"
    (grad_prompt,) = torch.autograd.grad(y.sum(), prompt)
    assert torch.equal(grad_prompt, torch.full_like(prompt, 2.0))  # two samples, each adds the prompt


@pytest.mark.skipif(not _extension.status().loaded, reason="needs the compiled extension")
def test_token_mix_gradients_reach_exactly_the_inputs_that_want_them():
    logits, library = torch.randn(2, 3, 5), torch.randn(5, 4, requires_grad=True)
    y = vpfast.ops.token_mix(logits, library)
    assert type(y.grad_fn).__name__ == "vpfast_token_mixBackward"
    assert torch.autograd.grad(y.sum(), library)[0].shape == library.shape
    with torch.no_grad():
        assert vpfast.ops.token_mix(logits, library).grad_fn is None
    assert vpfast.ops.token_mix(logits, library.detach()).grad_fn is None


def test_compose_kernel_is_opaque_to_torch_compile():
    images, prompt = _compose_inputs()
    explained = torch._dynamo.explain(lambda p: vpfast.ops.compose(images, p, inner_size=6))(prompt)
    assert explained.graph_break_count == 0
    targets = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes]
    assert "vpfast.compose" in targets
    assert not any("interpolate" in target for target in targets)  # the reference inside was not traced
