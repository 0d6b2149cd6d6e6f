"""compose's Triton kernels against the reference, on CPU tensors under TRITON_INTERPRET=1 (tiny shapes)."""

from __future__ import annotations

import itertools

import pytest
import torch

from compose_cases import Case, check_backward, check_forward

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("triton_backend", "poison")]

INPUTS = [dict(dtype=torch.float32), dict(dtype=torch.uint8, layout="channels_last"),
          dict(dtype=torch.float16, layout="crop")]

FORWARD_GRID = [Case(mode=mode, antialias=aa, **inp)
                for (mode, aa), inp in itertools.product(itertools.product(("bilinear", "bicubic"), (False, True)),
                                                         INPUTS)]
FORWARD_MORE = [
    Case(transform=True, batch=3, dtype=torch.uint8),
    Case(transform=True, batch=3, mode="bicubic", antialias=True, layout="crop", prompt_space="normalized"),
    Case(transform=True, batch=2, height=6, width=7, antialias=True, out_dtype=torch.bfloat16),
    Case(transform=True, batch=1, mask=False, normalize=False),
    Case(out_dtype=torch.bfloat16, dtype=torch.uint8),
    Case(out_dtype=torch.float16, channels_last_out=True),
    Case(channels_last_out=True, transform=True, batch=2),
    Case(batch=1, size=12, inner=10, offset=(1, 1)),  # p = 1
    Case(offset=(0, 6), fill=0.7, mask=False),
    Case(height=10, width=10),  # no resize
    Case(batch=1, height=97, width=131, size=24, inner=20, dtype=torch.uint8, antialias=True),
    Case(prompt_space="normalized", normalize=False),
]


@pytest.mark.parametrize("case", FORWARD_GRID + FORWARD_MORE, ids=str)
def test_forward_matches_reference(case):
    check_forward(case, "cpu", seed=hash(str(case)) % 10_000)


BACKWARD_CASES = [
    (Case(batch=3), torch.float32, "contiguous"),
    (Case(batch=3, transform=True), torch.bfloat16, "channels_last"),
    (Case(batch=2, transform=True, prompt_space="normalized", normalize=True), torch.float32, "transposed"),
    (Case(batch=1, mask=False), torch.float16, "contiguous"),
]


@pytest.mark.parametrize("grad_norm", [None, "sample_l2", "sample_l1"])
@pytest.mark.parametrize("grad_region", ["prompt", "canvas"])
@pytest.mark.parametrize("case,grad_dtype,grad_layout", BACKWARD_CASES, ids=lambda v: str(v))
def test_backward_matches_reference(case, grad_dtype, grad_layout, grad_region, grad_norm):
    check_backward(case, "cpu", hash(str(case)) % 10_000, grad_region, grad_norm, grad_dtype, grad_layout)


def test_autograd_through_the_kernels():
    import vpfast
    from compose_cases import make_inputs, rel_err
    from vpfast.ops.compose import compose_backward_reference

    images, prompt, kwargs = make_inputs(Case(batch=2, transform=True), seed=41)
    prompt.requires_grad_(True)
    y = vpfast.ops.compose(images, prompt, grad_norm="sample_l2", **kwargs)
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, prompt, grad_out)
    expected = compose_backward_reference(grad_out, kwargs["mask"], kwargs["std"], kwargs["transform"], "pixel",
                                          "prompt", "sample_l2", torch.float64)
    assert rel_err(grad, expected) < 1e-5
