"""Triton kernels for compose (docs/ops.md, compose) and their launchers.

Forward: one pass; each output element is computed from the source image
through the cache (resize taps, placement, prompt, normalization and the
optional per-sample flip/resize/placement) and written once. Backward: the
prompt gradient in one pass over the incoming gradient (two for the
per-sample norms), accumulated in float32 without B x C x S x S temporaries.
Interpolation follows ATen's float32 formulas (align_corners=False), the
antialiased ones included.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import AotCase, Launch

_empty = torch.empty  # every allocation goes through here, so tests can poison it

NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # occupancy the launchers assume; the aot tier checks registers against it


def blocks(capability: int) -> dict[tuple[str, bool], int]:
    """Pixels per program by (direction, per-sample transform) on a GPU of compute capability ``capability``.

    Sized so every kernel fits 65536 / (PROGRAMS_PER_SM * NUM_WARPS * 32) = 128 registers per thread
    without spills (the aot tier checks it). The plain forward writes 8 bf16 pixels (128 bits) per
    thread at 256 pixels on sm_90; sm_80's code needs 168 registers for that, so it takes 128 (64-bit
    bf16 stores).
    """
    forward = 256 if capability >= 90 else 128
    return {("forward", False): forward, ("forward", True): 128, ("backward", False): 1024, ("backward", True): 128}


TRANSFORM_TAPS = 5  # candidate rows/columns per pre-transform pixel in the adjoint (covers S/size >= 1)
# With the transform, coordinates round as ATen's float32 ones do: IEEE division for S / size and no FMA
# contraction (enable_fp_fusion=False). A resized canvas is ill-conditioned in its coordinates: one ulp of a
# source coordinate near 200 (1.5e-5) times a jump of ~10 between neighbouring normalized pixels moved the
# output by 5e-5 of its range on an H100 before this.


# --------------------------------------------------------------------------- interpolation taps


@triton.jit
def _cubic1(t, A: tl.constexpr):
    return ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0


@triton.jit
def _cubic2(t, A: tl.constexpr):
    return ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A


@triton.jit
def _aa_filter(t, BICUBIC: tl.constexpr):
    t = tl.abs(t)
    if BICUBIC:
        w = tl.where(t < 1.0, _cubic1(t, -0.5), tl.where(t < 2.0, _cubic2(t, -0.5), 0.0))
    else:
        w = tl.maximum(1.0 - t, 0.0)
    return w


@triton.jit
def _tap(dst, k, in_size, scale, BICUBIC: tl.constexpr, AA: tl.constexpr):
    """Input index and weight of tap ``k`` (a runtime value) for output index ``dst`` along one axis.

    Antialiased weights are not normalized here: divide by ``_aa_total``.
    """
    d = dst.to(tl.float32)
    if AA:
        half: tl.constexpr = 2.0 if BICUBIC else 1.0
        support = tl.where(scale >= 1.0, half * scale, half)
        invscale = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
        center = scale * (d + 0.5)
        xmin = tl.maximum((center - support + 0.5).to(tl.int32), 0)
        xmax = tl.minimum((center + support + 0.5).to(tl.int32), in_size)
        j = xmin + k
        w = tl.where(j < xmax, _aa_filter((j.to(tl.float32) - center + 0.5) * invscale, BICUBIC), 0.0)
        idx = tl.minimum(j, in_size - 1)
    elif BICUBIC:
        src = scale * (d + 0.5) - 0.5
        fl = tl.floor(src)
        t = tl.abs(src - fl + 1.0 - k)  # distance from the tap at floor(src) - 1 + k
        idx = tl.minimum(tl.maximum(fl.to(tl.int32) - 1 + k, 0), in_size - 1)
        w = tl.where(t < 1.0, _cubic1(t, -0.75), tl.where(t < 2.0, _cubic2(t, -0.75), 0.0))
    else:
        src = tl.maximum(scale * (d + 0.5) - 0.5, 0.0)
        i0 = tl.minimum(src.to(tl.int32), in_size - 1)
        lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
        idx = tl.where(k == 0, i0, i0 + (i0 < in_size - 1).to(tl.int32))
        w = tl.where(k == 0, 1.0 - lam, lam)
    return idx, w


@triton.jit
def _aa_total(dst, in_size, scale, K: tl.constexpr, BICUBIC: tl.constexpr):
    total = tl.zeros(dst.shape, tl.float32)
    for k in range(K):
        _, w = _tap(dst, k, in_size, scale, BICUBIC, True)
        total += w
    return tl.where(total == 0.0, 1.0, total)  # zero only off the image, where the value is unused


@triton.jit
def _transform_weight(q, r, size, scale):
    """Weight with which resized index ``r`` reads source index ``q`` (bilinear, two taps)."""
    i0, w0 = _tap(r, 0, size, scale, False, False)
    i1, w1 = _tap(r, 1, size, scale, False, False)
    return tl.where(i0 == q, w0, 0.0) + tl.where(i1 == q, w1, 0.0)


@triton.jit
def _pixel_tile(tile, S, BLOCK: tl.constexpr):
    """Flat canvas indices of one tile of BLOCK pixels, and which of them lie on the S x S canvas."""
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    pix = tl.max_contiguous(tl.multiple_of(pix, BLOCK), BLOCK)
    return pix, pix < S * S


@triton.jit
def _per_channel(ptr, cidx, cmask, PRESENT: tl.constexpr, default: tl.constexpr):
    """A per-channel vector (mean or std), or ``default`` in every channel when it is absent."""
    if PRESENT:
        v = tl.load(ptr + cidx, mask=cmask, other=default)
    else:
        v = tl.full([cidx.shape[0]], default, tl.float32)
    return v


# --------------------------------------------------------------------------- forward


@triton.jit
def _canvas_value(
    x_ptr, x_base, sxc, sxh, sxw, H, W, Y, X, valid, oy, ox, s, scale_h, scale_w, fill,
    p_ptr, m_ptr, mean, std, S, cidx, cmask,
    KH: tl.constexpr, KW: tl.constexpr, Y_BICUBIC: tl.constexpr, Y_AA: tl.constexpr,
    X_BICUBIC: tl.constexpr, X_AA: tl.constexpr, UINT8: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr, PIXEL: tl.constexpr,
):
    """The normalized, prompted canvas (before the per-sample transform) at (Y, X), all channels."""
    yi = Y - oy
    xi = X - ox
    inside = valid & (yi >= 0) & (yi < s) & (xi >= 0) & (xi < s)
    lmask = inside[:, None] & cmask[None, :]
    coff = cidx[None, :] * sxc
    acc = tl.zeros([Y.shape[0], cidx.shape[0]], tl.float32)
    for ky in range(KH):
        iy, wy = _tap(yi, ky, H, scale_h, Y_BICUBIC, Y_AA)
        for kx in range(KW):
            ix, wx = _tap(xi, kx, W, scale_w, X_BICUBIC, X_AA)
            v = tl.load(x_ptr + (x_base + iy * sxh + ix * sxw)[:, None] + coff, mask=lmask, other=0)
            acc += (wy * wx)[:, None] * v.to(tl.float32)
    if Y_AA:
        acc = acc / _aa_total(yi, H, scale_h, KH, Y_BICUBIC)[:, None]
    if X_AA:
        acc = acc / _aa_total(xi, W, scale_w, KW, X_BICUBIC)[:, None]
    if UINT8:
        acc = acc / 255.0
    z = tl.where(inside[:, None], acc, fill)
    pix = Y * S + X
    pmask = valid[:, None] & cmask[None, :]
    p = tl.load(p_ptr + cidx[None, :] * (S * S) + pix[:, None], mask=pmask, other=0.0)
    if HAS_MASK:
        p = p * tl.load(m_ptr + pix, mask=valid, other=0.0)[:, None]
    if PIXEL:
        z = z + p
    if HAS_MEAN:
        z = z - mean[None, :]
    if HAS_STD:
        z = z / std[None, :]
    if not PIXEL:
        z = z + p
    return z


@triton.jit
def _compose_fwd_kernel(
    out_ptr, x_ptr, p_ptr, m_ptr, mean_ptr, std_ptr, t_ptr,
    sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    H, W, S, s, oy, ox, scale_h, scale_w, fill,
    C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, Y_BICUBIC: tl.constexpr, Y_AA: tl.constexpr,
    X_BICUBIC: tl.constexpr, X_AA: tl.constexpr, UINT8: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr, PIXEL: tl.constexpr, HAS_TRANSFORM: tl.constexpr,
    OUT_NCHW: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pix, valid = _pixel_tile(tl.program_id(0), S, BLOCK)
    Y = pix // S
    X = pix % S
    cidx = tl.arange(0, CP)
    cmask = cidx < C
    mean = _per_channel(mean_ptr, cidx, cmask, HAS_MEAN, 0.0)
    std = _per_channel(std_ptr, cidx, cmask, HAS_STD, 1.0)
    x_base = b * sxb
    if HAS_TRANSFORM:
        size = tl.load(t_ptr + b * 4)
        ty = tl.load(t_ptr + b * 4 + 1)
        tx = tl.load(t_ptr + b * 4 + 2)
        flip = tl.load(t_ptr + b * 4 + 3)
        scale_t = tl.math.div_rn(S.to(tl.float32), size.to(tl.float32))
        ry = Y - ty
        rx = X - tx
        placed = valid & (ry >= 0) & (ry < size) & (rx >= 0) & (rx < size)
        y = tl.zeros([BLOCK, CP], tl.float32)
        for corner in range(4):  # the bilinear corners, a runtime loop to keep register use down
            py, wy = _tap(ry, corner // 2, S, scale_t, False, False)
            px, wx = _tap(rx, corner % 2, S, scale_t, False, False)
            px = tl.where(flip != 0, S - 1 - px, px)
            v = _canvas_value(
                x_ptr, x_base, sxc, sxh, sxw, H, W, py, px, placed, oy, ox, s, scale_h, scale_w, fill,
                p_ptr, m_ptr, mean, std, S, cidx, cmask, KH, KW, Y_BICUBIC, Y_AA, X_BICUBIC, X_AA,
                UINT8, HAS_MASK, HAS_MEAN, HAS_STD, PIXEL,
            )
            y += (wy * wx)[:, None] * v
        background = (fill - mean) / std
        y = tl.where(placed[:, None], y, background[None, :])
    else:
        y = _canvas_value(
            x_ptr, x_base, sxc, sxh, sxw, H, W, Y, X, valid, oy, ox, s, scale_h, scale_w, fill,
            p_ptr, m_ptr, mean, std, S, cidx, cmask, KH, KW, Y_BICUBIC, Y_AA, X_BICUBIC, X_AA,
            UINT8, HAS_MASK, HAS_MEAN, HAS_STD, PIXEL,
        )
    if OUT_NCHW:
        offs = b * sob + cidx[None, :] * soc + pix[:, None]
    else:
        offs = b * sob + cidx[None, :] * soc + (Y * soh + X * sow)[:, None]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid[:, None] & cmask[None, :])


# --------------------------------------------------------------------------- backward


@triton.jit
def _sample_grad(
    go_ptr, b, sgb, sgc, sgh, sgw, t_ptr, Y, X, valid, S, cidx, cmask,
    HAS_TRANSFORM: tl.constexpr, KT: tl.constexpr, BLOCK: tl.constexpr, CP: tl.constexpr,
):
    """Sample b's gradient with respect to the canvas before the transform, at (Y, X)."""
    g_base = b * sgb
    coff = cidx[None, :] * sgc
    if HAS_TRANSFORM:
        size = tl.load(t_ptr + b * 4)
        ty = tl.load(t_ptr + b * 4 + 1)
        tx = tl.load(t_ptr + b * 4 + 2)
        flip = tl.load(t_ptr + b * 4 + 3)
        scale_t = tl.math.div_rn(S.to(tl.float32), size.to(tl.float32))
        inv = size.to(tl.float32) / S.to(tl.float32)
        qx = tl.where(flip != 0, S - 1 - X, X)
        ylo = tl.maximum(tl.floor((Y.to(tl.float32) - 0.5) * inv - 0.5).to(tl.int32) - 1, 0)
        xlo = tl.maximum(tl.floor((qx.to(tl.float32) - 0.5) * inv - 0.5).to(tl.int32) - 1, 0)
        acc = tl.zeros([BLOCK, CP], tl.float32)
        for jy in range(KT):
            ry = ylo + jy
            wy = tl.where(ry < size, _transform_weight(Y, ry, S, scale_t), 0.0)
            for jx in range(KT):
                rx = xlo + jx
                w = wy * tl.where(rx < size, _transform_weight(qx, rx, S, scale_t), 0.0)
                hit = valid & (w != 0.0)
                v = tl.load(go_ptr + (g_base + (ty + ry) * sgh + (tx + rx) * sgw)[:, None] + coff,
                            mask=hit[:, None] & cmask[None, :], other=0.0)
                acc += w[:, None] * v.to(tl.float32)
    else:
        acc = tl.load(go_ptr + (g_base + Y * sgh + X * sgw)[:, None] + coff,
                      mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def _grad_scale(m_ptr, pix, valid, std, HAS_MASK: tl.constexpr, HAS_STD: tl.constexpr):
    """Per-element factor (mask over the region, 1/std in pixel space) as a [BLOCK, CP] tensor."""
    f = 1.0 / std[None, :] if HAS_STD else tl.full([1, std.shape[0]], 1.0, tl.float32)
    if HAS_MASK:
        f = f * tl.load(m_ptr + pix, mask=valid, other=0.0)[:, None]
    return f


@triton.jit
def _compose_bwd_norm_kernel(
    part_ptr, go_ptr, m_ptr, std_ptr, t_ptr, sgb, sgc, sgh, sgw, S, n_tiles,
    C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr, KT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_STD: tl.constexpr, HAS_TRANSFORM: tl.constexpr, L2: tl.constexpr,
):
    """Partial per-sample sums of g^2 (L2) or |g| (L1) over one tile of pixels."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix, valid = _pixel_tile(tile, S, BLOCK)
    cidx = tl.arange(0, CP)
    cmask = cidx < C
    std = _per_channel(std_ptr, cidx, cmask, HAS_STD, 1.0)
    g = _sample_grad(go_ptr, b, sgb, sgc, sgh, sgw, t_ptr, pix // S, pix % S, valid, S, cidx, cmask,
                     HAS_TRANSFORM, KT, BLOCK, CP)
    g = g * _grad_scale(m_ptr, pix, valid, std, HAS_MASK, HAS_STD)
    part = tl.sum(tl.sum(g * g if L2 else tl.abs(g), axis=1), axis=0)
    tl.store(part_ptr + b * n_tiles + tile, part)


@triton.jit
def _compose_bwd_accum_kernel(
    part_ptr, go_ptr, coef_ptr, m_ptr, std_ptr, t_ptr, sgb, sgc, sgh, sgw, S, B, per_chunk,
    C: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr, KT: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_STD: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HAS_COEF: tl.constexpr,
):
    """One chunk of the batch: sum_b coef_b * g_b over a tile of pixels, for all channels."""
    chunk = tl.program_id(1)
    pix, valid = _pixel_tile(tl.program_id(0), S, BLOCK)
    Y = pix // S
    X = pix % S
    cidx = tl.arange(0, CP)
    cmask = cidx < C
    std = _per_channel(std_ptr, cidx, cmask, HAS_STD, 1.0)
    acc = tl.zeros([BLOCK, CP], tl.float32)
    b_start = chunk.to(tl.int64) * per_chunk
    b_end = tl.minimum(b_start + per_chunk, B)
    for b in range(b_start, b_end):
        g = _sample_grad(go_ptr, b, sgb, sgc, sgh, sgw, t_ptr, Y, X, valid, S, cidx, cmask,
                         HAS_TRANSFORM, KT, BLOCK, CP)
        if HAS_COEF:
            g = g * tl.load(coef_ptr + b)
        acc += g
    acc = acc * _grad_scale(m_ptr, pix, valid, std, HAS_MASK, HAS_STD)
    offs = chunk.to(tl.int64) * (C * S * S) + cidx[None, :] * (S * S) + pix[:, None]
    tl.store(part_ptr + offs, acc, mask=valid[:, None] & cmask[None, :])


# --------------------------------------------------------------------------- launchers


def _axis(in_size: int, out_size: int, mode: str, antialias: bool) -> tuple[int, bool, bool]:
    """(taps, bicubic, antialias) of one resize axis; an identity axis reads one tap."""
    if in_size == out_size:
        return 1, False, False
    interp = 4 if mode == "bicubic" else 2
    if antialias:
        scale = in_size / out_size
        support = interp * 0.5 * scale if scale >= 1.0 else interp * 0.5
        return int(math.ceil(support)) * 2 + 1, mode == "bicubic", True
    return interp, mode == "bicubic", False


def _block(numel: int, block: int) -> int:
    return min(block, triton.next_power_of_2(numel))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def device_capability(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); the interpreter runs the sm_90 configuration."""
    return _capability(device.index or 0) if device.type == "cuda" else 90


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep the device busy: PROGRAMS_PER_SM per SM on a GPU, one under the interpreter."""
    return PROGRAMS_PER_SM * _sm_count(device.index or 0) if device.type == "cuda" else 1


def _dummy(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(0, dtype=torch.float32)


def forward_launch(images, prompt, mask, mean, std, transform, inner, oy, ox, fill, mode, antialias, prompt_space,
                   out: torch.Tensor, capability: int | None = None) -> Launch:
    """The forward launch writing ``out`` (B, C, S, S); the image is resized to ``inner`` at (oy, ox)."""
    batch, channels, height, width = images.shape
    size = prompt.shape[-1]
    kh, y_bicubic, y_aa = _axis(height, inner, mode, antialias)
    kw, x_bicubic, x_aa = _axis(width, inner, mode, antialias)
    capability = device_capability(out.device) if capability is None else capability
    block = _block(size * size, blocks(capability)["forward", transform is not None])
    dummy = _dummy(images)
    args = (
        out, images, prompt, dummy if mask is None else mask, dummy if mean is None else mean,
        dummy if std is None else std, dummy if transform is None else transform,
        *images.stride(), *out.stride(),
        height, width, size, inner, oy, ox, height / inner, width / inner, float(fill),
    )
    constexprs = dict(
        C=channels, CP=triton.next_power_of_2(channels), BLOCK=block, KH=kh, KW=kw,
        Y_BICUBIC=y_bicubic, Y_AA=y_aa, X_BICUBIC=x_bicubic, X_AA=x_aa, UINT8=images.dtype == torch.uint8,
        HAS_MASK=mask is not None, HAS_MEAN=mean is not None, HAS_STD=std is not None,
        PIXEL=prompt_space == "pixel", HAS_TRANSFORM=transform is not None,
        OUT_NCHW=out.is_contiguous(), num_warps=NUM_WARPS, enable_fp_fusion=transform is None,
    )
    return Launch(_compose_fwd_kernel, (triton.cdiv(size * size, block), batch), args, constexprs)


def compose_forward(images, prompt, mask, mean, std, transform, inner, oy, ox, fill, mode, antialias, prompt_space,
                    out_dtype, memory_format) -> torch.Tensor:
    """Run the fused forward into a new (B, C, S, S) tensor of ``out_dtype`` and ``memory_format``."""
    size = prompt.shape[-1]
    out = _empty((images.shape[0], images.shape[1], size, size), dtype=out_dtype, device=images.device,
                 memory_format=memory_format)
    forward_launch(images, prompt, mask, mean, std, transform, inner, oy, ox, fill, mode, antialias, prompt_space,
                   out).run()
    return out


def backward_launches(grad_out, mask, std, transform, prompt_space, grad_region, grad_norm,
                      norm_part: torch.Tensor, coef: torch.Tensor, accum_part: torch.Tensor,
                      capability: int | None = None) -> list[Launch]:
    """The backward launches: the per-sample norm pass (when ``grad_norm`` asks) and the accumulation."""
    batch, channels, size, _ = grad_out.shape
    capability = device_capability(grad_out.device) if capability is None else capability
    block = _block(size * size, blocks(capability)["backward", transform is not None])
    n_tiles = triton.cdiv(size * size, block)
    dummy = _dummy(grad_out)
    use_mask = mask is not None and grad_region == "prompt"
    use_std = std is not None and prompt_space == "pixel"
    common = dict(C=channels, CP=triton.next_power_of_2(channels), BLOCK=block, KT=TRANSFORM_TAPS,
                  HAS_MASK=use_mask, HAS_STD=use_std, HAS_TRANSFORM=transform is not None, num_warps=NUM_WARPS,
                  enable_fp_fusion=transform is None)
    pointers = (mask if use_mask else dummy, std if use_std else dummy, dummy if transform is None else transform)
    launches = []
    if grad_norm != "none":
        launches.append(Launch(
            _compose_bwd_norm_kernel, (n_tiles, batch),
            (norm_part, grad_out, *pointers, *grad_out.stride(), size, n_tiles),
            dict(common, L2=grad_norm == "sample_l2"),
        ))
    n_chunks = accum_part.shape[0]
    launches.append(Launch(
        _compose_bwd_accum_kernel, (n_tiles, n_chunks),
        (accum_part, grad_out, coef, *pointers, *grad_out.stride(), size, batch, triton.cdiv(batch, n_chunks)),
        dict(common, HAS_COEF=grad_norm != "none"),
    ))
    return launches


def compose_backward(grad_out, mask, std, transform, prompt_space, grad_region, grad_norm,
                     eps: float) -> torch.Tensor:
    """The prompt gradient (C, S, S) float32 for the batch rule ``grad_norm`` ("none", "sample_l2", "sample_l1")."""
    batch, channels, size, _ = grad_out.shape
    device = grad_out.device
    n_tiles = triton.cdiv(size * size, _block(size * size, blocks(device_capability(device))["backward",
                                                                                          transform is not None]))
    n_chunks = max(1, min(batch, _programs_wanted(device) // n_tiles))
    n_chunks = triton.cdiv(batch, triton.cdiv(batch, n_chunks))  # no empty chunks
    norm_part = _empty((batch, n_tiles), dtype=torch.float32, device=device)
    coef = _empty((batch,), dtype=torch.float32, device=device)
    accum_part = _empty((n_chunks, channels, size, size), dtype=torch.float32, device=device)
    *norm_pass, accum_pass = backward_launches(grad_out, mask, std, transform, prompt_space, grad_region,
                                               grad_norm, norm_part, coef, accum_part)
    for launch in norm_pass:
        launch.run()
        total = norm_part.sum(1)
        scale = total.sqrt() if grad_norm == "sample_l2" else total / (channels * size * size)
        torch.reciprocal((scale + eps) * batch, out=coef)
    accum_pass.run()
    return accum_part.sum(0) if n_chunks > 1 else accum_part[0]


def aot_cases(capability: int) -> list[AotCase]:
    """The launches the ahead-of-time tier compiles for ``capability``: EVP geometry, built by the real launchers.

    Batch 2 stands for any batch: it only changes the grid, not the specialization.
    """
    size, inner, pad, batch = 224, 164, 30, 2
    u8 = torch.empty(batch, 3, 224, 224, dtype=torch.uint8)
    crop = torch.empty(batch, 3, 230, 230)[:, :, 3:227, 3:227]  # a view: no 16-byte alignment
    prompt, mask, vec = torch.empty(3, size, size), torch.empty(size, size), torch.empty(3)
    rows = torch.empty(batch, 4, dtype=torch.int32)

    def out(dtype, memory_format=torch.contiguous_format):
        return torch.empty(batch, 3, size, size, dtype=dtype, memory_format=memory_format)

    def fwd(images, transform, mode, antialias, space, o, inner_size=inner, offset=pad):
        return forward_launch(images, prompt, mask, vec, vec, transform, inner_size, offset, offset, 0.0, mode,
                              antialias, space, o, capability)

    cases = [
        AotCase("fwd u8->bf16 bilinear", fwd(u8, None, "bilinear", False, "pixel", out(torch.bfloat16)),
                128 if capability >= 90 else 64),
        AotCase("fwd f32 crop->f32 bicubic-aa", fwd(crop, None, "bicubic", True, "pixel", out(torch.float32)), 128),
        AotCase("fwd u8->bf16 channels_last", fwd(u8.contiguous(memory_format=torch.channels_last), None,
                                                  "bilinear", False, "pixel", out(torch.bfloat16, torch.channels_last)),
                notes="channels_last output: per-channel stores are strided"),
        AotCase("fwd u8->bf16 bilinear transform", fwd(u8, rows, "bilinear", False, "pixel", out(torch.bfloat16)), 64),
        AotCase("fwd f32->f32 pad prompter", fwd(torch.empty(batch, 3, size, size), None, "bilinear", False,
                                                 "normalized", out(torch.float32), size, 0), 128),
    ]
    grads = {"bf16": out(torch.bfloat16), "f32 channels_last": out(torch.float32, torch.channels_last)}
    for grad_name, grad in grads.items():
        for transform in (None, rows):
            for grad_norm in ("none", "sample_l2"):
                launches = backward_launches(grad, mask, vec, transform, "pixel", "prompt", grad_norm,
                                             torch.empty(batch, 1), torch.empty(batch), torch.empty(4, 3, size, size),
                                             capability)
                vector = grad_name == "bf16" and transform is None
                for launch in launches:
                    kind = "norm" if launch.kernel is _compose_bwd_norm_kernel else "accum"
                    name = f"bwd-{kind} {grad_name} {grad_norm}" + (" transform" if transform is not None else "")
                    cases.append(AotCase(name, launch, min_load_bits=128 if vector else None,
                                         min_store_bits=128 if kind == "accum" else None))
    return cases
