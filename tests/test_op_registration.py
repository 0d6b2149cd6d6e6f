"""The op layer (vpfast/ops/_library.py, _torch_shim.py): schemas from typed options, a graph node only when a
gradient is wanted, gradients only for the differentiable inputs, op bodies opaque to torch.compile, the direct
eager path equal to the dispatcher's, and the private-API shim's behaviours."""
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
    assert "vpfast.compose.default" in targets
    assert not any("interpolate" in target for target in targets)  # the reference inside was not traced


# --------------------------------------------------------------------------- one way to define an op


def test_schemas_come_from_the_typed_options():
    from vpfast.ops.compose import COMPOSE, COMPOSE_BACKWARD
    from vpfast.ops.token_mix import TOKEN_MIX_BACKWARD

    assert COMPOSE.schema() == (
        "compose(Tensor images, Tensor prompt, Tensor? mask, Tensor? mean, Tensor? std, Tensor? transform, "
        "Tensor? flip, SymInt inner_size, SymInt oy, SymInt ox, float fill, str mode, bool antialias, "
        "str prompt_space, str grad_region, str grad_norm, ScalarType out_dtype, bool channels_last) -> Tensor")
    assert COMPOSE_BACKWARD.schema() == (
        "compose_backward(Tensor grad_out, Tensor? mask, Tensor? std, Tensor? transform, str prompt_space, "
        "str grad_region, str grad_norm, ScalarType prompt_dtype) -> Tensor")
    assert TOKEN_MIX_BACKWARD.schema() == (
        "token_mix_backward(Tensor grad, Tensor logits, Tensor library, float tau, bool gumbel, int seed, int topk, "
        "bool hard, str activation) -> (Tensor, Tensor)")
    assert str(torch.ops.vpfast.compose.default._schema).startswith("vpfast::" + COMPOSE.schema()[:40])


def test_extension_ops_are_declared_in_python():
    from vpfast.ops import _library

    assert _library.EXTENSION_OPS == ["vpfast::_ext_token_mix", "vpfast::_ext_token_mix_backward"]
    schema = str(torch.ops.vpfast._ext_token_mix.default._schema)
    assert schema.startswith("vpfast::_ext_token_mix(Tensor logits, Tensor library, float tau")


def test_the_direct_eager_path_and_the_dispatcher_agree():
    """Op.__call__ skips the dispatcher in plain eager mode; through torch.ops the same kernels run."""
    from vpfast.ops.compose import ComposeOptions, compose_op

    images, prompt = _compose_inputs()
    prompt.requires_grad_(True)
    options = ComposeOptions(6, 1, 1, 0.5, "bilinear", False, "pixel", "prompt", "sample_l2", torch.float32, True)
    mask = (torch.rand(8, 8) > 0.5).float()
    tensors = (images, prompt, mask, None, torch.rand(3) + 0.5, None, None)
    direct = compose_op(tensors, options)
    dispatched = torch.ops.vpfast.compose(*tensors, *options)
    assert type(direct.grad_fn).__name__ == type(dispatched.grad_fn).__name__ == "vpfast_composeBackward"
    assert torch.equal(direct, dispatched) and direct.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(direct)
    assert torch.equal(torch.autograd.grad(direct, prompt, grad)[0], torch.autograd.grad(dispatched, prompt, grad)[0])


def test_the_op_refuses_flip_with_transform():
    from vpfast.ops.compose import ComposeOptions

    images, prompt = _compose_inputs()
    options = ComposeOptions(6, 1, 1, 0.5, "bilinear", False, "pixel", "prompt", "none", torch.float32, False)
    rows = torch.tensor([[8, 0, 0, 0]] * images.shape[0], dtype=torch.int32)
    flags = torch.zeros(images.shape[0], dtype=torch.int32)
    with pytest.raises(ValueError, match="flip and transform cannot both be given"):
        torch.ops.vpfast.compose(images, prompt, None, None, None, rows, flags, *options)


# --------------------------------------------------------------------------- the private-API shim


def test_shim_below_autograd_skips_the_autograd_kernel():
    from vpfast.ops import _torch_shim

    x = torch.ones(2, requires_grad=True)
    with _torch_shim.below_autograd():
        assert (x * 2).grad_fn is None
    assert (x * 2).grad_fn is not None


def test_shim_plain_eager_sees_modes_subclasses_transforms_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from vpfast.ops import _torch_shim

    x = torch.ones(2)
    assert _torch_shim.plain_eager((x, None, torch.nn.Parameter(x)))
    assert not _torch_shim.plain_eager((x, torch.ones(2, device="meta")))
    with FakeTensorMode() as mode:
        assert not _torch_shim.plain_eager((x,))
        assert not _torch_shim.plain_eager((mode.from_tensor(x),))
    seen = []
    make_fx(lambda t: seen.append(_torch_shim.plain_eager((t,))) or t + 1)(x)
    torch.func.grad(lambda t: seen.append(_torch_shim.plain_eager((t,))) or t.sum())(x)
    torch.compile(lambda t: seen.append(_torch_shim.plain_eager((t,))) or t + 1, backend="eager")(x)
    assert seen == [False, False, False]


def test_shim_has_kernel_reads_the_dispatcher():
    from vpfast.ops import _torch_shim

    assert _torch_shim.has_kernel("vpfast::compose", "CompositeExplicitAutograd")
    assert _torch_shim.has_kernel("vpfast::compose", "Autograd")
    assert not _torch_shim.has_kernel("vpfast::compose_backward", "Autograd")


def test_ops_run_under_fake_tensors_through_their_fakes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    images, prompt = _compose_inputs()
    with FakeTensorMode() as mode:
        out = vpfast.ops.compose(mode.from_tensor(images), mode.from_tensor(prompt), inner_size=6)
    assert out.shape == (2, 3, 8, 8)


def test_eager_backward_runs_on_the_backend_the_forward_ran(monkeypatch):
    """In plain eager mode the backward calls the forward's backend directly (_library.call_backward): it does
    not select again, so forcing a backend that cannot run here between forward and backward changes nothing."""
    images, prompt = _compose_inputs()
    prompt.requires_grad_(True)
    y = vpfast.ops.compose(images, prompt, inner_size=6)
    monkeypatch.setenv("VPFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a selection now would raise: Triton cannot run CPU tensors
    vpfast.ops.read_environment()
    (grad_prompt,) = torch.autograd.grad(y.sum(), prompt)
    assert torch.equal(grad_prompt, torch.full_like(prompt, 2.0))
    with pytest.raises(RuntimeError, match="VPFAST_BACKEND=triton cannot run compose on cpu"):
        vpfast.ops.compose(images, prompt, inner_size=6)


def test_private_apis_are_used_only_through_the_shim():
    """No module of vpfast/ops but _torch_shim.py reaches into a private attribute (torch._C, os.environ._data, ...)
    or imports from a private module; NamedTuple's public _fields/_make are not private."""
    import ast
    from pathlib import Path

    import vpfast.ops

    public_underscored = {"_fields", "_make"}
    found = []
    for path in sorted(Path(vpfast.ops.__file__).parent.glob("*.py")):
        if path.name == "_torch_shim.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in public_underscored:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("vpfast") \
                    and any(part.startswith("_") and not part.startswith("__") for part in node.module.split(".")):
                found.append(f"{path.name}:{node.lineno} from {node.module}")
    assert not found
