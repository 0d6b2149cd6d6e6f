"""compose: shrink + pad + prompt + normalize (+ per-sample transform) in one op.

The op behind EVP and the pixel prompters (contract: docs/ops.md, compose).
This file holds the argument checks, the reference implementation (plain
PyTorch: the specification and the CPU path), and the op's definition
(vpfast/ops/_library.py): its options, fake, autograd and backends (the
Triton kernels in ``vpfast.kernels.compose`` and the reference).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vpfast.ops import _dispatch, _library

MODES = ("bilinear", "bicubic")
PROMPT_SPACES = ("pixel", "normalized")
GRAD_REGIONS = ("prompt", "canvas")
GRAD_NORMS = (None, "sample_l2", "sample_l1")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLIP_DTYPES = (torch.bool, torch.uint8, torch.int32)
FLIP_WITH_TRANSFORM = "flip and transform cannot both be given: with a transform, flip with its 4th column " \
    "(size, ty, tx, flip)"
GRAD_NORM_EPS = 1e-12
# Membership tests on the hot path: a set of dtypes compares by hash, a tuple by dtype.__eq__ (slower per item).
_IMAGE_DTYPE_SET = frozenset(IMAGE_DTYPES)
_PROMPT_DTYPE_SET = frozenset((torch.float32, torch.float64))


class Layout(NamedTuple):
    """Geometry of the canvas: size S, inner size s and the inner image's offset."""

    size: int
    inner: int
    oy: int
    ox: int


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_int(name: str, value: object) -> None:
    """Raise unless ``value`` is an int (a SymInt under torch.compile); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def check_finite(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite real number (a comparison: it also holds for symbolic floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) \
            or not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def channel_vector(name: str, value, channels: int, device: torch.device, nonzero: bool = False,
                   compiling: bool | None = None):
    """``value`` (a sequence or tensor, one value per channel) as a float32 vector on ``device``.

    Values given on the CPU are checked (finite, and non-zero if ``nonzero``) with one host read, unless
    torch.compile traces the call (``compiling``; None: ask torch).
    """
    if value is None:
        return None
    vec = value if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.dim() == 1 \
        else torch.as_tensor(value, dtype=torch.float32).flatten()
    if vec.numel() != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {vec.numel()} values")
    if not vec.is_cpu:  # is_cpu, not device.type: that builds a string per call
        if vec.device != device:
            raise ValueError(f"{name} is on {vec.device} but images are on {device}")
        return vec
    if not (torch.compiler.is_compiling() if compiling is None else compiling):  # values read without a device sync
        values = vec.tolist()
        if not math.isfinite(sum(values)):  # float32 values: their sum (a double) is finite iff each value is
            raise ValueError(f"{name} must be finite, got {values}")
        if nonzero and not all(values):
            raise ValueError(f"{name} must be non-zero, got {values}")
    return vec if vec.device == device else vec.to(device, non_blocking=True)  # device.type costs more


def check_transform(transform: torch.Tensor, batch: int, size: int) -> None:
    """Raise if any row (size_b, ty_b, tx_b, flip_b) does not fit on an S x S canvas.

    compose calls it for rows given on the CPU; rows already on the device are not
    inspected (that would synchronize), so callers that draw them on the device check them.
    """
    if transform.dim() != 2 or transform.shape != (batch, 4):
        raise ValueError(f"transform must have shape ({batch}, 4) (size, ty, tx, flip per sample), "
                         f"got {tuple(transform.shape)}")
    if transform.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"transform must be int32 or int64, got {transform.dtype}")
    t = transform.detach().cpu().long()
    sizes, ty, tx, flip = t.unbind(1)
    bad = (sizes < 1) | (sizes > size) | (ty < 0) | (tx < 0) | (ty + sizes > size) | (tx + sizes > size)
    bad |= (flip != 0) & (flip != 1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"transform row {row} = {t[row].tolist()} is off the {size} x {size} canvas: "
                         f"need 1 <= size <= {size}, ty, tx >= 0, ty + size <= {size}, tx + size <= {size}, "
                         "flip in {0, 1}")


def compose(
    images: torch.Tensor,
    prompt: torch.Tensor,
    *,
    inner_size: int,
    offset: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
    fill: float = 0.0,
    mode: str = "bilinear",
    antialias: bool = False,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    prompt_space: str = "pixel",
    transform: torch.Tensor | None = None,
    flip: torch.Tensor | None = None,
    grad_region: str = "prompt",
    grad_norm: str | None = None,
    out_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Compose prompted, normalized canvases from a batch of images.

    ``images`` (B, C, H, W) uint8 (0..255) or float (0..1), any strides; ``prompt``
    (C, S, S) float32 (float64 runs the reference). Each image is resized to
    ``inner_size`` x ``inner_size``, placed at ``offset`` (default centered) on an
    S x S canvas filled with ``fill``, the prompt is added where ``mask`` is 1 (in
    pixel or normalized space), the canvas is normalized by ``mean``/``std`` and,
    if ``transform`` rows (size, ty, tx, flip) are given, each sample's resized
    image is first mirrored horizontally if flip (the image only, not the prompt)
    and its canvas is resized and placed on a fresh canvas. ``flip`` ((B,) bool, uint8 or int32;
    non-zero: mirror) flips each flagged sample's resized image the same way without the transform
    path (the cheap way to flip; ``flip`` with ``transform`` is an error: use the transform's flip
    column). Gradients reach only the prompt, shaped by ``grad_region`` and ``grad_norm``.
    Returns (B, C, S, S) in ``out_dtype`` (default: the prompt's dtype) and ``memory_format``.

    compose never synchronizes with the device: values given on the CPU (std,
    transform rows) are checked, values already on the device are not (nor are ``flip``'s).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a 4-d tensor (B, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dtype not in _IMAGE_DTYPE_SET:
        raise ValueError(f"images must have a dtype in {IMAGE_DTYPES}, got {images.dtype}")
    batch, channels, height, width = images.shape
    if batch < 1 or height < 1 or width < 1:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
    prompt_shape = prompt.shape if isinstance(prompt, torch.Tensor) and prompt.dim() == 3 else None
    size = -1 if prompt_shape is None else prompt_shape[2]
    if size < 0 or prompt_shape != (channels, size, size):
        raise ValueError(f"prompt must have shape (C, S, S) with C = {channels} (the images' channels), "
                         f"got {tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__}")
    prompt_dtype = prompt.dtype
    if prompt_dtype not in _PROMPT_DTYPE_SET:
        raise ValueError(f"prompt must be float32 or float64, got {prompt_dtype}")
    device = images.device
    if prompt.device != device:
        raise ValueError(f"prompt is on {prompt.device} but images are on {device}")
    compiling = torch.compiler.is_compiling()  # asked once: values are read on the host only outside torch.compile
    options = compose_options(size, prompt_dtype, inner_size, offset, fill, mode, antialias, prompt_space,
                              grad_region, grad_norm, out_dtype, memory_format, compiling)
    if mask is not None:
        if mask.shape != (size, size):
            raise ValueError(f"mask must have shape ({size}, {size}), got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but images are on {device}")
        if mask.dtype != prompt_dtype:
            mask = mask.to(prompt_dtype)
    mean_t = channel_vector("mean", mean, channels, device, False, compiling)
    std_t = channel_vector("std", std, channels, device, True, compiling)
    if transform is not None:
        if transform.device != device and transform.device.type != "cpu":
            raise ValueError(f"transform is on {transform.device} but images are on {device}")
        if transform.is_cpu and not compiling:  # its values checked without a device sync
            check_transform(transform, batch, size)
        transform = transform.to(device=device, dtype=torch.int32, non_blocking=True).contiguous()
    if flip is not None:
        flip = flip_flags(flip, batch, device, transform is not None)
    return compose_op((images, prompt, mask, mean_t, std_t, transform, flip), options)


def flip_flags(flip: torch.Tensor, batch: int, device: torch.device, with_transform: bool) -> torch.Tensor:
    """``flip`` checked (shape, dtype, device; not its values) as a contiguous (B,) int32 tensor on ``device``."""
    if with_transform:
        raise ValueError(FLIP_WITH_TRANSFORM)
    if not isinstance(flip, torch.Tensor) or flip.shape != (batch,):
        raise ValueError(f"flip must be a tensor of shape ({batch},) (one flag per sample), got "
                         f"{tuple(flip.shape) if isinstance(flip, torch.Tensor) else type(flip).__name__}")
    if flip.dtype not in FLIP_DTYPES:
        raise ValueError(f"flip must have a dtype in {FLIP_DTYPES}, got {flip.dtype}")
    if flip.device != device and not flip.is_cpu:
        raise ValueError(f"flip is on {flip.device} but images are on {device}")
    return flip.to(device=device, dtype=torch.int32, non_blocking=True).contiguous()


# compose_options per distinct arguments (at most _OPTIONS_CACHE_SIZE, then it starts afresh): checking them costs more
# than a lookup. The key holds each number's type next to its value (12.0 == 12, True == 1, but they are refused).
_OPTIONS_CACHE_SIZE = 64
_options_cache: dict[tuple, ComposeOptions] = {}


def compose_options(size: int, prompt_dtype: torch.dtype, inner_size, offset, fill, mode, antialias, prompt_space,
                    grad_region, grad_norm, out_dtype, memory_format, compiling: bool) -> ComposeOptions:
    """compose's non-tensor arguments checked against an S x S canvas (``size``), as the op's options."""
    if compiling:  # symbolic sizes: no cache
        return _check_options(size, prompt_dtype, inner_size, offset, fill, mode, antialias, prompt_space,
                              grad_region, grad_norm, out_dtype, memory_format)
    try:
        key = (size, prompt_dtype, inner_size, type(inner_size), offset if offset is None else
               (type(offset), *((type(v), v) for v in offset)), fill, type(fill), mode, antialias, type(antialias),
               prompt_space, grad_region, grad_norm, out_dtype, memory_format)
        options = _options_cache.get(key)
    except TypeError:  # unhashable or not iterable: the checks say what is wrong
        key = options = None
    if options is None:
        options = _check_options(size, prompt_dtype, inner_size, offset, fill, mode, antialias, prompt_space,
                                 grad_region, grad_norm, out_dtype, memory_format)
        if key is not None:
            if len(_options_cache) >= _OPTIONS_CACHE_SIZE:
                _options_cache.clear()
            _options_cache[key] = options
    return options


def _check_options(size, prompt_dtype, inner_size, offset, fill, mode, antialias, prompt_space, grad_region,
                   grad_norm, out_dtype, memory_format) -> ComposeOptions:
    check_int("inner_size", inner_size)
    if not 0 < inner_size <= size:
        raise ValueError(f"inner_size must be in (0, {size}] (the canvas size S), got {inner_size}")
    if offset is None:
        offset = ((size - inner_size) // 2, (size - inner_size) // 2)
    if not isinstance(offset, (tuple, list)) or len(offset) != 2:
        raise ValueError(f"offset must be a pair (oy, ox) of ints, got {offset!r}")
    check_int("offset[0]", offset[0])
    check_int("offset[1]", offset[1])
    oy, ox = offset
    if not (0 <= oy <= size - inner_size and 0 <= ox <= size - inner_size):
        raise ValueError(f"offset {tuple(offset)} puts the {inner_size} x {inner_size} image off the "
                         f"{size} x {size} canvas: each must be in [0, {size - inner_size}]")
    check_finite("fill", fill)
    check_choice("mode", mode, MODES)
    check_choice("prompt_space", prompt_space, PROMPT_SPACES)
    check_choice("grad_region", grad_region, GRAD_REGIONS)
    check_choice("grad_norm", grad_norm, GRAD_NORMS)
    if out_dtype is None:
        out_dtype = prompt_dtype
    check_choice("out_dtype", out_dtype, OUT_DTYPES)
    check_choice("memory_format", memory_format, (torch.contiguous_format, torch.channels_last))
    return ComposeOptions(inner_size, oy, ox, float(fill), mode, bool(antialias), prompt_space, grad_region,
                          grad_norm or "none", out_dtype, memory_format == torch.channels_last)


# --------------------------------------------------------------------------- reference


def _normalize(t: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    if mean is not None:
        t = t - mean.to(t.dtype).view(-1, 1, 1)
    if std is not None:
        t = t / std.to(t.dtype).view(-1, 1, 1)
    return t


def _normalized_fill(fill: float, channels: int, mean, std, dtype, device) -> torch.Tensor:
    return _normalize(torch.full((channels, 1, 1), fill, dtype=dtype, device=device), mean, std)


def compose_reference(
    images: torch.Tensor,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    transform: torch.Tensor | None,
    layout: Layout,
    fill: float = 0.0,
    mode: str = "bilinear",
    antialias: bool = False,
    prompt_space: str = "pixel",
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward specification (docs/ops.md, compose, steps 1-5), differentiable in every input.

    Computes in float64 when the prompt is float64, else in float32; the caller casts. ``flip`` (B,) flags
    (non-zero: mirror the resized image) is the transform's flip column without the transform.
    """
    dtype = torch.float64 if prompt.dtype == torch.float64 else torch.float32
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255
    batch, channels, height, width = x.shape
    size, s = layout.size, layout.inner
    if (height, width) != (s, s):
        x = F.interpolate(x, size=(s, s), mode=mode, align_corners=False, antialias=antialias)
    flags = transform[:, 3] if transform is not None else flip
    if flags is not None:  # the image flip: the resized image is mirrored before the prompt is added
        x = torch.where(flags.to(device=x.device, dtype=torch.bool).view(-1, 1, 1, 1), x.flip(-1), x)
    canvas = torch.full((batch, channels, size, size), fill, dtype=dtype, device=x.device)
    canvas[:, :, layout.oy:layout.oy + s, layout.ox:layout.ox + s] = x
    visible = prompt.to(dtype) if mask is None else prompt.to(dtype) * mask.to(dtype)
    if prompt_space == "pixel":
        y = _normalize(canvas + visible, mean, std)
    else:
        y = _normalize(canvas, mean, std) + visible
    if transform is None:
        return y
    background = _normalized_fill(fill, channels, mean, std, dtype, x.device)
    rows = []
    for b, (sz, ty, tx, _) in enumerate(transform.tolist()):
        yb = y[b:b + 1]
        if sz != size:
            yb = F.interpolate(yb, size=(sz, sz), mode="bilinear", align_corners=False)
        canvas_b = background.expand(1, channels, size, size).clone()
        canvas_b[:, :, ty:ty + sz, tx:tx + sz] = yb
        rows.append(canvas_b)
    return torch.cat(rows)


