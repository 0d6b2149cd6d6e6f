"""compose reference (the spec) against an independent float64 computation; the op on CPU; contracts."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

import vpfast
from compose_cases import Case, make_inputs, reference_args, rel_err
from vpfast.ops.compose import compose_backward_reference, compose_reference

compose_module = importlib.import_module("vpfast.ops.compose")  # vpfast.ops.compose is the function

pytestmark = pytest.mark.cpu


# --------------------------------------------------------------------------- independent float64 model


def _aa_filter(t: float, bicubic: bool) -> float:
    t = abs(t)
    if not bicubic:
        return max(1.0 - t, 0.0)
    a = -0.5
    if t < 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def resize_weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """(n_out, n_in) interpolation weights written from ATen's formulas (align_corners=False)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        if antialias:
            support = (2.0 if mode == "bicubic" else 1.0) * (scale if scale >= 1 else 1.0)
            invscale = 1 / scale if scale >= 1 else 1.0
            center = scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            taps = {j: _aa_filter((j - center + 0.5) * invscale, mode == "bicubic") for j in range(lo, hi)}
            for j, v in taps.items():
                w[i, j] = v / sum(taps.values())
        elif mode == "bilinear":
            src = max(scale * (i + 0.5) - 0.5, 0.0)
            i0 = min(int(src), n_in - 1)
            lam = src - i0
            w[i, i0] += 1 - lam
            w[i, min(i0 + 1, n_in - 1)] += lam
        else:
            src = scale * (i + 0.5) - 0.5
            f = math.floor(src)
            t = src - f
            a = -0.75
            coeffs = [((a * x - 5 * a) * x + 8 * a) * x - 4 * a if k in (0, 3) else ((a + 2) * x - (a + 3)) * x * x + 1
                      for k, x in enumerate((t + 1, t, 1 - t, 2 - t))]
            for k, c in enumerate(coeffs):
                w[i, min(max(f - 1 + k, 0), n_in - 1)] += c
    return w


