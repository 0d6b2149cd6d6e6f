"""compose on CUDA at realistic shapes (B=256, 224 canvas): kernels vs reference, compile, CUDA graphs."""

from __future__ import annotations

import pytest
import torch

import vpfast
from compose_cases import Case, check_backward, check_forward, make_inputs, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.usefixtures("poison"),
]

EVP = Case(batch=256, height=224, width=224, size=224, inner=164)


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "triton")
    vpfast.ops.read_environment()


@pytest.mark.parametrize("case", [
    EVP.but(dtype=torch.uint8, out_dtype=torch.bfloat16),
    EVP,
    EVP.but(mode="bicubic", antialias=True, layout="crop", height=250, width=250),
    EVP.but(dtype=torch.uint8, layout="channels_last", transform=True, out_dtype=torch.bfloat16),
    EVP.but(height=97, width=131, mode="bicubic", channels_last_out=True, transform=True),
    EVP.but(batch=1, prompt_space="normalized", inner=224, mask=False),
    EVP.but(dtype=torch.uint8, mode="bicubic", antialias=True, flip=True, out_dtype=torch.bfloat16),  # EVP's flip
], ids=str)
def test_forward_matches_reference(case):
    check_forward(case, "cuda", seed=hash(str(case)) % 10_000)


@pytest.mark.parametrize("grad_norm", [None, "sample_l2", "sample_l1"])
@pytest.mark.parametrize("grad_region", ["prompt", "canvas"])
@pytest.mark.parametrize("transform", [False, True])
def test_backward_matches_reference(transform, grad_region, grad_norm):
    case = EVP.but(transform=transform)
    check_backward(case, "cuda", 3, grad_region, grad_norm, torch.bfloat16, "channels_last")


def test_backward_large_batch_int64_indexing():
    """B x C x S x S beyond 2**31 elements: offsets must not wrap."""
    case = EVP.but(batch=14_300)  # 14,300 x 3 x 224 x 224 = 2.15e9 elements
    _, prompt, kwargs = make_inputs(case.but(batch=1), "cuda", seed=5)
    grad_out = torch.empty(case.batch, 3, 224, 224, dtype=torch.bfloat16, device="cuda").normal_()
    got = torch.ops.vpfast.compose_backward(grad_out, kwargs["mask"], kwargs["std"], None, "pixel", "prompt",
                                            "none", torch.float32)
    expected = (grad_out.float().sum(0) / kwargs["std"].view(-1, 1, 1)) * kwargs["mask"]
    assert rel_err(got, expected) < 1e-5


def test_compile_fullgraph_and_cuda_graph():
    images, prompt, kwargs = make_inputs(EVP.but(dtype=torch.uint8, transform=True), "cuda", seed=9)
    prompt.requires_grad_(True)

    def step(p):
        y = vpfast.ops.compose(images, p, grad_norm="sample_l2", **kwargs)
        return (y.float() * y.float()).mean()

    loss = step(prompt)
    (grad,) = torch.autograd.grad(loss, prompt)
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(prompt)
    (grad_c,) = torch.autograd.grad(loss_c, prompt)
    assert rel_err(loss_c, loss) < 1e-5 and rel_err(grad_c, grad) < 1e-5

    # A fresh leaf: the autograd graphs above keep the old leaf's AccumulateGrad node, which is bound to the
    # default stream and cannot join a capture.
    static_prompt = prompt.detach().clone().requires_grad_(True)
    kwargs["transform"] = kwargs["transform"].clone()  # graph inputs must be static buffers
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(static_prompt).backward()
    torch.cuda.current_stream().wait_stream(stream)
    static_prompt.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_prompt)
        static_out.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static_out, loss) < 1e-5 and rel_err(static_prompt.grad, grad) < 1e-5


def test_batch_beyond_the_grid_limit():
    """B > 65,535 (CUDA's grid y limit): programs loop over the batch, forward and backward."""
    case = Case(batch=70_000, height=12, width=9, size=16, inner=10, dtype=torch.uint8, out_dtype=torch.bfloat16)
    check_forward(case, "cuda", seed=11)
    check_backward(case.but(dtype=torch.float32, out_dtype=None), "cuda", 12, "prompt", "sample_l2")
