"""Triton kernels for compose (docs/ops.md, compose) and their launchers.

Row-wise design. A program owns one tile of canvas rows x columns and loops over the samples of
its share of the batch, so the batch is not bounded by a grid dimension and everything that does
not depend on the sample is computed once per program: the resize taps (y taps once per row, x
taps once per column, each zeroed off the image so gathers need no masks), the 32-bit offsets
inside a sample, and the per-channel gain. A 64-bit base pointer per sample and channel carries
the batch and channel offsets; offsets inside a sample are 32-bit unless a sample spans 2**31
elements (WIDE). The batch-invariant part of the output (prompt, mask, fill, mean and std) is one
(C, S, S) term computed once per call by ``_compose_term_kernel``; tiles that lie wholly in the
frame copy it without reading the image. With the per-sample transform, the corner and image taps
multiply per row and per column. Backward: the prompt gradient in one pass over the incoming
gradient (two for the per-sample norms), accumulated in float32; the transform's adjoint reads
3 x 3 candidates per pixel from a per-sample table. Interpolation follows ATen's float32 formulas
(align_corners=False), the antialiased ones included. The aot tier (vpfast/aot.py) holds each
loop over the batch to a budget of SASS instructions per output element (the *_BUDGET constants).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._launch import AotCase, Launch, LoopDesign

_empty = torch.empty  # every allocation goes through here, so tests can poison it

NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # occupancy the launchers assume; the aot tier checks registers against it
TILE = 1024  # canvas pixels per program tile: 8 per thread, one 128-bit bf16 store per row run
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y dimension
# SASS instructions per output element allowed in the aot tier (aot.py, sass_per_output), per loop over the batch
FORWARD_IMAGE_BUDGET = 45  # tiles with image pixels: bilinear taps, gathers, gain and term
FORWARD_FRAME_BUDGET = 6  # tiles wholly in the frame: the term, converted and stored
FORWARD_TRANSFORM_BUDGET = 220
BACKWARD_ACCUM_BUDGET = 5  # 1 128-bit load per 8 bf16 elements, 1 convert and 1 add (or FMA) each, loop control
BACKWARD_NORM_BUDGET = 12  # all channels per sample and the sum over the tile (shuffles, shared memory) per sample
BACKWARD_TRANSFORM_BUDGET = 110
TRANSFORM_TAPS = 3  # candidate rows/columns per pre-transform pixel in the adjoint (covers S/size >= 1)
# With the transform, coordinates round as ATen's float32 ones do: IEEE division for S / size and no FMA
# contraction (enable_fp_fusion=False). A resized canvas is ill-conditioned in its coordinates: one ulp of a
# source coordinate near 200 (1.5e-5) times a jump of ~10 between neighbouring normalized pixels moved the
# output by 5e-5 of its range on an H100 before this.


def tile_shape(size: int, pixels: int = TILE) -> tuple[int, int]:
    """(rows, columns) of a program's tile of ``pixels`` on an S x S canvas: whole rows up to 256 columns."""
    columns = min(triton.next_power_of_2(size), 256)
    return max(1, pixels // columns), columns


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
    """Input index (always in [0, in_size)) and weight of tap ``k`` for output index ``dst`` along one axis.

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
    for k in tl.static_range(K):
        _, w = _tap(dst, k, in_size, scale, BICUBIC, True)
        total += w
    return tl.where(total == 0.0, 1.0, total)  # zero only off the image, where the weight is zeroed anyway


@triton.jit
def _image_tap(dst, k, inner, in_size, scale, K: tl.constexpr, BICUBIC: tl.constexpr, AA: tl.constexpr):
    """Tap ``k`` of the image resize along one axis at inner-image index ``dst``, weight 0 off the image."""
    idx, w = _tap(dst, k, in_size, scale, BICUBIC, AA)
    if AA:
        w = w / _aa_total(dst, in_size, scale, K, BICUBIC)
    return idx, tl.where((dst >= 0) & (dst < inner), w, 0.0)


@triton.jit
def _offsets(rows, row_stride, cols, col_stride, WIDE: tl.constexpr):
    """[rows, cols] element offsets inside one sample and channel: 32-bit unless WIDE."""
    if WIDE:
        return rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride
    return (rows * row_stride)[:, None] + (cols * col_stride)[None, :]


@triton.jit
def _channel(vec, cidx, c):
    """Element ``c`` of a per-channel vector held in registers (no memory access)."""
    return tl.sum(tl.where(cidx == c, vec, 0.0), axis=0)


@triton.jit
def _per_channel(ptr, cidx, cmask, PRESENT: tl.constexpr, default: tl.constexpr):
    """A per-channel vector (mean or std), or ``default`` in every channel when it is absent."""
    if PRESENT:
        v = tl.load(ptr + cidx, mask=cmask, other=default)
    else:
        v = tl.full([cidx.shape[0]], default, tl.float32)
    return v


@triton.jit
def _tile(S, n_col_tiles, ROWS: tl.constexpr, BW: tl.constexpr):
    """The tile's first row and column, its canvas rows and columns, and which of its pixels lie on the canvas."""
    tile = tl.program_id(0)
    r0 = (tile // n_col_tiles) * ROWS
    c0 = (tile % n_col_tiles) * BW
    Y = r0 + tl.arange(0, ROWS)
    X = tl.max_contiguous(tl.multiple_of(c0 + tl.arange(0, BW), BW), BW)
    return r0, c0, Y, X, (Y < S)[:, None] & (X < S)[None, :]


# --------------------------------------------------------------------------- forward


@triton.jit
def _compose_term_kernel(
    term_ptr, p_ptr, m_ptr, mean_ptr, std_ptr, S, s, oy, ox, fill,
    C: tl.constexpr, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr,
    PIXEL: tl.constexpr,
):
    """The batch-invariant term: the output where the image contributes 0, so output = image * gain + term.

    Pixel space: (canvas + p*m - mean) / std; normalized space: (canvas - mean) / std + p*m, with canvas = fill
    on the frame and 0 on the image.
    """
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pix < S * S
    yi = pix // S - oy
    xi = pix % S - ox
    frame = tl.where((yi >= 0) & (yi < s) & (xi >= 0) & (xi < s), 0.0, fill)
    m = tl.load(m_ptr + pix, mask=valid, other=0.0) if HAS_MASK else 1.0
    for c in tl.static_range(C):
        z = frame
        p = tl.load(p_ptr + c * S * S + pix, mask=valid, other=0.0) * m
        if PIXEL:
            z = z + p
        if HAS_MEAN:
            z = z - tl.load(mean_ptr + c)
        if HAS_STD:
            z = z / tl.load(std_ptr + c)
        if not PIXEL:
            z = z + p
        tl.store(term_ptr + c * S * S + pix, z, mask=valid)


@triton.jit
def _canvas_value(
    xc_ptr, term_c_ptr, gain, rows, cols, sxh, sxw, H, W, S, s, oy, ox, scale_h, scale_w,
    KH: tl.constexpr, KW: tl.constexpr, Y_BICUBIC: tl.constexpr, Y_AA: tl.constexpr,
    X_BICUBIC: tl.constexpr, X_AA: tl.constexpr, WIDE: tl.constexpr,
):
    """One channel of the canvas (before the per-sample transform) on the tile's rows x cols."""
    acc = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
    for ky in tl.range(KH, loop_unroll_factor=KH if KH <= 4 else 1):  # unrolled unless antialiased
        iy, wy = _image_tap(rows - oy, ky, s, H, scale_h, KH, Y_BICUBIC, Y_AA)
        row = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
        for kx in tl.range(KW, loop_unroll_factor=KW if KW <= 4 else 1):
            ix, wx = _image_tap(cols - ox, kx, s, W, scale_w, KW, X_BICUBIC, X_AA)
            v = tl.load(xc_ptr + _offsets(iy, sxh, ix, sxw, WIDE))
            row += wx[None, :] * v.to(tl.float32)
        acc += wy[:, None] * row
    term = tl.load(term_c_ptr + rows[:, None] * S + cols[None, :], mask=(rows < S)[:, None] & (cols < S)[None, :],
                   other=0.0)
    return acc * gain + term


@triton.jit
def _transformed_value(
    xc_ptr, term_c_ptr, gain, ry, rx, flip, scale_t, sxh, sxw, H, W, S, s, oy, ox, scale_h, scale_w,
    KH: tl.constexpr, KW: tl.constexpr, Y_BICUBIC: tl.constexpr, Y_AA: tl.constexpr,
    X_BICUBIC: tl.constexpr, X_AA: tl.constexpr, WIDE: tl.constexpr,
):
    """One channel after the per-sample transform at resized rows ry x columns rx: the bilinear corners of the
    canvas, each the image's taps times gain plus the term, flattened into products of per-row and per-column
    weights (the corner's times the image tap's), so every tap is computed once per row or column. With ``flip``
    the image's column taps are those of the mirrored inner column (the image flip; the term is not mirrored)."""
    term = tl.zeros([ry.shape[0], rx.shape[0]], tl.float32)
    for cy in tl.static_range(2):
        py, wy = _tap(ry, cy, S, scale_t, False, False)
        for cx in tl.static_range(2):
            px, wx = _tap(rx, cx, S, scale_t, False, False)
            term += (wy[:, None] * wx[None, :]) * tl.load(term_c_ptr + py[:, None] * S + px[None, :])
    image = tl.zeros([ry.shape[0], rx.shape[0]], tl.float32)
    for cy in tl.static_range(2):
        py, wy = _tap(ry, cy, S, scale_t, False, False)
        for ky in tl.range(KH, loop_unroll_factor=KH if KH <= 4 else 1):
            iy, wiy = _image_tap(py - oy, ky, s, H, scale_h, KH, Y_BICUBIC, Y_AA)
            row = tl.zeros([ry.shape[0], rx.shape[0]], tl.float32)
            for cx in tl.static_range(2):
                px, wx = _tap(rx, cx, S, scale_t, False, False)
                jx = px - ox  # the inner image's column, mirrored for the image flip (off the image stays off it)
                jx = tl.where(flip != 0, s - 1 - jx, jx)
                for kx in tl.range(KW, loop_unroll_factor=KW if KW <= 4 else 1):
                    ix, wix = _image_tap(jx, kx, s, W, scale_w, KW, X_BICUBIC, X_AA)
                    v = tl.load(xc_ptr + _offsets(iy, sxh, ix, sxw, WIDE))
                    row += (wx * wix)[None, :] * v.to(tl.float32)
            image += (wy * wiy)[:, None] * row
    return image * gain + term


@triton.jit
def _compose_fwd_kernel(
    out_ptr, x_ptr, term_ptr, mean_ptr, std_ptr, t_ptr, f_ptr,
    B, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    H, W, S, s, oy, ox, scale_h, scale_w, fill, n_col_tiles, channels,
    C: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, Y_BICUBIC: tl.constexpr, Y_AA: tl.constexpr,
    X_BICUBIC: tl.constexpr, X_AA: tl.constexpr, UINT8: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HAS_FLIP: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Samples program_id(1), program_id(1) + num_programs(1), ... of one canvas tile: image * gain + term.
    With HAS_FLIP (no transform) a flagged sample is read through its mirror image (column W - 1 - i for i,
    a negative column stride): resizing commutes with the mirror, so the taps and weights stay the unflipped ones."""
    r0, c0, Y, X, valid = _tile(S, n_col_tiles, ROWS, BW)
    cidx = tl.arange(0, CP)
    cmask = cidx < C
    mean = _per_channel(mean_ptr, cidx, cmask, HAS_MEAN, 0.0)
    std = _per_channel(std_ptr, cidx, cmask, HAS_STD, 1.0)
    gain = (1.0 / 255.0 if UINT8 else 1.0) / std
    out_offs = _offsets(Y, soh, X, sow, WIDE)
    first = tl.program_id(1)
    step = tl.num_programs(1)
    if HAS_TRANSFORM:
        background = (fill - mean) / std
        for b in tl.range(first, B, step, loop_unroll_factor=1):
            size = tl.load(t_ptr + b * 4)
            ty = tl.load(t_ptr + b * 4 + 1)
            tx = tl.load(t_ptr + b * 4 + 2)
            flip = tl.load(t_ptr + b * 4 + 3)
            scale_t = tl.math.div_rn(S.to(tl.float32), size.to(tl.float32))
            ry = Y - ty
            rx = X - tx
            placed = ((ry >= 0) & (ry < size))[:, None] & ((rx >= 0) & (rx < size))[None, :]
            for c in tl.range(channels, loop_unroll_factor=1):  # a runtime count keeps it rolled: the taps
                # stay in registers across the channels instead of three unrolled copies
                xc = x_ptr + tl.cast(b, tl.int64) * sxb + tl.cast(sxc, tl.int64) * c
                y = _transformed_value(xc, term_ptr + c * S * S, _channel(gain, cidx, c), ry, rx, flip, scale_t,
                                       sxh, sxw, H, W, S, s, oy, ox, scale_h, scale_w, KH, KW, Y_BICUBIC, Y_AA,
                                       X_BICUBIC, X_AA, WIDE)
                y = tl.where(placed, y, _channel(background, cidx, c))
                ob = out_ptr + tl.cast(b, tl.int64) * sob + tl.cast(soc, tl.int64) * c
                tl.store(ob + out_offs, y.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        if (r0 < oy + s) & (r0 + ROWS > oy) & (c0 < ox + s) & (c0 + BW > ox):
            for b in tl.range(first, B, step, loop_unroll_factor=1):
                xb = x_ptr + tl.cast(b, tl.int64) * sxb
                sw = sxw
                if HAS_FLIP:  # the mirror image: starts at the last column, steps back
                    flagged = tl.load(f_ptr + b) != 0
                    xb += tl.where(flagged, tl.cast(W - 1, tl.int64) * sxw, 0)
                    sw = tl.where(flagged, -sxw, sxw)
                for c in tl.static_range(C):
                    xc = xb + tl.cast(sxc, tl.int64) * c
                    y = _canvas_value(xc, term_ptr + c * S * S, _channel(gain, cidx, c), Y, X, sxh, sw,
                                      H, W, S, s, oy, ox, scale_h, scale_w, KH, KW, Y_BICUBIC, Y_AA,
                                      X_BICUBIC, X_AA, WIDE)
                    ob = out_ptr + tl.cast(b, tl.int64) * sob + tl.cast(soc, tl.int64) * c
                    tl.store(ob + out_offs, y.to(out_ptr.dtype.element_ty), mask=valid)
        else:  # a tile wholly in the frame: the term alone
            term_offs = Y[:, None] * S + X[None, :]
            for b in tl.range(first, B, step, loop_unroll_factor=1):
                for c in tl.static_range(C):
                    term = tl.load(term_ptr + c * S * S + term_offs, mask=valid, other=0.0)
                    ob = out_ptr + tl.cast(b, tl.int64) * sob + tl.cast(soc, tl.int64) * c
                    tl.store(ob + out_offs, term.to(out_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- backward


@triton.jit
def _transform_weight(q, r, size, S, scale):
    """Weight with which resized index ``r`` reads canvas index ``q`` (bilinear, two taps); 0 off [0, size)."""
    i0, w0 = _tap(r, 0, S, scale, False, False)
    i1, w1 = _tap(r, 1, S, scale, False, False)
    w = tl.where(i0 == q, w0, 0.0) + tl.where(i1 == q, w1, 0.0)
    return tl.where((r >= 0) & (r < size), w, 0.0)


@triton.jit
def _adjoint_table_kernel(a_ptr, t_ptr, S, B, BLOCK: tl.constexpr, KT: tl.constexpr):
    """Per sample and canvas index q, the adjoint of the per-sample resize along one axis: the first resized
    index r0 that may read q and the weights with which r0, ..., r0 + KT - 1 read it, as KT + 1 floats.

    Resized index r reads q when r is in [(q - 0.5) * inv - 0.5, (q + 1.5) * inv - 0.5), inv = size / S <= 1.
    """
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = q < S
    for b in tl.range(tl.program_id(1), B, tl.num_programs(1), loop_unroll_factor=1):
        size = tl.load(t_ptr + b * 4)
        scale_t = tl.math.div_rn(S.to(tl.float32), size.to(tl.float32))
        inv = size.to(tl.float32) / S.to(tl.float32)
        lo = tl.floor((q.to(tl.float32) - 0.5) * inv - 0.5).to(tl.int32)
        row = a_ptr + (tl.cast(b, tl.int64) * S + q) * (KT + 1)
        tl.store(row, lo.to(tl.float32), mask=valid)
        for j in tl.static_range(KT):
            tl.store(row + 1 + j, _transform_weight(q, lo + j, size, S, scale_t), mask=valid)


@triton.jit
def _sample_grad(
    gc_ptr, sgh, sgw, t_ptr, a_ptr, b, Y, X, valid, S,
    HAS_TRANSFORM: tl.constexpr, KT: tl.constexpr, WIDE: tl.constexpr,
):
    """One channel of sample b's gradient with respect to the canvas before the transform, on the tile."""
    if HAS_TRANSFORM:
        ty = tl.load(t_ptr + b * 4 + 1)
        tx = tl.load(t_ptr + b * 4 + 2)
        qx = tl.minimum(X, S - 1)  # the flip mirrors the image only: the prompt gradient does not see it
        ya = a_ptr + (tl.cast(b, tl.int64) * S + tl.minimum(Y, S - 1)) * (KT + 1)
        xa = a_ptr + (tl.cast(b, tl.int64) * S + qx) * (KT + 1)
        ylo = tl.load(ya).to(tl.int32)
        xlo = tl.load(xa).to(tl.int32)
        acc = tl.zeros([Y.shape[0], X.shape[0]], tl.float32)
        for jy in tl.range(KT, loop_unroll_factor=1):  # rolled: fewer registers, the column weights stay
            wy = tl.where(Y < S, tl.load(ya + 1 + jy), 0.0)
            gy = tl.minimum(tl.maximum(ty + ylo + jy, 0), S - 1)
            row = tl.zeros([Y.shape[0], X.shape[0]], tl.float32)
            for jx in tl.static_range(KT):
                wx = tl.where(X < S, tl.load(xa + 1 + jx), 0.0)
                gx = tl.minimum(tl.maximum(tx + xlo + jx, 0), S - 1)
                v = tl.load(gc_ptr + _offsets(gy, sgh, gx, sgw, WIDE))
                row += wx[None, :] * v.to(tl.float32)
            acc += wy[:, None] * row
    else:
        acc = tl.load(gc_ptr + _offsets(Y, sgh, X, sgw, WIDE), mask=valid, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _grad_scale(m_ptr, Y, X, valid, std, cidx, c: tl.constexpr, S, HAS_MASK: tl.constexpr,
                HAS_STD: tl.constexpr):
    """Channel c's factor (mask over the region, 1/std in pixel space) on the tile."""
    f = tl.full([Y.shape[0], X.shape[0]], 1.0, tl.float32)
    if HAS_STD:
        f = f / _channel(std, cidx, c)
    if HAS_MASK:
        f = f * tl.load(m_ptr + Y[:, None] * S + X[None, :], mask=valid, other=0.0)
    return f


@triton.jit
def _compose_bwd_norm_kernel(
    part_ptr, go_ptr, m_ptr, std_ptr, t_ptr, a_ptr, sgb, sgc, sgh, sgw, S, B, n_col_tiles, n_tiles,
    C: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr, KT: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_STD: tl.constexpr, HAS_TRANSFORM: tl.constexpr, L2: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Partial per-sample sums of g^2 (L2) or |g| (L1) over one tile, for samples program_id(1) + k * step."""
    _, _, Y, X, valid = _tile(S, n_col_tiles, ROWS, BW)
    cidx = tl.arange(0, CP)
    std = _per_channel(std_ptr, cidx, cidx < C, HAS_STD, 1.0)
    for b in range(tl.program_id(1), B, tl.num_programs(1)):
        part = 0.0
        for c in tl.static_range(C):
            gc = go_ptr + tl.cast(b, tl.int64) * sgb + tl.cast(sgc, tl.int64) * c
            g = _sample_grad(gc, sgh, sgw, t_ptr, a_ptr, b, Y, X, valid, S, HAS_TRANSFORM, KT, WIDE)
            g = g * _grad_scale(m_ptr, Y, X, valid, std, cidx, c, S, HAS_MASK, HAS_STD)
            part += tl.sum(tl.sum(g * g if L2 else tl.abs(g), axis=1), axis=0)
        tl.store(part_ptr + tl.cast(b, tl.int64) * n_tiles + tl.program_id(0), part)


@triton.jit
def _compose_bwd_accum_kernel(
    part_ptr, go_ptr, coef_ptr, m_ptr, std_ptr, t_ptr, a_ptr, sgb, sgc, sgh, sgw, S, B, per_chunk, n_col_tiles,
    C: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr, KT: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_STD: tl.constexpr, HAS_TRANSFORM: tl.constexpr, HAS_COEF: tl.constexpr,
    WIDE: tl.constexpr,
):
    """One chunk of the batch: sum_b coef_b * g_b over a tile, per channel, into partial sums."""
    _, _, Y, X, valid = _tile(S, n_col_tiles, ROWS, BW)
    cidx = tl.arange(0, CP)
    std = _per_channel(std_ptr, cidx, cidx < C, HAS_STD, 1.0)
    chunk = tl.program_id(1)
    b_start = chunk * per_chunk
    b_end = tl.minimum(b_start + per_chunk, B)
    offs = Y[:, None] * S + X[None, :]
    for c in tl.static_range(C):
        acc = tl.zeros([ROWS, BW], tl.float32)
        for b in tl.range(b_start, b_end, loop_unroll_factor=1):
            gc = go_ptr + tl.cast(b, tl.int64) * sgb + tl.cast(sgc, tl.int64) * c
            g = _sample_grad(gc, sgh, sgw, t_ptr, a_ptr, b, Y, X, valid, S, HAS_TRANSFORM, KT, WIDE)
            if HAS_COEF:
                g = g * tl.load(coef_ptr + b)
            acc += g
        acc = acc * _grad_scale(m_ptr, Y, X, valid, std, cidx, c, S, HAS_MASK, HAS_STD)
        tl.store(part_ptr + (chunk * C + c).to(tl.int64) * S * S + offs, acc, mask=valid)


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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep the device busy: PROGRAMS_PER_SM per SM on a GPU, one under the interpreter."""
    return PROGRAMS_PER_SM * _sm_count(device.index or 0) if device.type == "cuda" else 1


def batch_programs(batch: int, tiles: int, programs_wanted: int) -> int:
    """Programs along the batch (grid y) for ``tiles`` canvas tiles: enough to fill the device, at most
    MAX_GRID_Y and at most ``batch``; each loops over every such program's share of the samples."""
    return max(1, min(batch, MAX_GRID_Y, triton.cdiv(programs_wanted, tiles)))


def _wide(*extents: int) -> bool:
    """Whether an offset inside one sample can reach 2**31 elements: then offsets are 64-bit."""
    return max(extents) >= 2**31


def _extent(t: torch.Tensor) -> int:
    """The largest element offset inside one sample of a (B, C, H, W) tensor, plus one."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:], strict=True))


def _dummy(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(0, dtype=torch.float32)


def term_launch(prompt, mask, mean, std, inner, oy, ox, fill, prompt_space, term: torch.Tensor) -> Launch:
    """The launch writing the batch-invariant term (C, S, S) float32 into ``term``."""
    channels, size, _ = prompt.shape
    block = min(1024, triton.next_power_of_2(size * size))
    dummy = _dummy(prompt)
    args = (term, prompt, dummy if mask is None else mask, dummy if mean is None else mean,
            dummy if std is None else std, size, inner, oy, ox, float(fill))
    constexprs = dict(C=channels, BLOCK=block, HAS_MASK=mask is not None, HAS_MEAN=mean is not None,
                      HAS_STD=std is not None, PIXEL=prompt_space == "pixel", num_warps=NUM_WARPS)
    return Launch(_compose_term_kernel, (triton.cdiv(size * size, block),), args, constexprs)


def forward_launch(images, mean, std, transform, inner, oy, ox, fill, mode, antialias, term: torch.Tensor,
                   out: torch.Tensor, programs_wanted: int | None = None, flip: torch.Tensor | None = None) -> Launch:
    """The launch writing ``out`` (B, C, S, S) = resized image * gain + ``term``; image resized to ``inner``,
    mirrored where ``flip`` ((B,) int32, no transform) is non-zero."""
    batch, channels, height, width = images.shape
    size = out.shape[-1]
    kh, y_bicubic, y_aa = _axis(height, inner, mode, antialias)
    kw, x_bicubic, x_aa = _axis(width, inner, mode, antialias)
    # fewer pixels per thread where the forward needs more registers per pixel: 2 with the per-sample transform
    # (20 gathers per pixel and channel), 4 for strided per-element stores to a channels_last output
    pixels = TILE // 4 if transform is not None else TILE // 2 if not out.is_contiguous() else TILE
    rows, columns = tile_shape(size, pixels)
    n_col_tiles = triton.cdiv(size, columns)
    tiles = triton.cdiv(size, rows) * n_col_tiles
    wanted = _programs_wanted(out.device) if programs_wanted is None else programs_wanted
    dummy = _dummy(images)
    args = (
        out, images, term, dummy if mean is None else mean, dummy if std is None else std,
        dummy if transform is None else transform, dummy if flip is None else flip,
        batch, *images.stride(), *out.stride(),
        height, width, size, inner, oy, ox, height / inner, width / inner, float(fill), n_col_tiles, channels,
    )
    constexprs = dict(
        C=channels, CP=triton.next_power_of_2(channels), ROWS=rows, BW=columns, KH=kh, KW=kw,
        Y_BICUBIC=y_bicubic, Y_AA=y_aa, X_BICUBIC=x_bicubic, X_AA=x_aa, UINT8=images.dtype == torch.uint8,
        HAS_MEAN=mean is not None, HAS_STD=std is not None, HAS_TRANSFORM=transform is not None,
        HAS_FLIP=flip is not None, WIDE=_wide(_extent(images), _extent(out), channels * size * size),
        num_warps=NUM_WARPS, enable_fp_fusion=transform is None,
    )
    return Launch(_compose_fwd_kernel, (tiles, batch_programs(batch, tiles, wanted)), args, constexprs)


def compose_forward(images, prompt, mask, mean, std, transform, inner, oy, ox, fill, mode, antialias, prompt_space,
                    out_dtype, memory_format, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Run the fused forward into a new (B, C, S, S) tensor of ``out_dtype`` and ``memory_format``."""
    channels, size, _ = prompt.shape
    term = _empty((channels, size, size), dtype=torch.float32, device=images.device)
    out = _empty((images.shape[0], channels, size, size), dtype=out_dtype, device=images.device,
                 memory_format=memory_format)
    term_launch(prompt, mask, mean, std, inner, oy, ox, fill, prompt_space, term).run()
    forward_launch(images, mean, std, transform, inner, oy, ox, fill, mode, antialias, term, out, flip=flip).run()
    return out


def backward_launches(grad_out, mask, std, transform, prompt_space, grad_region, grad_norm,
                      norm_part: torch.Tensor, coef: torch.Tensor, accum_part: torch.Tensor,
                      table: torch.Tensor | None = None, programs_wanted: int | None = None) -> list[Launch]:
    """The backward launches: the transform's adjoint table (with a transform), the per-sample norm pass
    (when ``grad_norm`` asks) and the accumulation.

    ``norm_part`` is (B, tiles), ``accum_part`` (chunks, C, S, S), chunks <= min(B, MAX_GRID_Y), and
    ``table`` (B, S, TRANSFORM_TAPS + 1) float32 with a transform.
    """
    batch, channels, size, _ = grad_out.shape
    rows, columns = tile_shape(size)
    n_col_tiles = triton.cdiv(size, columns)
    tiles = triton.cdiv(size, rows) * n_col_tiles
    wanted = _programs_wanted(grad_out.device) if programs_wanted is None else programs_wanted
    dummy = _dummy(grad_out)
    use_mask = mask is not None and grad_region == "prompt"
    use_std = std is not None and prompt_space == "pixel"
    common = dict(C=channels, CP=triton.next_power_of_2(channels), ROWS=rows, BW=columns, KT=TRANSFORM_TAPS,
                  HAS_MASK=use_mask, HAS_STD=use_std, HAS_TRANSFORM=transform is not None,
                  WIDE=_wide(_extent(grad_out), channels * size * size), num_warps=NUM_WARPS,
                  enable_fp_fusion=transform is None)
    pointers = (mask if use_mask else dummy, std if use_std else dummy, dummy if transform is None else transform,
                dummy if transform is None else table)
    launches = []
    if transform is not None:
        block = min(256, triton.next_power_of_2(size))
        launches.append(Launch(
            _adjoint_table_kernel, (triton.cdiv(size, block), batch_programs(batch, triton.cdiv(size, block), wanted)),
            (table, transform, size, batch), dict(BLOCK=block, KT=TRANSFORM_TAPS, num_warps=NUM_WARPS),
        ))
    if grad_norm != "none":
        launches.append(Launch(
            _compose_bwd_norm_kernel, (tiles, batch_programs(batch, tiles, wanted)),
            (norm_part, grad_out, *pointers, *grad_out.stride(), size, batch, n_col_tiles, tiles),
            dict(common, L2=grad_norm == "sample_l2"),
        ))
    n_chunks = accum_part.shape[0]
    launches.append(Launch(
        _compose_bwd_accum_kernel, (tiles, n_chunks),
        (accum_part, grad_out, coef, *pointers, *grad_out.stride(), size, batch, triton.cdiv(batch, n_chunks),
         n_col_tiles),
        dict(common, HAS_COEF=grad_norm != "none"),
    ))
    return launches


def backward_chunks(batch: int, size: int, programs_wanted: int) -> int:
    """Batch chunks of the accumulation pass: enough programs to fill the device, none of them empty."""
    rows, columns = tile_shape(size)
    tiles = triton.cdiv(size, rows) * triton.cdiv(size, columns)
    chunks = batch_programs(batch, tiles, programs_wanted)
    return triton.cdiv(batch, triton.cdiv(batch, chunks))


def compose_backward(grad_out, mask, std, transform, prompt_space, grad_region, grad_norm,
                     eps: float) -> torch.Tensor:
    """The prompt gradient (C, S, S) float32 for the batch rule ``grad_norm`` ("none", "sample_l2", "sample_l1")."""
    batch, channels, size, _ = grad_out.shape
    device = grad_out.device
    rows, columns = tile_shape(size)
    tiles = triton.cdiv(size, rows) * triton.cdiv(size, columns)
    n_chunks = backward_chunks(batch, size, _programs_wanted(device))
    norm_part = _empty((batch, tiles), dtype=torch.float32, device=device)
    coef = _empty((batch,), dtype=torch.float32, device=device)
    accum_part = _empty((n_chunks, channels, size, size), dtype=torch.float32, device=device)
    table = None if transform is None else _empty((batch, size, TRANSFORM_TAPS + 1), dtype=torch.float32,
                                                  device=device)
    launches = backward_launches(grad_out, mask, std, transform, prompt_space, grad_region, grad_norm, norm_part,
                                 coef, accum_part, table)
    if transform is not None:
        launches.pop(0).run()
    *norm_pass, accum_pass = launches
    for launch in norm_pass:
        launch.run()
        total = norm_part.sum(1)
        scale = total.sqrt() if grad_norm == "sample_l2" else total / (channels * size * size)
        torch.reciprocal((scale + eps) * batch, out=coef)
    accum_pass.run()
    return accum_part.sum(0) if n_chunks > 1 else accum_part[0]


def aot_cases(capability: int) -> list[AotCase]:
    """The launches the ahead-of-time tier compiles for ``capability``: EVP geometry, built by the real launchers.

    Batch 2 stands for any batch: it only changes the grid, not the specialization. The benchmarked cases
    (224 canvas, 164 inner, from 224 and 32 px inputs) carry SASS budgets per output element (aot.py).
    """
    del capability  # one configuration for sm_80 and sm_90
    size, inner, pad, batch = 224, 164, 30, 2
    rows, columns = tile_shape(size)
    per_thread = rows * columns // (32 * NUM_WARPS)  # canvas pixels each thread computes per sample and channel
    u8 = torch.empty(batch, 3, 224, 224, dtype=torch.uint8)
    small_u8, small_f32 = torch.empty(batch, 3, 32, 32, dtype=torch.uint8), torch.empty(batch, 3, 32, 32)
    crop = torch.empty(batch, 3, 230, 230)[:, :, 3:227, 3:227]  # a view: no 16-byte alignment
    prompt, mask, vec = torch.empty(3, size, size), torch.empty(size, size), torch.empty(3)
    term = torch.empty(3, size, size)
    t_rows = torch.empty(batch, 4, dtype=torch.int32)
    KT2 = TRANSFORM_TAPS**2

    def out(dtype, memory_format=torch.contiguous_format):
        return torch.empty(batch, 3, size, size, dtype=dtype, memory_format=memory_format)

    def fwd(images, transform, mode, antialias, o, inner_size=inner, offset=pad, flip=None):
        return forward_launch(images, vec, vec, transform, inner_size, offset, offset, 0.0, mode, antialias, term, o,
                              flip=flip)

    def accesses(bits: int) -> int:  # global accesses for `per_thread` contiguous elements of `bits` bits
        return per_thread * bits // 128

    def plain(out_bits: int, taps: int = 4, flag: int = 0) -> dict:  # image: (the flip flag +) 3 x (gathers +
        # term + store); frame: term + store
        return dict(min_store_bits=128, sass_paths={
            "image": LoopDesign(3 * per_thread, flag + 3 * (taps * per_thread + accesses(32) + accesses(out_bits)),
                                FORWARD_IMAGE_BUDGET),
            "frame": LoopDesign(3 * per_thread, 3 * (accesses(32) + accesses(out_bits)), FORWARD_FRAME_BUDGET)})

    def transformed() -> dict:  # the row (4 ints), 3 x (4 corners x (4 image taps + term) + a store of 2 pixels)
        pixels = per_thread // 4  # the transform's tile is a quarter as tall; its loop over channels is rolled
        design = LoopDesign(3 * pixels, 4 + 3 * (4 * 5 * pixels + 1), FORWARD_TRANSFORM_BUDGET, inner_trips=3)
        return dict(sass_paths={"transform": design})

    cases = [
        AotCase("term", term_launch(prompt, mask, vec, vec, inner, pad, pad, 0.0, "pixel", term), 128, 128),
        AotCase("fwd u8->bf16 bilinear", fwd(u8, None, "bilinear", False, out(torch.bfloat16)), **plain(16)),
        AotCase("fwd f32->f32 bilinear", fwd(torch.empty(batch, 3, 224, 224), None, "bilinear", False,
                                             out(torch.float32)), **plain(32)),
        AotCase("fwd u8 32px->bf16 bilinear", fwd(small_u8, None, "bilinear", False, out(torch.bfloat16)),
                **plain(16)),
        AotCase("fwd f32 32px->f32 bilinear", fwd(small_f32, None, "bilinear", False, out(torch.float32)),
                **plain(32)),
        AotCase("fwd u8->bf16 bilinear flip", fwd(u8, None, "bilinear", False, out(torch.bfloat16),
                                                  flip=torch.empty(batch, dtype=torch.int32)), **plain(16, flag=1)),
        AotCase("fwd f32->f32 bilinear flip", fwd(torch.empty(batch, 3, 224, 224), None, "bilinear", False,
                                                  out(torch.float32), flip=torch.empty(batch, dtype=torch.int32)),
                **plain(32, flag=1)),
        AotCase("fwd u8->bf16 bilinear transform", fwd(u8, t_rows, "bilinear", False, out(torch.bfloat16)),
                **transformed()),
        AotCase("fwd f32->f32 bilinear transform", fwd(torch.empty(batch, 3, 224, 224), t_rows, "bilinear", False,
                                                       out(torch.float32)), **transformed()),
        AotCase("fwd f32 crop->f32 bicubic-aa", fwd(crop, None, "bicubic", True, out(torch.float32)), 128),
        AotCase("fwd u8->bf16 channels_last", fwd(u8.contiguous(memory_format=torch.channels_last), None,
                                                  "bilinear", False, out(torch.bfloat16, torch.channels_last)),
                notes="channels_last output: per-channel stores are strided"),
        AotCase("fwd f32->f32 pad prompter", fwd(torch.empty(batch, 3, size, size), None, "bilinear", False,
                                                 out(torch.float32), size, 0), 128),
    ]
    grads = {"bf16": out(torch.bfloat16), "f32 channels_last": out(torch.float32, torch.channels_last)}
    for grad_name, grad in grads.items():
        for transform in (None, t_rows):
            for grad_norm in ("none", "sample_l2"):
                launches = backward_launches(grad, mask, vec, transform, "pixel", "prompt", grad_norm,
                                             torch.empty(batch, 1), torch.empty(batch), torch.empty(1, 3, size, size),
                                             torch.empty(batch, size, TRANSFORM_TAPS + 1))
                vector = grad_name == "bf16" and transform is None
                if transform is not None and grad_norm == "none" and grad_name == "bf16":
                    cases.append(AotCase("bwd adjoint table", launches[0]))
                for launch in launches[1 if transform is not None else 0:]:
                    kind = "norm" if launch.kernel is _compose_bwd_norm_kernel else "accum"
                    name = f"bwd-{kind} {grad_name} {grad_norm}" + (" transform" if transform is not None else "")
                    paths = None
                    if grad_name == "bf16" and transform is None:  # norm: 3 channels per pass, accumulation: 1
                        if kind == "norm":  # + the mask and the partial sum
                            design = LoopDesign(3 * per_thread, 3 * accesses(16) + accesses(32) + 1,
                                                BACKWARD_NORM_BUDGET)
                        else:  # + the coefficient
                            design = LoopDesign(per_thread, accesses(16) + (grad_norm != "none"),
                                                BACKWARD_ACCUM_BUDGET)
                        paths = {"sample": design}
                    elif grad_name == "bf16":  # counted by the 16-bit gathers: 3 x 3 per pixel
                        reads = (3 if kind == "norm" else 1) * KT2 * per_thread
                        paths = {"sample": LoopDesign(reads // KT2, reads, BACKWARD_TRANSFORM_BUDGET,
                                                      inner_trips=TRANSFORM_TAPS, bits=16)}
                    cases.append(AotCase(name, launch, min_load_bits=128 if vector else None,
                                         min_store_bits=128 if kind == "accum" else None, sass_paths=paths))
    return cases