def independent_forward(images, prompt, kwargs) -> np.ndarray:
    """docs/ops.md compose steps 1-5 in numpy float64 with explicit weight matrices."""
    x = images.double().numpy()
    if images.dtype == torch.uint8:
        x = x / 255
    batch, channels, height, width = x.shape
    size, inner = prompt.shape[-1], kwargs["inner_size"]
    oy, ox = kwargs["offset"] or ((size - inner) // 2,) * 2
    mode, aa = kwargs["mode"], kwargs["antialias"]
    wy, wx = resize_weights(height, inner, mode, aa), resize_weights(width, inner, mode, aa)
    r = np.einsum("yh,bchw,xw->bcyx", wy, x, wx)
    if kwargs.get("transform") is not None:  # the image flip: the resized image mirrored, before the prompt
        flips = kwargs["transform"][:, 3].numpy().astype(bool)
        r[flips] = r[flips][..., ::-1]
    if kwargs.get("flip") is not None:  # compose's flip flags: the same mirror, without a transform
        flips = kwargs["flip"].numpy().astype(bool)
        r[flips] = r[flips][..., ::-1]
    canvas = np.full((batch, channels, size, size), kwargs["fill"])
    canvas[:, :, oy:oy + inner, ox:ox + inner] = r
    p = prompt.double().numpy()
    if kwargs.get("mask") is not None:
        p = p * kwargs["mask"].double().numpy()
    mean = kwargs["mean"].double().numpy()[:, None, None] if kwargs.get("mean") is not None else 0.0
    std = kwargs["std"].double().numpy()[:, None, None] if kwargs.get("std") is not None else 1.0
    y = (canvas + p - mean) / std if kwargs["prompt_space"] == "pixel" else (canvas - mean) / std + p
    if kwargs.get("transform") is None:
        return y
    out = np.empty_like(y)
    background = (np.full((channels, 1, 1), kwargs["fill"]) - mean) / std
    for b, (sz, ty, tx, _) in enumerate(kwargs["transform"].tolist()):
        rw = resize_weights(size, sz, "bilinear", False)
        out[b] = background
        out[b][:, ty:ty + sz, tx:tx + sz] = rw @ y[b] @ rw.T
    return out


FORWARD_CASES = [
    Case(),
    Case(mode="bicubic"),
    Case(antialias=True),
    Case(mode="bicubic", antialias=True),
    Case(height=5, width=7, antialias=True),  # upscaling with antialias
    Case(height=5, width=7, mode="bicubic"),
    Case(dtype=torch.uint8, layout="channels_last"),
    Case(layout="crop", offset=(1, 5), fill=0.0),
    Case(height=10, width=10),  # no resize
    Case(height=10, width=23, mode="bicubic", antialias=True),  # one axis identity
    Case(prompt_space="normalized", normalize=True, mask=False),
    Case(normalize=False),
    Case(transform=True, batch=4),
    Case(transform=True, batch=3, prompt_space="normalized", mode="bicubic"),
    Case(batch=1, size=12, inner=10),  # p = 1
    Case(flip=True, batch=3, height=9, width=5, size=11, inner=7, offset=(1, 3)),
    Case(flip=True, batch=3, mode="bicubic", antialias=True, dtype=torch.uint8, prompt_space="normalized"),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_reference_matches_independent_float64(case):
    images, prompt, kwargs = make_inputs(case, seed=hash(str(case)) % 1000, prompt_dtype=torch.float64)
    ref = compose_reference(*reference_args(images, prompt, kwargs))
    expected = independent_forward(images, prompt, kwargs)
    assert ref.dtype == torch.float64
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_op_on_cpu_is_the_reference(case):
    images, prompt, kwargs = make_inputs(case, seed=7)
    out = vpfast.ops.compose(images, prompt, **kwargs)
    ref = compose_reference(*reference_args(images, prompt, kwargs))
    assert out.shape == (case.batch, 3, case.size, case.size) and out.dtype == torch.float32
    assert rel_err(out, ref) == 0.0


def _per_sample_grads(images, prompt, kwargs, grad_out, grad_region) -> torch.Tensor:
    """g_b by autograd through the reference, one sample at a time (float64)."""
    grads = []
    for b in range(images.shape[0]):
        p = prompt.detach().clone().requires_grad_(True)
        sample_kwargs = dict(kwargs)
        if sample_kwargs.get("transform") is not None:
            sample_kwargs["transform"] = kwargs["transform"][b:b + 1]
        if grad_region == "canvas":
            sample_kwargs["mask"] = None
        y = compose_reference(*reference_args(images[b:b + 1], p, sample_kwargs))
        (g,) = torch.autograd.grad((y * grad_out[b:b + 1]).sum(), p)
        grads.append(g)
    return torch.stack(grads)


@pytest.mark.parametrize("grad_norm", [None, "sample_l2", "sample_l1"])
@pytest.mark.parametrize("grad_region", ["prompt", "canvas"])
@pytest.mark.parametrize("case", [Case(batch=3), Case(batch=3, transform=True, prompt_space="normalized"),
                                  Case(batch=3, transform=True, mode="bicubic", normalize=False)], ids=str)
def test_backward_reference_matches_autograd(case, grad_region, grad_norm):
    images, prompt, kwargs = make_inputs(case, seed=3, prompt_dtype=torch.float64)
    grad_out = torch.randn(case.batch, 3, case.size, case.size, dtype=torch.float64)
    g = _per_sample_grads(images, prompt, kwargs, grad_out, grad_region)
    if grad_norm is None:
        expected = g.sum(0)
    else:
        flat = g.flatten(1)
        scale = flat.norm(dim=1) if grad_norm == "sample_l2" else flat.abs().mean(dim=1)
        expected = (g / (scale + 1e-12)[:, None, None, None]).mean(0)
    got = compose_backward_reference(grad_out, kwargs.get("mask"), kwargs.get("std"), kwargs.get("transform"),
                                     case.prompt_space, grad_region, grad_norm, torch.float64)
    assert rel_err(got, expected) < 1e-12


@pytest.mark.parametrize("case", [Case(batch=2), Case(batch=3, transform=True, mode="bicubic"),
                                  Case(batch=2, prompt_space="normalized", dtype=torch.uint8)], ids=str)
def test_gradcheck_float64(case):
    images, prompt, kwargs = make_inputs(case, seed=5, prompt_dtype=torch.float64)
    prompt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: vpfast.ops.compose(images, p, **kwargs), (prompt,))


@pytest.mark.parametrize("case", [Case(), Case(transform=True, batch=3, dtype=torch.uint8, mask=False),
                                  Case(normalize=False, out_dtype=torch.bfloat16, channels_last_out=True),
                                  Case(flip=True, batch=3, dtype=torch.uint8)], ids=str)
def test_opcheck(case, monkeypatch):
    images, prompt, kwargs = make_inputs(case, seed=11)
    prompt.requires_grad_(True)
    calls = []  # the op's arguments as compose() builds them
    monkeypatch.setattr(compose_module, "compose_op", lambda tensors, options: calls.append((*tensors, *options)))
    vpfast.ops.compose(images, prompt, **kwargs)
    torch.library.opcheck(torch.ops.vpfast.compose.default, calls[0])


@pytest.mark.parametrize("grad_norm", [None, "sample_l2"])
def test_grad_norm_rules_on_the_op(grad_norm):
    case = Case(batch=3)
    images, prompt, kwargs = make_inputs(case, seed=13)
    prompt.requires_grad_(True)
    y = vpfast.ops.compose(images, prompt, grad_norm=grad_norm, grad_region="canvas", **kwargs)
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, prompt, grad_out)
    expected = compose_backward_reference(grad_out, kwargs["mask"], kwargs["std"], None, "pixel", "canvas", grad_norm)
    assert rel_err(grad, expected) == 0.0
    if grad_norm is None:  # canvas region: the gradient reaches pixels the mask hides
        assert bool((grad[:, kwargs["mask"] == 0] != 0).any())


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", [Case(transform=True, batch=3), Case(flip=True, batch=3)], ids=str)
def test_compile_fullgraph_cpu(case, dynamic):
    images, prompt, kwargs = make_inputs(case, seed=17)
    prompt.requires_grad_(True)

    def step(p):
        return vpfast.ops.compose(images, p, **kwargs).square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    loss, loss_c = step(prompt), compiled(prompt)
    (g,) = torch.autograd.grad(loss, prompt)
    (g_c,) = torch.autograd.grad(loss_c, prompt)
    assert rel_err(loss_c, loss) < 1e-6 and rel_err(g_c, g) < 1e-6


