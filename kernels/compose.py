"""Triton kernels for compose (docs/ops.md, compose) and their launchers.

Row-wise design. A program owns one tile of canvas rows x columns and loops over the samples of
its share of the batch, so the batch is not bounded by a grid dimension and everything that does
not depend on the sample is computed once per program: the resize taps (y taps once per row, x
taps once per column, each zeroed off the image so gathers need no masks), the 32-bit offsets
inside a sample, and the per-channel gain. A 64-bit base pointer per sample and channel carries
the batch and channel offsets; offsets inside a sample are 32-bit unless a sample spans 2**31
elements (WIDE). The batch-invariant part of the output (prompt, mask, fill, mean and std) is one
(C, S, S) term computed once per call by ``_compose_term_kernel``; tiles that lie wholly in the
frame copy it without reading the image. With the per-sample transform, separable: a per-sample table
holds each output row's and column's image slots and weights through both resizes (the canvas's bilinear
corners times the image taps) and the term's window, and a one-warp program per canvas row run gathers
them. Backward: the prompt gradient in one pass over the incoming gradient (two for the per-sample
norms), accumulated in float32; the transform's adjoint gathers the 2 x 2 resized pixels that read each
canvas pixel, from a per-sample table. Interpolation follows ATen's float32 formulas
(align_corners=False), the antialiased ones included. The aot tier (vpfast/aot.py) holds each
loop over the batch to a budget of SASS instructions per output element (the *_BUDGET constants).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import AotCase, Launch, LoopDesign

_empty = torch.empty  # every allocation goes through here, so tests can poison it

NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # occupancy the launchers assume (their grids hold PROGRAMS_PER_SM x NUM_WARPS warps per SM)
# Registers per thread at that occupancy (65,536 per SM), passed to every launch as Triton's maxnreg: without it,
# ptxas picks its own target, and Triton 3.6 (ptxas 12.8) compiled the forward to 159-168 registers: 3 programs fit
# per SM, so one program in 4 would wait for a quarter-full last wave; Triton 3.8 (ptxas 12.9) chose 128. The aot
# tier checks for spills under this cap.
MAX_REGISTERS = 65536 // (PROGRAMS_PER_SM * NUM_WARPS * 32)
TILE = 1024  # canvas pixels per program tile for a 16-bit output: 8 per thread, one 128-bit store (half for float32)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y dimension
# SASS instructions per output element allowed in the aot tier (aot.py, sass_per_output), per loop over the batch
FORWARD_IMAGE_BUDGET = 45  # tiles with image pixels: bilinear taps, gathers, gain and term
FORWARD_FRAME_BUDGET = 6  # tiles wholly in the frame: the term, converted and stored
BACKWARD_ACCUM_BUDGET = 5  # 1 128-bit load per 8 bf16 elements, 1 convert and 1 add (or FMA) each, loop control
BACKWARD_NORM_BUDGET = 12  # all channels per sample and the sum over the tile (shuffles, shared memory) per sample
TRANSFORM_TAPS = 2  # resized rows/columns that read a canvas row/column (S/size >= 1: at most 2)
# The per-sample transform (the design's counts, EVP geometry 224 -> 164 from 224 px: 4 x 4 image slots):
# forward, per output element: 16 gathers (load, convert, multiply-add, a pointer step per slot row), the term's
# 2 x 2 window (4 loads with immediate offsets, 6 weight operations), gain, select, convert and the 128-bit store,
# and per sample (over 8 bf16 or 4 float32 pixels per thread, 3 channels) the row's scalars, the columns' table
# loads and the column weights per channel: about 100 for u8 -> bf16 and 72 for f32 -> f32 (sm_90); the budget
# leaves 10 %. Backward, per element and channel: 2 x 2 gathers (clamped coordinates, 64-bit address, load,
# convert, multiply-add), the row and column weights, and per sample the adjoint table's vector loads: 37-38
# for the accumulation, 32-33 for the norm pass (sm_80 / sm_90); the budget leaves 10 %.
FORWARD_TRANSFORM_BUDGET = 110
BACKWARD_TRANSFORM_BUDGET = 42
# With the transform, coordinates round as ATen's float32 ones do: IEEE division for S / size and no FMA
# contraction (enable_fp_fusion=False) in the two kernels that compute them (the forward's taps table and the
# backward's adjoint table); the kernels that read the tables only multiply and add. A resized canvas is
# ill-conditioned in its coordinates: one ulp of a source coordinate near 200 (1.5e-5) times a jump of ~10
# between neighbouring normalized pixels moved the output by 5e-5 of its range on an H100 before this.


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
def _axis_taps(tab, o, valid, t, size, S, scale_t, s, off, in_size, scale_in, flip, SP,
               K: tl.constexpr, KC: tl.constexpr, BICUBIC: tl.constexpr, AA: tl.constexpr):
    """One axis of one sample's transform taps at output indices ``o`` (fields: docstring of the caller).

    The two bilinear corners p0 <= p1 <= p0 + 1 of the per-sample resize give the term's window (q, q + 1);
    their image taps (mirrored with ``flip``) fall in KC consecutive image indices from ``lo``, so each slot's
    weight is the sum of corner weight x image weight over the taps that read it (scattered in place: each
    index ``o`` belongs to one thread).
    """
    r = o - t
    inside = (r >= 0) & (r < size) & (o < S)
    p0, w0 = _tap(r, 0, S, scale_t, False, False)
    p1, w1 = _tap(r, 1, S, scale_t, False, False)
    w0 = tl.where(inside, w0, 0.0)
    w1 = tl.where(inside, w1, 0.0)
    q = tl.minimum(p0, S - 2)  # S >= 2
    tl.store(tab + SP + o, q.to(tl.float32, bitcast=True), mask=valid)
    tl.store(tab + 2 * SP + o, inside.to(tl.float32), mask=valid)
    tl.store(tab + 3 * SP + o, tl.where(p0 == q, w0, 0.0) + tl.where(p1 == q, w1, 0.0), mask=valid)
    tl.store(tab + 4 * SP + o, tl.where(p0 == q + 1, w0, 0.0) + tl.where(p1 == q + 1, w1, 0.0), mask=valid)
    j0 = p0 - off  # the inner image's index of each corner, mirrored for the image flip (off the image stays off)
    j1 = p1 - off
    j0 = tl.where(flip != 0, s - 1 - j0, j0)
    j1 = tl.where(flip != 0, s - 1 - j1, j1)
    lo = tl.full(o.shape, in_size, tl.int32)
    for k in tl.static_range(K):
        i0, _ = _image_tap(j0, k, s, in_size, scale_in, K, BICUBIC, AA)
        i1, _ = _image_tap(j1, k, s, in_size, scale_in, K, BICUBIC, AA)
        lo = tl.minimum(lo, tl.minimum(i0, i1))
    lo = tl.minimum(lo, in_size - KC)  # KC <= in_size: every slot lies on the image
    tl.store(tab + o, lo.to(tl.float32, bitcast=True), mask=valid)
    for k in tl.static_range(KC):
        tl.store(tab + (5 + k) * SP + o, tl.zeros(o.shape, tl.float32), mask=valid)
    for k in tl.static_range(K):  # i - lo < KC (_slots); the bound only keeps a wrong KC from writing elsewhere
        i0, wi0 = _image_tap(j0, k, s, in_size, scale_in, K, BICUBIC, AA)
        slot = tab + (5 + tl.minimum(i0 - lo, KC - 1)) * SP + o
        tl.store(slot, tl.load(slot, mask=valid, other=0.0) + w0 * wi0, mask=valid)
        i1, wi1 = _image_tap(j1, k, s, in_size, scale_in, K, BICUBIC, AA)
        slot = tab + (5 + tl.minimum(i1 - lo, KC - 1)) * SP + o
        tl.store(slot, tl.load(slot, mask=valid, other=0.0) + w1 * wi1, mask=valid)


@triton.jit
def _transform_taps_kernel(
    tab_ptr, t_ptr, B, S, s, oy, ox, H, W, scale_h, scale_w, SP,
    F: tl.constexpr, BLOCK: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, KCH: tl.constexpr,
    KCW: tl.constexpr, Y_BICUBIC: tl.constexpr, Y_AA: tl.constexpr, X_BICUBIC: tl.constexpr, X_AA: tl.constexpr,
):
    """The per-sample transform's taps, separable: for sample b, axis a (0: rows, 1: columns) and output index o,
    F float32 fields at tab[b, a, field, o]: the first image index lo of the KC image slots and the term's canvas
    index q (its window is q, q + 1), both int32 bits, whether o lies in the sample's box, the term weights of q
    and q + 1, and the KC image weights (corner weight x image tap weight, summed per slot; an axis with fewer
    slots than F - 5 leaves the rest unused). Coordinates round as ATen's float32
    ones (IEEE division for S / size, no FMA contraction), so the forward kernel only multiplies and adds.
    """
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = o < SP
    for b in tl.range(tl.program_id(1), B, tl.num_programs(1), loop_unroll_factor=1):
        size = tl.load(t_ptr + b * 4)
        scale_t = tl.math.div_rn(S.to(tl.float32), size.to(tl.float32))
        tab = tab_ptr + tl.cast(b, tl.int64) * (2 * F) * SP
        _axis_taps(tab, o, valid, tl.load(t_ptr + b * 4 + 1), size, S, scale_t, s, oy, H, scale_h, 0, SP, KH, KCH,
                   Y_BICUBIC, Y_AA)
        _axis_taps(tab + F * SP, o, valid, tl.load(t_ptr + b * 4 + 2), size, S, scale_t, s, ox, W, scale_w,
                   tl.load(t_ptr + b * 4 + 3), SP, KW, KCW, X_BICUBIC, X_AA)


@triton.jit
def _compose_transform_fwd_kernel(
    out_ptr, x_ptr, term_ptr, mean_ptr, std_ptr, taps_ptr,
    B, sxb, sxc, sxh, sxw, sob, soc, soh, sow, fill, n_col_tiles, SP,
    S: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, BW: tl.constexpr, KCH: tl.constexpr, KCW: tl.constexpr,
    F: tl.constexpr, UINT8: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr, WIDE: tl.constexpr,
):
    """The forward with the per-sample transform, separable: a program owns one run of BW columns of one canvas
    row and loops over its share of the batch. Per sample, the row's data (image slots, the term's rows and
    their weights) are scalars and the columns' come once from the taps table (_transform_taps_kernel); each
    output is its KCH x KCW image slots weighted by row x column weights, times gain, plus the term's 2 x 2
    window, or the normalized fill outside the sample's box; a row outside the box is fill only. Gathers read
    one 64-bit pointer per pixel plus a row step, so a unit column stride folds into the load's offset; the
    canvas size is a constant, so the term's window and channels are offsets of one pointer too."""
    tile = tl.program_id(0)
    row = tile // n_col_tiles
    X = tl.max_contiguous(tl.multiple_of((tile % n_col_tiles) * BW + tl.arange(0, BW), BW), BW)
    valid = X < S
    cidx = tl.arange(0, CP)
    cmask = cidx < C
    mean = _per_channel(mean_ptr, cidx, cmask, HAS_MEAN, 0.0)
    std = _per_channel(std_ptr, cidx, cmask, HAS_STD, 1.0)
    gain = (1.0 / 255.0 if UINT8 else 1.0) / std
    background = (fill - mean) / std
    out_offs = X.to(tl.int64) * sow if WIDE else X * sow
    for b in tl.range(tl.program_id(1), B, tl.num_programs(1), loop_unroll_factor=1):
        ytab = taps_ptr + tl.cast(b, tl.int64) * (2 * F) * SP + row
        xtab = taps_ptr + tl.cast(b, tl.int64) * (2 * F) * SP + F * SP + X
        ob = out_ptr + tl.cast(b, tl.int64) * sob + tl.cast(row, tl.int64) * soh
        if tl.load(ytab + 2 * SP) != 0.0:
            r_lo = tl.load(ytab).to(tl.int32, bitcast=True)
            r_q = tl.load(ytab + SP).to(tl.int32, bitcast=True)
            r_t0 = tl.load(ytab + 3 * SP)
            r_t1 = tl.load(ytab + 4 * SP)
            c_lo = tl.load(xtab).to(tl.int32, bitcast=True)
            term = term_ptr + (r_q * S + tl.load(xtab + SP).to(tl.int32, bitcast=True))
            c_in = tl.load(xtab + 2 * SP) != 0.0
            c_t0 = tl.load(xtab + 3 * SP)
            c_t1 = tl.load(xtab + 4 * SP)
            if WIDE:
                image_offs = tl.cast(r_lo, tl.int64) * sxh + c_lo.to(tl.int64) * sxw
            else:
                image_offs = r_lo * sxh + c_lo * sxw
            for c in tl.static_range(C):
                pixel = x_ptr + tl.cast(b, tl.int64) * sxb + tl.cast(sxc, tl.int64) * c + image_offs
                image = tl.zeros([BW], tl.float32)
                for ky in tl.range(KCH, loop_unroll_factor=1):  # rolled: KCW x 8 gathers in flight per thread
                    row_sum = tl.zeros([BW], tl.float32)
                    row_ptr = pixel + ky * sxh  # a unit column stride folds into the loads' offsets
                    for kx in tl.static_range(KCW):
                        v = tl.load(row_ptr + kx * sxw)
                        row_sum += tl.load(xtab + (5 + kx) * SP) * v.to(tl.float32)
                    image += tl.load(ytab + (5 + ky) * SP) * row_sum
                tc = term + c * S * S  # the term's window: q and q + 1 on both axes (S >= 2)
                t = (r_t0 * (c_t0 * tl.load(tc) + c_t1 * tl.load(tc + 1))
                     + r_t1 * (c_t0 * tl.load(tc + S) + c_t1 * tl.load(tc + S + 1)))
                y = tl.where(c_in, image * _channel(gain, cidx, c) + t, _channel(background, cidx, c))
                tl.store(ob + tl.cast(soc, tl.int64) * c + out_offs, y.to(out_ptr.dtype.element_ty), mask=valid)
        else:
            for c in tl.static_range(C):
                y = tl.full([BW], _channel(background, cidx, c), tl.float32)
                tl.store(ob + tl.cast(soc, tl.int64) * c + out_offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _compose_fwd_kernel(
    out_ptr, x_ptr, term_ptr, std_ptr, f_ptr,
    B, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    H, W, S, s, oy, ox, scale_h, scale_w, n_col_tiles,
    C: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, Y_BICUBIC: tl.constexpr, Y_AA: tl.constexpr,
    X_BICUBIC: tl.constexpr, X_AA: tl.constexpr, UINT8: tl.constexpr, HAS_STD: tl.constexpr,
    HAS_FLIP: tl.constexpr, WIDE: tl.constexpr,
):
    """Samples program_id(1), program_id(1) + num_programs(1), ... of one canvas tile: image * gain + term.
    With HAS_FLIP (no transform) a flagged sample is read through its mirror image (column W - 1 - i for i,
    a negative column stride): resizing commutes with the mirror, so the taps and weights stay the unflipped ones."""
    r0, c0, Y, X, valid = _tile(S, n_col_tiles, ROWS, BW)
    cidx = tl.arange(0, CP)
    std = _per_channel(std_ptr, cidx, cidx < C, HAS_STD, 1.0)
    gain = (1.0 / 255.0 if UINT8 else 1.0) / std
    out_offs = _offsets(Y, soh, X, sow, WIDE)
    first = tl.program_id(1)
    step = tl.num_programs(1)
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
def _adjoint_table_kernel(a_ptr, t_ptr, S, B, SP, BLOCK: tl.constexpr, KT: tl.constexpr):
    """Per sample and canvas index q, the adjoint of the per-sample resize along one axis: the first resized
    index r0 that reads q (int32 bits) and the weights with which r0 and r0 + 1 read it: KT + 1 = 3 fields of
    SP floats per sample (field-major, so a tile's columns load as vectors; indices past S have weight 0).

    Resized index r reads q when r is in [(q - 0.5) * inv - 0.5, (q + 1.5) * inv - 0.5), inv = size / S <= 1;
    the first tap's index strictly increases with r (a step of S / size >= 1), so at most two consecutive r
    read q: lo = floor of the interval's start, or lo + 1 when lo does not read q.
    """
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = q < SP
    for b in tl.range(tl.program_id(1), B, tl.num_programs(1), loop_unroll_factor=1):
        size = tl.load(t_ptr + b * 4)
        scale_t = tl.math.div_rn(S.to(tl.float32), size.to(tl.float32))
        inv = size.to(tl.float32) / S.to(tl.float32)
        lo = tl.floor((q.to(tl.float32) - 0.5) * inv - 0.5).to(tl.int32)
        w0 = _transform_weight(q, lo, size, S, scale_t)
        w1 = _transform_weight(q, lo + 1, size, S, scale_t)
        w2 = _transform_weight(q, lo + 2, size, S, scale_t)
        shift = w0 == 0.0
        fields = a_ptr + tl.cast(b, tl.int64) * (KT + 1) * SP + q
        tl.store(fields, (lo + shift.to(tl.int32)).to(tl.float32, bitcast=True), mask=valid)
        tl.store(fields + SP, tl.where(shift, w1, w0), mask=valid)
        tl.store(fields + 2 * SP, tl.where(shift, w2, w1), mask=valid)


@triton.jit
def _sample_grad(
    gc_ptr, sgh, sgw, t_ptr, a_ptr, b, Y, X, valid, S, SP,
    HAS_TRANSFORM: tl.constexpr, KT: tl.constexpr, WIDE: tl.constexpr,
):
    """One channel of sample b's gradient with respect to the canvas before the transform, on the tile: with the
    transform, a gather of the KT x KT resized pixels that read each canvas pixel (the adjoint table's rows and
    columns), from clamped coordinates with weight 0 where none reads it."""
    if HAS_TRANSFORM:
        ty = tl.load(t_ptr + b * 4 + 1)
        tx = tl.load(t_ptr + b * 4 + 2)
        ya = a_ptr + tl.cast(b, tl.int64) * (KT + 1) * SP + Y  # the flip mirrors the image only: the prompt
        xa = a_ptr + tl.cast(b, tl.int64) * (KT + 1) * SP + X  # gradient does not see it
        gy0 = ty + tl.load(ya).to(tl.int32, bitcast=True)
        gx0 = tx + tl.load(xa).to(tl.int32, bitcast=True)
        acc = tl.zeros([Y.shape[0], X.shape[0]], tl.float32)
        for jy in tl.static_range(KT):
            gy = tl.minimum(tl.maximum(gy0 + jy, 0), S - 1)
            row = tl.zeros([Y.shape[0], X.shape[0]], tl.float32)
            for jx in tl.static_range(KT):
                gx = tl.minimum(tl.maximum(gx0 + jx, 0), S - 1)
                v = tl.load(gc_ptr + _offsets(gy, sgh, gx, sgw, WIDE))
                row += tl.load(xa + (1 + jx) * SP)[None, :] * v.to(tl.float32)
            acc += tl.load(ya + (1 + jy) * SP)[:, None] * row
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
    part_ptr, go_ptr, m_ptr, std_ptr, t_ptr, a_ptr, sgb, sgc, sgh, sgw, S, SP, B, n_col_tiles, n_tiles,
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
            g = _sample_grad(gc, sgh, sgw, t_ptr, a_ptr, b, Y, X, valid, S, SP, HAS_TRANSFORM, KT, WIDE)
            g = g * _grad_scale(m_ptr, Y, X, valid, std, cidx, c, S, HAS_MASK, HAS_STD)
            part += tl.sum(tl.sum(g * g if L2 else tl.abs(g), axis=1), axis=0)
        tl.store(part_ptr + tl.cast(b, tl.int64) * n_tiles + tl.program_id(0), part)


@triton.jit
def _compose_bwd_accum_kernel(
    part_ptr, go_ptr, coef_ptr, m_ptr, std_ptr, t_ptr, a_ptr, sgb, sgc, sgh, sgw, S, SP, B, per_chunk,
    n_col_tiles,
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
            g = _sample_grad(gc, sgh, sgw, t_ptr, a_ptr, b, Y, X, valid, S, SP, HAS_TRANSFORM, KT, WIDE)
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
                      HAS_STD=std is not None, PIXEL=prompt_space == "pixel", num_warps=NUM_WARPS,
                      maxnreg=MAX_REGISTERS)
    return Launch(_compose_term_kernel, (triton.cdiv(size * size, block),), args, constexprs)


def _slots(in_size: int, inner: int, taps: int) -> int:
    """Image indices that the two bilinear corners of one transform tap read along an axis: each corner's
    ``taps``, the second's first tap at most ceil(in_size / inner) past the first's (adjacent canvas
    indices, the resize's step); never more than the image has."""
    return min(taps + math.ceil(in_size / inner), in_size)


class TransformTaps(NamedTuple):
    """The per-sample transform's taps table: (B, 2, fields, padded) float32, with the image slots per axis."""

    shape: tuple[int, int, int, int]
    slots_y: int
    slots_x: int


def transform_columns(size: int, out_dtype: torch.dtype) -> int:
    """Columns of a program of the transform's forward: one warp, 16 bytes of output per thread (8 bf16 or
    4 float32 on a 224 canvas: one 128-bit store each)."""
    return min(triton.next_power_of_2(size), 32 * 16 // out_dtype.itemsize)


def transform_taps_plan(images_shape, size: int, inner: int, mode: str, antialias: bool,
                        out_dtype: torch.dtype) -> TransformTaps:
    """The taps table of a transformed forward on an S = ``size`` canvas: indices padded to whole column runs."""
    if size < 2:
        raise ValueError(f"the per-sample transform needs a canvas of at least 2 x 2 (prompt size), got {size}")
    batch, _, height, width = images_shape
    columns = transform_columns(size, out_dtype)
    slots_y = _slots(height, inner, _axis(height, inner, mode, antialias)[0])
    slots_x = _slots(width, inner, _axis(width, inner, mode, antialias)[0])
    return TransformTaps((batch, 2, 5 + max(slots_y, slots_x), triton.cdiv(size, columns) * columns), slots_y,
                         slots_x)


def transform_taps_launch(images, transform, size, inner, oy, ox, mode, antialias, taps: torch.Tensor,
                          plan: TransformTaps, programs_wanted: int | None = None) -> Launch:
    """The launch writing the per-sample transform's taps table ``taps`` (``plan.shape``) on an S = ``size``
    canvas."""
    batch, _, height, width = images.shape
    kh, y_bicubic, y_aa = _axis(height, inner, mode, antialias)
    kw, x_bicubic, x_aa = _axis(width, inner, mode, antialias)
    padded = plan.shape[-1]
    block = min(256, triton.next_power_of_2(padded))
    wanted = _programs_wanted(images.device) if programs_wanted is None else programs_wanted
    blocks = triton.cdiv(padded, block)
    return Launch(
        _transform_taps_kernel, (blocks, batch_programs(batch, blocks, wanted)),
        (taps, transform, batch, size, inner, oy, ox, height, width, height / inner, width / inner, padded),
        dict(F=plan.shape[2], BLOCK=block, KH=kh, KW=kw, KCH=plan.slots_y, KCW=plan.slots_x, Y_BICUBIC=y_bicubic,
             Y_AA=y_aa, X_BICUBIC=x_bicubic, X_AA=x_aa, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
             enable_fp_fusion=False),
    )


def forward_launch(images, mean, std, taps, inner, oy, ox, fill, mode, antialias, term: torch.Tensor,
                   out: torch.Tensor, programs_wanted: int | None = None, flip: torch.Tensor | None = None) -> Launch:
    """The launch writing ``out`` (B, C, S, S) = resized image * gain + ``term``; image resized to ``inner``,
    mirrored where ``flip`` ((B,) int32, no transform) is non-zero; with ``taps`` (the per-sample transform's
    table, ``transform_taps_plan``), the transformed canvas instead (its own kernel)."""
    batch, channels, height, width = images.shape
    size = out.shape[-1]
    wanted = _programs_wanted(out.device) if programs_wanted is None else programs_wanted
    dummy = _dummy(images)
    common = dict(C=channels, CP=triton.next_power_of_2(channels), UINT8=images.dtype == torch.uint8,
                  HAS_STD=std is not None,
                  WIDE=_wide(_extent(images), _extent(out), channels * size * size))
    if taps is not None:
        plan = transform_taps_plan(images.shape, size, inner, mode, antialias, out.dtype)
        if tuple(taps.shape) != plan.shape:
            raise ValueError(f"taps must have shape {plan.shape} (transform_taps_plan), got {tuple(taps.shape)}")
        columns = transform_columns(size, out.dtype)
        n_col_tiles = triton.cdiv(size, columns)
        tiles = size * n_col_tiles
        args = (out, images, term, dummy if mean is None else mean, dummy if std is None else std, taps, batch,
                *images.stride(), *out.stride(), float(fill), n_col_tiles, plan.shape[-1])
        constexprs = dict(common, S=size, BW=columns, KCH=plan.slots_y, KCW=plan.slots_x, F=plan.shape[2],
                          HAS_MEAN=mean is not None, num_warps=1, maxnreg=MAX_REGISTERS)
        # one warp per program: as many programs per SM as the plain kernel's warps
        programs = batch_programs(batch, tiles, wanted * NUM_WARPS)
        return Launch(_compose_transform_fwd_kernel, (tiles, programs), args, constexprs)
    kh, y_bicubic, y_aa = _axis(height, inner, mode, antialias)
    kw, x_bicubic, x_aa = _axis(width, inner, mode, antialias)
    # 16 bytes of a contiguous output per thread and channel, one 128-bit store (8 bf16 or 4 float32 pixels: more
    # float32 pixels took 128 registers and spilled under Triton 3.6); fewer pixels for the strided per-element
    # stores to a channels_last output (registers)
    rows, columns = tile_shape(size, TILE * 2 // out.element_size() if out.is_contiguous() else TILE // 2)
    n_col_tiles = triton.cdiv(size, columns)
    tiles = triton.cdiv(size, rows) * n_col_tiles
    args = (
        out, images, term, dummy if std is None else std, dummy if flip is None else flip, batch,
        *images.stride(), *out.stride(),
        height, width, size, inner, oy, ox, height / inner, width / inner, n_col_tiles,
    )
    constexprs = dict(
        common, ROWS=rows, BW=columns, KH=kh, KW=kw, Y_BICUBIC=y_bicubic, Y_AA=y_aa, X_BICUBIC=x_bicubic,
        X_AA=x_aa, HAS_FLIP=flip is not None, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
    )
    return Launch(_compose_fwd_kernel, (tiles, batch_programs(batch, tiles, wanted)), args, constexprs)


def compose_forward(images, prompt, mask, mean, std, transform, inner, oy, ox, fill, mode, antialias, prompt_space,
                    out_dtype, memory_format, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Run the fused forward into a new (B, C, S, S) tensor of ``out_dtype`` and ``memory_format``; with
    ``transform``, its taps table first (one small launch)."""
    channels, size, _ = prompt.shape
    device = images.device
    term = _empty((channels, size, size), dtype=torch.float32, device=device)
    out = _empty((images.shape[0], channels, size, size), dtype=out_dtype, device=device, memory_format=memory_format)
    term_launch(prompt, mask, mean, std, inner, oy, ox, fill, prompt_space, term).run()
    taps = None
    if transform is not None:
        plan = transform_taps_plan(images.shape, size, inner, mode, antialias, out_dtype)
        taps = _empty(plan.shape, dtype=torch.float32, device=device)
        transform_taps_launch(images, transform, size, inner, oy, ox, mode, antialias, taps, plan).run()
    forward_launch(images, mean, std, taps, inner, oy, ox, fill, mode, antialias, term, out, flip=flip).run()
    return out


def backward_launches(grad_out, mask, std, transform, prompt_space, grad_region, grad_norm,
                      norm_part: torch.Tensor, coef: torch.Tensor, accum_part: torch.Tensor,
                      table: torch.Tensor | None = None, programs_wanted: int | None = None) -> list[Launch]:
    """The backward launches: the transform's adjoint table (with a transform), the per-sample norm pass
    (when ``grad_norm`` asks) and the accumulation.

    ``norm_part`` is (B, tiles), ``accum_part`` (chunks, C, S, S), chunks <= min(B, MAX_GRID_Y), and
    ``table`` (``adjoint_table_shape``) float32 with a transform.
    """
    batch, channels, size, _ = grad_out.shape
    padded = adjoint_table_shape(batch, size)[-1]
    rows, columns = tile_shape(size)
    n_col_tiles = triton.cdiv(size, columns)
    tiles = triton.cdiv(size, rows) * n_col_tiles
    wanted = _programs_wanted(grad_out.device) if programs_wanted is None else programs_wanted
    dummy = _dummy(grad_out)
    use_mask = mask is not None and grad_region == "prompt"
    use_std = std is not None and prompt_space == "pixel"
    common = dict(C=channels, CP=triton.next_power_of_2(channels), ROWS=rows, BW=columns, KT=TRANSFORM_TAPS,
                  HAS_MASK=use_mask, HAS_STD=use_std, HAS_TRANSFORM=transform is not None,
                  WIDE=_wide(_extent(grad_out), channels * size * size), num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
    pointers = (mask if use_mask else dummy, std if use_std else dummy, dummy if transform is None else transform,
                dummy if transform is None else table)
    launches = []
    if transform is not None:
        block = min(256, triton.next_power_of_2(padded))
        blocks = triton.cdiv(padded, block)
        launches.append(Launch(
            _adjoint_table_kernel, (blocks, batch_programs(batch, blocks, wanted)),
            (table, transform, size, batch, padded),
            dict(BLOCK=block, KT=TRANSFORM_TAPS, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS, enable_fp_fusion=False),
        ))
    if grad_norm != "none":
        launches.append(Launch(
            _compose_bwd_norm_kernel, (tiles, batch_programs(batch, tiles, wanted)),
            (norm_part, grad_out, *pointers, *grad_out.stride(), size, padded, batch, n_col_tiles, tiles),
            dict(common, L2=grad_norm == "sample_l2"),
        ))
    n_chunks = accum_part.shape[0]
    launches.append(Launch(
        _compose_bwd_accum_kernel, (tiles, n_chunks),
        (accum_part, grad_out, coef, *pointers, *grad_out.stride(), size, padded, batch,
         triton.cdiv(batch, n_chunks), n_col_tiles),
        dict(common, HAS_COEF=grad_norm != "none"),
    ))
    return launches


def adjoint_table_shape(batch: int, size: int) -> tuple[int, int, int]:
    """The backward's adjoint table: (B, TRANSFORM_TAPS + 1, S padded to whole tiles along both axes)."""
    rows, columns = tile_shape(size)
    return batch, TRANSFORM_TAPS + 1, max(triton.cdiv(size, rows) * rows, triton.cdiv(size, columns) * columns)


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
    table = None if transform is None else _empty(adjoint_table_shape(batch, size), dtype=torch.float32,
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
        table = None if transform is None else torch.empty(
            transform_taps_plan(images.shape, size, inner_size, mode, antialias, o.dtype).shape)
        return forward_launch(images, vec, vec, table, inner_size, offset, offset, 0.0, mode, antialias, term, o,
                              flip=flip)

    def accesses(bits: int, pixels: int = per_thread) -> int:  # global accesses for `pixels` contiguous elements
        return pixels * bits // 128

    def plain(out_bits: int, taps: int = 4, flag: int = 0) -> dict:  # image: (the flip flag +) 3 x (gathers +
        # term + store); frame: term + store; 16 bytes of output per thread and channel (forward_launch)
        pixels = 128 // out_bits
        return dict(min_store_bits=128, sass_paths={
            "image": LoopDesign(3 * pixels, flag + 3 * (taps * pixels + accesses(32, pixels) + 1),
                                FORWARD_IMAGE_BUDGET),
            "frame": LoopDesign(3 * pixels, 3 * (accesses(32, pixels) + 1), FORWARD_FRAME_BUDGET)})

    def transformed(images, o) -> dict:  # one warp per canvas row run, 16 bytes of output per thread
        plan = transform_taps_plan(images.shape, size, inner, "bilinear", False, o.dtype)
        pixels = transform_columns(size, o.dtype) // 32
        slots = plan.slots_y * plan.slots_x
        if images.dtype == torch.uint8:  # counted by the 8-bit gathers: 3 x the image slots per pixel
            design = LoopDesign(3 * pixels, 3 * slots * pixels, FORWARD_TRANSFORM_BUDGET, inner_trips=plan.slots_y,
                                bits=8)
        else:  # 32-bit: 3 x (the image slots + the term's 4) per pixel, the row's 5 fields, its weights per channel
            design = LoopDesign(3 * pixels, 3 * (slots + 4) * pixels + 5 + 3 * plan.slots_y, FORWARD_TRANSFORM_BUDGET,
                                inner_trips=plan.slots_y, bits=32)
        return dict(min_store_bits=128, sass_paths={"transform": design})

    def taps(images, o):  # the launch of the transform's taps table for fwd(images, t_rows, "bilinear", False, o)
        plan = transform_taps_plan(images.shape, size, inner, "bilinear", False, o.dtype)
        return transform_taps_launch(images, t_rows, size, inner, pad, pad, "bilinear", False, torch.empty(plan.shape),
                                     plan)

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
        AotCase("fwd transform taps", taps(u8, out(torch.bfloat16))),
        AotCase("fwd u8->bf16 bilinear transform", fwd(u8, t_rows, "bilinear", False, out(torch.bfloat16)),
                **transformed(u8, out(torch.bfloat16))),
        AotCase("fwd f32->f32 bilinear transform", fwd(torch.empty(batch, 3, 224, 224), t_rows, "bilinear", False,
                                                       out(torch.float32)),
                **transformed(torch.empty(batch, 3, 224, 224), out(torch.float32))),
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
                                             torch.empty(adjoint_table_shape(batch, size)))
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