def _resize_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights of a 1-d bilinear resize, read off F.interpolate of an identity image."""
    eye = torch.eye(n_in, dtype=dtype, device=device).view(1, 1, n_in, n_in)
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


def transform_adjoint(grad: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to the canvas before the per-sample resize and placement (its transpose).

    The flip column mirrors the image only, which the prompt gradient does not see.
    """
    size = grad.shape[-1]
    out = torch.empty_like(grad)
    for b, (sz, ty, tx, _) in enumerate(transform.tolist()):
        g = grad[b, :, ty:ty + sz, tx:tx + sz]
        if sz != size:
            r = _resize_matrix(size, sz, grad.dtype, grad.device)
            g = r.T @ g @ r
        out[b] = g
    return out


def compose_backward_reference(
    grad_out: torch.Tensor,
    mask: torch.Tensor | None,
    std: torch.Tensor | None,
    transform: torch.Tensor | None,
    prompt_space: str,
    grad_region: str,
    grad_norm: str | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The prompt gradient specification: per-sample gradients over the region, then the batch rule."""
    g = grad_out if grad_out.dtype == dtype else grad_out.to(dtype)  # a no-op .to costs microseconds per call
    if transform is not None:
        g = transform_adjoint(g, transform)
    if prompt_space == "pixel" and std is not None:
        g = g / (std if std.dtype == dtype else std.to(dtype)).view(-1, 1, 1)
    if grad_region == "prompt" and mask is not None:
        g = g * (mask if mask.dtype == dtype else mask.to(dtype))
    if grad_norm in (None, "none"):
        return g.sum(0)
    flat = g.flatten(1)
    scale = flat.norm(dim=1) if grad_norm == "sample_l2" else flat.abs().mean(dim=1)
    return (g / (scale + GRAD_NORM_EPS).view(-1, 1, 1, 1)).sum(0) / g.shape[0]


# --------------------------------------------------------------------------- registration


class ComposeOptions(NamedTuple):
    """compose's non-tensor arguments, as the op ``vpfast::compose`` takes them after its tensors."""

    inner_size: _library.SymInt
    oy: _library.SymInt
    ox: _library.SymInt
    fill: float
    mode: str
    antialias: bool
    prompt_space: str
    grad_region: str
    grad_norm: str  # "none", "sample_l2" or "sample_l1"
    out_dtype: torch.dtype
    channels_last: bool


class ComposeGradOptions(NamedTuple):
    """The options of ``vpfast::compose_backward`` (the prompt gradient), after its tensors."""

    prompt_space: str
    grad_region: str
    grad_norm: str
    prompt_dtype: torch.dtype


COMPOSE = _library.OpDef("compose", ("images", "prompt", "mask?", "mean?", "std?", "transform?", "flip?"),
                         ComposeOptions)
COMPOSE_BACKWARD = _library.OpDef("compose_backward", ("grad_out", "mask?", "std?", "transform?"), ComposeGradOptions)


@functools.lru_cache(maxsize=64)
def _layout(size: int, inner: int, oy: int, ox: int) -> Layout:
    """A Layout per distinct geometry: the reference backend runs per call, and a NamedTuple costs more to build
    than to look up."""
    return Layout(size, inner, oy, ox)


def _reference_forward(images, prompt, mask, mean, std, transform, flip, o: ComposeOptions) -> torch.Tensor:
    layout = _layout(prompt.shape[-1], o.inner_size, o.oy, o.ox)
    y = compose_reference(images, prompt, mask, mean, std, transform, layout, o.fill, o.mode, o.antialias,
                          o.prompt_space, flip)
    if y.dtype == o.out_dtype and not o.channels_last and y.is_contiguous():
        return y  # .to would be a no-op, at a cost per call
    return y.to(dtype=o.out_dtype, memory_format=torch.channels_last if o.channels_last else torch.contiguous_format)


def _reference_backward(grad_out, mask, std, transform, o: ComposeGradOptions) -> torch.Tensor:
    return compose_backward_reference(grad_out, mask, std, transform, o.prompt_space, o.grad_region, o.grad_norm,
                                      o.prompt_dtype)


def _triton_forward(images, prompt, mask, mean, std, transform, flip, o: ComposeOptions) -> torch.Tensor:
    from vpfast.kernels import compose as kernels

    return kernels.compose_forward(
        images, prompt, mask, mean, std, transform, o.inner_size, o.oy, o.ox, o.fill, o.mode, o.antialias,
        o.prompt_space, o.out_dtype, torch.channels_last if o.channels_last else torch.contiguous_format, flip=flip,
    )


def _triton_backward(grad_out, mask, std, transform, o: ComposeGradOptions) -> torch.Tensor:
    from vpfast.kernels import compose as kernels

    return kernels.compose_backward(grad_out, mask, std, transform, o.prompt_space, o.grad_region, o.grad_norm,
                                    GRAD_NORM_EPS)


_dispatch.register("compose", (
    _dispatch.Backend("triton", ("cuda",), (torch.float32,), _triton_forward, _triton_backward,
                      _dispatch.triton_runs_on, modules=("vpfast.kernels.compose",)),
    _dispatch.Backend("reference", _dispatch.DEVICE_TYPES, (torch.float32, torch.float64), _reference_forward,
                      _reference_backward),
))


def _select(tensors: tuple, options: ComposeOptions) -> _dispatch.Backend:
    """The backend for (images, prompt, mask, mean, std, transform, flip): by the images' device, the prompt's dtype."""
    if tensors[6] is not None and tensors[5] is not None:  # flip and transform: the op called directly (compose()
        raise ValueError(FLIP_WITH_TRANSFORM)  # says so earlier)
    return _dispatch.select("compose", tensors[0].device, tensors[1].dtype, tensors, options)


def _compose_fake(images, prompt, mask, mean, std, transform, flip, options: ComposeOptions) -> torch.Tensor:
    size = prompt.shape[-1]
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    return torch.empty((images.shape[0], images.shape[1], size, size), dtype=options.out_dtype, device=images.device,
                       memory_format=memory_format)


def _select_backward(tensors: tuple, options: ComposeGradOptions) -> _dispatch.Backend:
    """The backend for (grad_out, mask, std, transform): by the gradient's device, the prompt's dtype."""
    return _dispatch.select("compose", tensors[0].device, options.prompt_dtype, tensors, options)


def _compose_backward_fake(grad_out, mask, std, transform, options: ComposeGradOptions) -> torch.Tensor:
    return grad_out.new_empty(grad_out.shape[1:], dtype=options.prompt_dtype)


@functools.cache
def _grad_options(prompt_space: str, grad_region: str, grad_norm: str, prompt_dtype: torch.dtype) -> ComposeGradOptions:
    """The backward's options per distinct value (they are built per call, a look-up costs less)."""
    return ComposeGradOptions(prompt_space, grad_region, grad_norm, prompt_dtype)


def _setup_context(ctx, tensors: tuple, options: ComposeOptions, output) -> None:
    _, prompt, mask, _, std, transform, _ = tensors  # the flip mirrors the image only: the gradient does not see it
    ctx.save_for_backward(mask, std, transform)
    ctx.grad_options = _grad_options(options.prompt_space, options.grad_region, options.grad_norm, prompt.dtype)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor]:
    return (_library.call_backward(ctx, compose_backward_op, (grad, *ctx.saved_tensors), ctx.grad_options),)


compose_op = _library.define(COMPOSE, _select, _compose_fake)
compose_backward_op = _library.define(COMPOSE_BACKWARD, _select_backward, _compose_backward_fake, method="backward")
_library.register_autograd(compose_op, _backward, _setup_context, differentiable=(1,))