def test_identity_transform_rows_change_nothing():
    case = Case(batch=3)
    images, prompt, kwargs = make_inputs(case, seed=19)
    identity = torch.tensor([[case.size, 0, 0, 0]] * case.batch, dtype=torch.int32)
    assert rel_err(vpfast.ops.compose(images, prompt, transform=identity, **kwargs),
                   vpfast.ops.compose(images, prompt, **kwargs)) == 0.0


@pytest.mark.parametrize("case", [Case(batch=3), Case(batch=3, mode="bicubic", antialias=True, dtype=torch.uint8,
                                                  offset=(1, 4), prompt_space="normalized")], ids=str)
def test_flip_mirrors_the_image_not_the_prompt(case):
    """A flip row equals composing the mirrored images unflipped: the prompt stays where it is."""
    images, prompt, kwargs = make_inputs(case, seed=29)
    flip = torch.tensor([1, 0, 1])
    rows = torch.tensor([[case.size, 0, 0, int(f)] for f in flip], dtype=torch.int32)
    mirrored = torch.where(flip.bool().view(-1, 1, 1, 1), images.flip(-1), images)
    got = vpfast.ops.compose(images, prompt, transform=rows, **kwargs)
    assert rel_err(got, vpfast.ops.compose(mirrored, prompt, **kwargs)) < 1e-6
    assert rel_err(got[0], vpfast.ops.compose(images, prompt, **kwargs)[0].flip(-1)) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32])
@pytest.mark.parametrize("case", [Case(batch=3, height=9, width=5, size=11, inner=7, offset=(1, 3)),
                                  Case(batch=3, mode="bicubic", antialias=True, dtype=torch.uint8,
                                       prompt_space="normalized")], ids=str)
