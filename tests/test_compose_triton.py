"""compose's Triton kernels against the reference, on CPU tensors under TRITON_INTERPRET=1 (tiny shapes)."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

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
    Case(transform=True, batch=3, height=9, width=5, size=11, inner=7, offset=(1, 3)),  # odd sizes, off-center
    Case(out_dtype=torch.bfloat16, dtype=torch.uint8),
    Case(out_dtype=torch.float16, channels_last_out=True),
    Case(channels_last_out=True, transform=True, batch=2),
    Case(batch=1, size=12, inner=10, offset=(1, 1)),  # p = 1
    Case(offset=(0, 6), fill=0.7, mask=False),
    Case(height=10, width=10),  # no resize
    Case(batch=1, height=97, width=131, size=24, inner=20, dtype=torch.uint8, antialias=True),
    Case(prompt_space="normalized", normalize=False),
    # compose's flip flags on the plain row-wise path: odd sizes, off-center, uint8 and float, bicubic + antialias
    Case(flip=True, batch=3, height=9, width=5, size=11, inner=7, offset=(1, 3)),
    Case(flip=True, batch=3, dtype=torch.uint8, layout="channels_last", mode="bicubic", antialias=True),
    Case(flip=True, batch=2, height=6, width=7, antialias=True, layout="crop", out_dtype=torch.bfloat16),
    Case(flip=True, batch=2, height=10, width=10, offset=(0, 6), channels_last_out=True),  # no resize
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


def test_batch_loop_with_several_programs_per_tile(monkeypatch):
    """Programs stride over the batch (program_id(1) + k * num_programs(1)): every sample once, forward and
    backward, also when the batch does not divide among the programs."""
    from vpfast.kernels import compose as kernels

    monkeypatch.setattr(kernels, "_programs_wanted", lambda device: 3)
    case = Case(batch=5, size=8, inner=6, height=7, width=5)
    check_forward(case, "cpu", seed=3)
    check_forward(case.but(transform=True, dtype=torch.uint8, out_dtype=torch.bfloat16), "cpu", seed=4)
    check_forward(case.but(flip=True), "cpu", seed=7)  # each sample's own flag
    check_backward(case, "cpu", 5, "prompt", "sample_l2")
    check_backward(case.but(transform=True), "cpu", 6, "canvas", None, torch.bfloat16, "channels_last")


@pytest.mark.parametrize("transform", [False, True])
@pytest.mark.parametrize("dim", ["channel", "row"])
def test_offsets_past_2_31_do_not_wrap(dim, transform):
    """A uint8 view whose channel (or row) offsets pass 2**31 elements: the storage is ~2.1 GB of virtual
    memory, of which only the pages the view covers are touched. The plain and the transformed forward."""
    import vpfast
    from compose_cases import rel_err
    from vpfast.ops.compose import Layout, compose_reference

    batch, height, width = 2, 5, 6
    if dim == "channel":
        strides = (height * width, 2**30 + 64, width, 1)  # channel 2 of each sample starts past 2**31
    else:
        batch, strides = 1, (1, 1, 2**29 + 64, 3)  # row 4 starts past 2**31 (channels interleaved in a row)
    storage = torch.empty(sum((n - 1) * s for n, s in zip((batch, 3, height, width), strides, strict=True)) + 1,
                          dtype=torch.uint8)
    images = storage.as_strided((batch, 3, height, width), strides)
    images.copy_(torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(7), dtype=torch.uint8))
    prompt = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(8))
    rows = torch.tensor([[6, 1, 2, 1], [8, 0, 0, 0]][:batch], dtype=torch.int32) if transform else None
    got = vpfast.ops.compose(images, prompt, inner_size=6, fill=0.5, transform=rows)
    expected = compose_reference(images.contiguous(), prompt, None, None, None, rows, Layout(8, 6, 1, 1), 0.5)
    assert rel_err(got, expected) < 1e-5


def _meta(shape, strides=None, dtype=torch.float32):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t if strides is None else t.as_strided(shape, strides)


@pytest.mark.parametrize("batch", [1, 65_535, 65_536, 1_000_000])
def test_launch_plan_covers_any_batch_within_grid_limits(batch):
    """No grid dimension is the batch: at most MAX_GRID_Y programs along it, each looping over its share."""
    from vpfast.kernels import compose as kernels

    images, out = _meta((batch, 3, 224, 224), dtype=torch.uint8), _meta((batch, 3, 224, 224), dtype=torch.bfloat16)
    term, vec = _meta((3, 224, 224)), _meta((3,))
    launch = kernels.forward_launch(images, vec, vec, None, 164, 30, 30, 0.0, "bilinear", False, term, out,
                                    programs_wanted=10**9)
    tiles, programs = launch.grid
    assert programs == min(batch, kernels.MAX_GRID_Y)
    assert launch.args[5] == batch  # B: program p runs samples p, p + programs, ... < B
    chunks = kernels.backward_chunks(batch, 224, programs_wanted=10**9)
    per_chunk = triton.cdiv(batch, chunks)
    assert chunks <= kernels.MAX_GRID_Y and chunks * per_chunk >= batch and (chunks - 1) * per_chunk < batch
    launches = kernels.backward_launches(out, None, vec, None, "pixel", "prompt", "sample_l2", _meta((batch, tiles)),
                                         _meta((batch,)), _meta((chunks, 3, 224, 224)), programs_wanted=10**9)
    assert all(max(launch.grid) <= 2**31 - 1 and launch.grid[1] <= kernels.MAX_GRID_Y for launch in launches)
    # with the per-sample transform: its taps table, its one-warp forward and the backward's adjoint table
    rows = _meta((batch, 4), dtype=torch.int32)
    plan = kernels.transform_taps_plan(images.shape, 224, 164, "bilinear", False, torch.bfloat16)
    taps = _meta(plan.shape)
    launches = [kernels.transform_taps_launch(images, rows, 224, 164, 30, 30, "bilinear", False, taps, plan,
                                              programs_wanted=10**9),
                kernels.forward_launch(images, vec, vec, taps, 164, 30, 30, 0.0, "bilinear", False, term, out,
                                       programs_wanted=10**9)]
    launches += kernels.backward_launches(out, None, vec, rows, "pixel", "prompt", "sample_l2", _meta((batch, tiles)),
                                          _meta((batch,)), _meta((chunks, 3, 224, 224)),
                                          _meta(kernels.adjoint_table_shape(batch, 224)), programs_wanted=10**9)
    assert all(launch.grid[1] == min(batch, kernels.MAX_GRID_Y) for launch in launches[:3])
    assert all(launch.args[launch.kernel.arg_names.index("B")] == batch for launch in launches)


def test_offsets_are_64_bit_only_when_a_sample_spans_2_31_elements():
    from vpfast.kernels import compose as kernels

    term, vec = _meta((3, 16, 16)), _meta((3,))
    out = _meta((2, 3, 16, 16))

    def wide(images):
        launch = kernels.forward_launch(images, vec, vec, None, 10, 3, 3, 0.0, "bilinear", False, term, out)
        return launch.constexprs["WIDE"]

    assert not wide(_meta((2, 3, 13, 11)))
    assert not wide(_meta((2, 3, 13, 11), (2**40, 1, 33, 3)))  # the batch offset is 64-bit in every kernel
    assert wide(_meta((2, 3, 13, 11), (3 * 2**30, 2**30, 11, 1)))
    assert wide(_meta((2, 3, 13, 11), (33, 1, 2**28, 3)))
    grad = _meta((2, 3, 16, 16), (3 * 2**30, 2**30, 16, 1))
    launches = kernels.backward_launches(grad, None, vec, None, "pixel", "prompt", "none", _meta((2, 1)),
                                         _meta((2,)), _meta((1, 3, 16, 16)))
    assert launches[0].constexprs["WIDE"]


@pytest.mark.parametrize("size", [16, 29, 224])
def test_adjoint_table_holds_every_resized_index_that_reads_a_canvas_index(size):
    """For every per-sample size s <= S: the table's KT candidates of canvas index q carry exactly the
    weights of q's column in the float32 resize matrix (S -> s), and no other resized index reads q."""
    from vpfast.kernels import compose as kernels

    from vpfast.ops.compose import _resize_matrix

    sizes = torch.arange(1, size + 1, dtype=torch.int32)
    transform = torch.stack([sizes, torch.zeros_like(sizes), torch.zeros_like(sizes), torch.zeros_like(sizes)], 1)
    taps = kernels.TRANSFORM_TAPS
    table = torch.full(kernels.adjoint_table_shape(size, size), float("nan"))
    grad = torch.empty(size, 3, size, size)
    launches = kernels.backward_launches(grad, None, None, transform, "pixel", "prompt", "none", torch.empty(size, 1),
                                         torch.empty(size), torch.empty(1, 3, size, size), table)
    launches[0].run()
    assert not table.isnan().any()
    assert not table[:, 1:, size:].any()  # the padding past the canvas: no resized index reads it
    for b, s in enumerate(sizes.tolist()):
        matrix = _resize_matrix(size, s, torch.float32, torch.device("cpu"))  # (s, S)
        lo = table[b, 0, :size].view(torch.int32).long()
        rebuilt = torch.zeros(s + 2 * taps, size)  # rows lo + j, shifted by taps so lo = -1 fits
        for j in range(taps):
            rebuilt[lo + j + taps, torch.arange(size)] = table[b, 1 + j, :size]
        # ATen rounds its lambdas its way: float32 coordinates near S differ by an ulp of S
        assert (rebuilt[taps:taps + s] - matrix).abs().max() < 1e-6 * max(1, size / 16), (size, s)
        assert not rebuilt[:taps].any() and not rebuilt[taps + s:].any()


