"""Input builders for the compose tests: fresh random data, odd shapes, strided and channels_last views."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Case:
    batch: int = 2
    height: int = 13
    width: int = 11
    size: int = 16
    inner: int = 10
    offset: tuple[int, int] | None = None
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # contiguous | channels_last | crop
    mode: str = "bilinear"
    antialias: bool = False
    mask: bool = True
    normalize: bool = True
    fill: float = 0.25
    prompt_space: str = "pixel"
    transform: bool = False
    flip: bool = False  # compose's flip flags (the first sample flipped, the second not)
    out_dtype: torch.dtype | None = None
    channels_last_out: bool = False

    def but(self, **changes) -> Case:
        return replace(self, **changes)

    def __str__(self) -> str:
        fields = (f"B{self.batch} {self.height}x{self.width}->{self.inner}/{self.size} {str(self.dtype)[6:]} "
                  f"{self.layout} {self.mode}{'-aa' if self.antialias else ''} {self.prompt_space}")
        return fields + (" T" if self.transform else "") + (" F" if self.flip else "")


def random_transform(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Rows (size, ty, tx, flip) that fit on the canvas; the first row is the identity."""
    rows = [[size, 0, 0, 0]]
    for _ in range(batch - 1):
        sz = int(torch.randint(max(1, size // 2), size + 1, (), generator=generator))
        ty = int(torch.randint(0, size - sz + 1, (), generator=generator))
        tx = int(torch.randint(0, size - sz + 1, (), generator=generator))
        rows.append([sz, ty, tx, int(torch.randint(0, 2, (), generator=generator))])
    return torch.tensor(rows, dtype=torch.int32)


def make_inputs(case: Case, device: str = "cpu", seed: int = 0, prompt_dtype=torch.float32):
    """(images, prompt, kwargs for vpfast.ops.compose), all freshly random for ``seed``."""
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, 3, case.height + 5, case.width + 7) if case.layout == "crop" else \
        (case.batch, 3, case.height, case.width)
    if case.dtype == torch.uint8:
        images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        images = torch.rand(shape, generator=g, dtype=torch.float64).to(case.dtype)
    if case.layout == "crop":
        images = images[:, :, 2:2 + case.height, 3:3 + case.width]
    elif case.layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    prompt = torch.randn(3, case.size, case.size, generator=g, dtype=torch.float64).to(prompt_dtype)
    kwargs = dict(
        inner_size=case.inner, offset=case.offset, fill=case.fill, mode=case.mode, antialias=case.antialias,
        prompt_space=case.prompt_space, out_dtype=case.out_dtype,
        memory_format=torch.channels_last if case.channels_last_out else torch.contiguous_format,
    )
    if case.mask:
        kwargs["mask"] = (torch.rand(case.size, case.size, generator=g) > 0.4).to(prompt_dtype).to(device)
    if case.normalize:
        kwargs["mean"] = torch.tensor(CLIP_MEAN, device=device)
        kwargs["std"] = torch.tensor(CLIP_STD, device=device)
    if case.transform:
        kwargs["transform"] = random_transform(case.batch, case.size, g).to(device)
    if case.flip:
        flags = torch.randint(0, 2, (case.batch,), generator=g, dtype=torch.uint8)
        flags[0], flags[1:2] = 1, 0
        kwargs["flip"] = flags.to(device)
    return images.to(device), prompt.to(device), kwargs


def reference_args(images, prompt, kwargs):
    """Positional arguments of vpfast.ops.compose_reference for the same call."""
    from vpfast.ops.compose import Layout

    size = prompt.shape[-1]
    inner = kwargs["inner_size"]
    oy, ox = kwargs["offset"] or ((size - inner) // 2, (size - inner) // 2)
    return (images, prompt, kwargs.get("mask"), kwargs.get("mean"), kwargs.get("std"), kwargs.get("transform"),
            Layout(size, inner, oy, ox), kwargs["fill"], kwargs["mode"], kwargs["antialias"],
            kwargs["prompt_space"], kwargs.get("flip"))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


def cast_like_triton(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype as the Triton kernels round it here.

    On a GPU that is round-to-nearest-even, as torch does. Triton's interpreter
    (triton 3.8) truncates float32 -> bfloat16 instead, whatever rounding mode
    the kernel asks for; under it the eager baseline is truncated the same way.
    """
    if dtype == torch.bfloat16 and t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return t.to(dtype)


def check_forward(case: Case, device: str, seed: int) -> None:
    """The op (with whatever backend the test forces) against the float32 and float64 references."""
    import vpfast

    images, prompt, kwargs = make_inputs(case, device, seed)
    out = vpfast.ops.compose(images, prompt, **kwargs)
    ref32 = compose_reference_for(images, prompt, kwargs, torch.float32)
    ref64 = compose_reference_for(images, prompt, kwargs, torch.float64)
    out_dtype = case.out_dtype or torch.float32
    memory_format = torch.channels_last if case.channels_last_out else torch.contiguous_format
    assert out.dtype == out_dtype and out.shape == ref32.shape
    assert out.is_contiguous(memory_format=memory_format)
    assert not out.isnan().any(), "unwritten (poisoned) output elements"
    if out_dtype == torch.float32:
        assert rel_err(out, ref32) < 1e-5
    else:  # no worse than twice eager PyTorch's own error in that dtype, both against float64
        assert rel_l2(out, ref64) <= 2 * rel_l2(cast_like_triton(ref32, out_dtype), ref64)


def compose_reference_for(images, prompt, kwargs, dtype):
    from vpfast.ops.compose import compose_reference

    return compose_reference(*reference_args(images, prompt.to(dtype), kwargs))


def check_backward(case: Case, device: str, seed: int, grad_region: str, grad_norm: str | None,
                   grad_dtype=torch.float32, grad_layout: str = "contiguous") -> None:
    """The backward op (forced backend) against the float64 reference backward."""
    from vpfast.ops.compose import compose_backward_reference

    _, prompt, kwargs = make_inputs(case, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(case.batch, 3, case.size, case.size, generator=g).to(grad_dtype)
    if grad_layout == "channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "transposed":
        grad_out = grad_out.transpose(2, 3).contiguous().transpose(2, 3)
    grad_out = grad_out.to(device)
    args = (kwargs.get("mask"), kwargs.get("std"), kwargs.get("transform"), case.prompt_space, grad_region)
    got = torch.ops.vpfast.compose_backward(grad_out, *args, grad_norm or "none", torch.float32)
    # With the transform, the resize's float32 coordinates are part of the spec, as ATen's float32 interpolate
    # computes them: float64 coordinates move a 224-px canvas's gradient by ~2e-5 of its range.
    spec_dtype = torch.float32 if case.transform else torch.float64
    expected = compose_backward_reference(grad_out, *args, grad_norm, spec_dtype)
    assert got.dtype == torch.float32 and got.shape == prompt.shape
    assert not got.isnan().any(), "unwritten (poisoned) gradient elements"
    assert rel_err(got, expected) < 1e-5