def test_flip_flags_mirror_the_image_not_the_prompt(case, dtype):
    """compose's flip flags equal composing the mirrored images unflipped, and the transform's flip column."""
    images, prompt, kwargs = make_inputs(case, seed=31)
    flip = torch.tensor([1, 0, 1], dtype=dtype)
    mirrored = torch.where(flip.bool().view(-1, 1, 1, 1), images.flip(-1), images)
    rows = torch.tensor([[case.size, 0, 0, int(f)] for f in flip], dtype=torch.int32)
    got = vpfast.ops.compose(images, prompt, flip=flip, **kwargs)
    assert rel_err(got, vpfast.ops.compose(mirrored, prompt, **kwargs)) < 1e-6
    assert rel_err(got, vpfast.ops.compose(images, prompt, transform=rows, **kwargs)) == 0.0
    assert rel_err(got[0], vpfast.ops.compose(images, prompt, **kwargs)[0]) > 1e-2


def test_flip_flags_leave_the_prompt_gradient_unchanged():
    images, prompt, kwargs = make_inputs(Case(batch=3), seed=37)
    prompt.requires_grad_(True)
    y = vpfast.ops.compose(images, prompt, flip=torch.tensor([True, False, True]), grad_norm="sample_l2", **kwargs)
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, prompt, grad_out)
    expected = compose_backward_reference(grad_out, kwargs["mask"], kwargs["std"], None, "pixel", "prompt",
                                          "sample_l2")
    assert rel_err(grad, expected) == 0.0


def test_uint8_equals_float_input():
    case = Case(dtype=torch.uint8)
    images, prompt, kwargs = make_inputs(case, seed=23)
    a = vpfast.ops.compose(images, prompt, **kwargs)
    b = vpfast.ops.compose(images.float() / 255, prompt, **kwargs)
    assert rel_err(a, b) < 1e-6


# --------------------------------------------------------------------------- argument errors


def _bad(**changes):
    images, prompt, kwargs = make_inputs(Case(batch=2), seed=29)
    args = {"images": images, "prompt": prompt, **kwargs}
    args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
    return args