def test_canvas_wider_than_a_tile():
    """S > 256: two column tiles per row (the second one partly off the canvas), frame-only tiles included.
    One sample: the interpreter runs the ~130 programs one by one (the transform paths took 15 min)."""
    case = Case(batch=1, size=260, inner=200, height=9, width=7, dtype=torch.uint8)
    check_forward(case, "cpu", seed=21)
    check_forward(case.but(batch=2, transform=True, out_dtype=torch.bfloat16), "cpu", seed=22)  # 2 column runs
    check_backward(case, "cpu", 24, "prompt", "sample_l1", torch.bfloat16, "channels_last")


def _axis_matrix(n_in: int, n_out: int, mode: str, antialias: bool) -> torch.Tensor:
    """(n_out, n_in) weights of one axis of F.interpolate (align_corners=False), read off an identity: float32
    coordinates, as the spec computes them (float64 ones move a 224 canvas's weights by ~1e-5)."""
    import torch.nn.functional as F

    eye = torch.eye(n_in).view(1, 1, n_in, n_in)
    return F.interpolate(eye, size=(n_out, n_in), mode=mode, align_corners=False, antialias=antialias)[0, 0].double()


@pytest.mark.parametrize("height,width,inner,size,mode,antialias", [
    (13, 11, 10, 16, "bilinear", False), (224, 224, 164, 224, "bilinear", False), (32, 32, 164, 224, "bilinear", False),
    (13, 11, 10, 16, "bicubic", True), (97, 131, 20, 24, "bilinear", True), (10, 10, 10, 16, "bicubic", False),
    (9, 5, 7, 11, "bilinear", False), (5, 40, 7, 11, "bilinear", False)])  # 40 -> 7: 2 + ceil(5.7) slots
