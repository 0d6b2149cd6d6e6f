"""token_mix on CUDA at PGN's shapes (B=256, M=16, N in {256, 1024}, d=768): the CUDA kernels against
the reference, torch.compile(fullgraph=True) and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

import vpfast
from compose_cases import rel_err
from test_token_mix import _grads, eager_in_dtype, make_inputs
from vpfast import _extension, _warn
from vpfast.ops.token_mix import token_mix_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not _extension.status().has_cuda, reason="vpfast._C has no CUDA kernels"),
]

BATCH, TOKENS, DIM = 256, 16, 768
CASES = [{}, dict(gumbel=True, seed=5, topk=32, tau=0.5), dict(hard=True, gumbel=True, seed=6),
         dict(activation="sigmoid", tau=2.0)]


@pytest.fixture(autouse=True)
def _extension_backend(monkeypatch):
    monkeypatch.setenv("VPFAST_BACKEND", "cuda")
    vpfast.ops.read_environment()


def _cuda_inputs(n: int, dtype: torch.dtype, seed: int):
    logits, library = make_inputs((BATCH, TOKENS, n, DIM), dtype, seed)
    grad = torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return logits.cuda(), library.cuda(), grad.cuda()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [256, 1024])
def test_kernels_match_reference(n, dtype, case):
    """Against the reference computed in float32 from the same inputs: it takes the kernels' top-k and argmax
    decisions (a float64 S can order near-ties differently). bfloat16: no worse than twice eager PyTorch's
    error in bfloat16."""
    logits, library, grad = _cuda_inputs(n, dtype, seed=n + len(case))
    got = _grads(vpfast.ops.token_mix, logits, library, grad, case)
    target = _grads(token_mix_reference, logits.float(), library.float(), grad.float(), case)
    if dtype == torch.float32:
        for g, x in zip(got, target, strict=True):
            assert g.dtype == dtype and rel_err(g, x) < 1e-5
        return
    eager = _grads(eager_in_dtype, logits, library, grad, case)
    for g, x, e in zip(got, target, eager, strict=True):
        assert g.dtype == dtype and rel_err(g, x) <= 2 * max(rel_err(e, x), torch.finfo(dtype).eps)


def test_float64_on_cuda_runs_the_reference(monkeypatch):
    monkeypatch.delenv("VPFAST_BACKEND")  # forcing cuda would raise: the CUDA kernels do not take float64
    vpfast.ops.read_environment()
    monkeypatch.setattr(_warn, "_warned", set())
    logits, library, _ = _cuda_inputs(256, torch.float64, seed=1)
    with pytest.warns(RuntimeWarning, match="token_mix with float64 cuda tensors runs the reference backend"):
        out = vpfast.ops.token_mix(logits[:2], library, topk=8)
    assert torch.equal(out, token_mix_reference(logits[:2], library, topk=8))


def test_compile_fullgraph_and_cuda_graph():
    logits, library, _ = _cuda_inputs(256, torch.bfloat16, seed=2)

    def step(z, t):
        p = vpfast.ops.token_mix(z, t, gumbel=True, seed=3, topk=32, tau=0.5)
        return (p.float() * p.float()).mean()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        z, t = logits.clone().requires_grad_(True), library.clone().requires_grad_(True)
        loss = fn(z, t)
        results.append((loss, *torch.autograd.grad(loss, (z, t))))
    for eager, compiled in zip(*results, strict=True):
        assert rel_err(compiled, eager) < 1e-5

    z, t = logits.clone().requires_grad_(True), library.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(z, t).backward()
    torch.cuda.current_stream().wait_stream(stream)
    z.grad = t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(z, t)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    loss, grad_z, grad_t = results[0]
    assert rel_err(static_loss, loss) < 1e-5 and rel_err(z.grad, grad_z) < 1e-5 and rel_err(t.grad, grad_t) < 1e-5


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_no_batch_sized_temporaries(backward):
    """Beyond its outputs, an op allocates less than one B x M x N tensor (row statistics and the
    forward's bounded workspace), whatever cuBLAS keeps cached after a warm-up call."""
    logits, library, grad = _cuda_inputs(1024, torch.bfloat16, seed=7)
    args = (logits, library, 1.0, True, 3, 0, False, "softmax")

    def call():
        if backward:
            return torch.ops.vpfast.token_mix_backward(grad, *args)
        return (torch.ops.vpfast.token_mix(*args),)

    call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outputs = call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - sum(o.nbytes for o in outputs)
    assert extra < logits.nbytes