BAD_CALLS = [
    (dict(images=lambda a: a["images"][0]), r"images must be a 4-d tensor \(B, C, H, W\), got \(3, 13, 11\)"),
    (dict(images=lambda a: a["images"].int()), r"images must have a dtype in .*got torch.int32"),
    (dict(prompt=lambda a: a["prompt"][:2]), r"prompt must have shape \(C, S, S\) with C = 3.*got \(2, 16, 16\)"),
    (dict(prompt=lambda a: a["prompt"][:, :, :15]), r"prompt must have shape .*got \(3, 16, 15\)"),
    (dict(prompt=lambda a: a["prompt"].half()), r"prompt must be float32 or float64, got torch.float16"),
    (dict(inner_size=17), r"inner_size must be in \(0, 16\] \(the canvas size S\), got 17"),
    (dict(inner_size=0), r"inner_size must be in \(0, 16\]"),
    (dict(offset=(7, 0)), r"offset \(7, 0\) puts the 10 x 10 image off the 16 x 16 canvas: each must be in \[0, 6\]"),
    (dict(offset=(-1, 0)), r"offset \(-1, 0\)"),
    (dict(mask=torch.ones(15, 16)), r"mask must have shape \(16, 16\), got \(15, 16\)"),
    (dict(std=(1.0, 0.0, 1.0)), r"std must be non-zero, got \[1.0, 0.0, 1.0\]"),
    (dict(mean=(0.5, 0.5)), r"mean must have one value per channel \(3\), got 2 values"),
    (dict(mode="nearest"), r"mode must be one of \('bilinear', 'bicubic'\), got 'nearest'"),
    (dict(prompt_space="latent"), r"prompt_space must be one of \('pixel', 'normalized'\), got 'latent'"),
    (dict(grad_region="all"), r"grad_region must be one of \('prompt', 'canvas'\), got 'all'"),
    (dict(grad_norm="l2"), r"grad_norm must be one of \(None, 'sample_l2', 'sample_l1'\), got 'l2'"),
    (dict(out_dtype=torch.int8), r"out_dtype must be one of .*got torch.int8"),
    (dict(transform=torch.zeros(3, 4, dtype=torch.int32)), r"transform must have shape \(2, 4\).*got \(3, 4\)"),
    (dict(transform=torch.tensor([[16, 0, 0, 0], [10, 7, 0, 0]], dtype=torch.int32)),
     r"transform row 1 = \[10, 7, 0, 0\] is off the 16 x 16 canvas"),
    (dict(transform=torch.tensor([[16, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)), r"transform row 1"),
    (dict(transform=torch.tensor([[16, 0, 0, 2], [16, 0, 0, 0]], dtype=torch.int32)), r"transform row 0"),
    (dict(transform=torch.zeros(2, 4)), r"transform must be int32 or int64, got torch.float32"),
    (dict(flip=torch.ones(3, dtype=torch.bool)), r"flip must be a tensor of shape \(2,\) .*got \(3,\)"),
    (dict(flip=torch.ones(2)), r"flip must have a dtype in .*got torch.float32"),
    (dict(flip=torch.ones(2, dtype=torch.bool).to("meta")), r"flip is on meta but images are on cpu"),
    (dict(flip=torch.ones(2, dtype=torch.bool), transform=torch.tensor([[16, 0, 0, 0]] * 2, dtype=torch.int32)),
     r"flip and transform cannot both be given"),
    (dict(prompt=lambda a: a["prompt"].to("meta")), r"prompt is on meta but images are on cpu"),
    (dict(inner_size=True), r"inner_size must be an int, got True \(bool\)"),
    (dict(inner_size=10.0), r"inner_size must be an int, got 10.0 \(float\)"),
    (dict(offset=(3.7, 3)), r"offset\[0\] must be an int, got 3.7 \(float\)"),
    (dict(offset=(3, False)), r"offset\[1\] must be an int, got False \(bool\)"),
    (dict(offset=3), r"offset must be a pair \(oy, ox\) of ints, got 3"),
    (dict(fill=float("nan")), r"fill must be a finite number, got nan"),
    (dict(fill=float("inf")), r"fill must be a finite number, got inf"),
    (dict(fill="0"), r"fill must be a finite number, got '0'"),
    (dict(std=(0.2, float("nan"), 0.3)), r"std must be finite, got \[0.2.*nan, 0.3.*\]"),
    (dict(mean=torch.tensor([0.5, float("inf"), 0.5])), r"mean must be finite, got \[0.5, inf, 0.5\]"),
    (dict(mean=torch.tensor([float("inf"), float("-inf"), 0.5])), r"mean must be finite, got \[inf, -inf, 0.5\]"),
    (dict(std=(float("-inf"), 1.0, 1.0)), r"std must be finite, got \[-inf, 1.0, 1.0\]"),
]


@pytest.mark.parametrize("changes,message", BAD_CALLS, ids=[m[:40] for _, m in BAD_CALLS])
def test_bad_arguments_name_the_argument(changes, message):
    args = _bad(**changes)
    with pytest.raises(ValueError, match=message):
        vpfast.ops.compose(args.pop("images"), args.pop("prompt"), **args)


REMEMBERED = [
    (dict(inner_size=10), dict(inner_size=10.0), r"inner_size must be an int, got 10.0 \(float\)"),
    (dict(offset=(3, 1)), dict(offset=(3, True)), r"offset\[1\] must be an int, got True \(bool\)"),
    (dict(offset=(3, 3)), dict(offset=[3, 3.0]), r"offset\[1\] must be an int, got 3.0 \(float\)"),
]


@pytest.mark.parametrize("good,bad,message", REMEMBERED)
def test_remembered_options_still_refuse_equal_values_of_another_type(good, bad, message):
    """compose checks its options once per distinct value; 10.0 == 10 and True == 1, but they are still refused."""
    for changes in (good, good):  # the second call takes the checked options from the cache
        args = _bad(**changes)
        vpfast.ops.compose(args.pop("images"), args.pop("prompt"), **args)
    args = _bad(**bad)
    with pytest.raises(ValueError, match=message):
        vpfast.ops.compose(args.pop("images"), args.pop("prompt"), **args)


def test_the_largest_finite_float32_mean_and_std_are_accepted():
    """compose checks mean/std through the sum of their values (a double): finite float32 values never overflow it."""
    big = torch.finfo(torch.float32).max
    images, prompt = torch.rand(1, 3, 4, 4), torch.zeros(3, 4, 4)
    out = vpfast.ops.compose(images, prompt, inner_size=4, mean=(big, big, big), std=(big, -big, big))
    assert out.shape == (1, 3, 4, 4)