def test_transform_taps_table_is_the_product_of_the_two_resizes(height, width, inner, size, mode, antialias):
    """Per sample and axis, the forward's taps table rebuilds the composite of the image resize placed at the
    offset (mirrored along x for a flip) and the per-sample resize placed at (ty, tx): every image index an output
    reads lies in its KC slots, with its weight; the term's window and the box flag match the per-sample resize."""
    from vpfast.kernels import compose as kernels

    from compose_cases import random_transform

    batch, oy, ox = 6, (size - inner) // 2, size - inner
    transform = random_transform(batch, size, torch.Generator().manual_seed(height + width))
    transform[1, 3] = 1  # one flip, whatever was drawn
    images = torch.empty(batch, 3, height, width)
    plan = kernels.transform_taps_plan(images.shape, size, inner, mode, antialias, torch.bfloat16)
    taps = torch.full(plan.shape, float("nan"))
    kernels.transform_taps_launch(images, transform, size, inner, oy, ox, mode, antialias, taps, plan).run()
    for b, (sz, ty, tx, flip) in enumerate(transform.tolist()):
        for axis, (n_in, off, t, slots) in enumerate([(height, oy, ty, plan.slots_y), (width, ox, tx, plan.slots_x)]):
            image = torch.zeros(size, n_in, dtype=torch.float64)  # the canvas index's image weights
            image[off:off + inner] = _axis_matrix(n_in, inner, mode, antialias)
            if axis == 1 and flip:
                image[off:off + inner] = image[off:off + inner].flip(0)
            place = torch.zeros(size, size, dtype=torch.float64)  # output index <- canvas index
            place[t:t + sz] = _axis_matrix(size, sz, "bilinear", False)
            fields = taps[b, axis, :, :size]
            lo, q = fields[0].view(torch.int32).long(), fields[1].view(torch.int32).long()
            rebuilt = torch.zeros(size, n_in, dtype=torch.float64)
            term = torch.zeros(size, size, dtype=torch.float64)
            for o in range(size):
                rebuilt[o, lo[o]:lo[o] + slots] = fields[5:5 + slots, o].double()
                term[o, q[o]:q[o] + 2] = fields[3:5, o].double()
            assert (rebuilt - place @ image).abs().max() < 1e-5, (b, axis)
            assert (term - place).abs().max() < 1e-5, (b, axis)
            assert torch.equal(fields[2] != 0, place.sum(1) != 0), (b, axis)
