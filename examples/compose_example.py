"""Compose EVP-style prompted CLIP inputs with vpfast.ops.compose and check them against the reference.

    python examples/compose_example.py [--out runs/compose_example] [--batch 4]

Offline and a few seconds on the CPU. On a GPU the op runs its Triton kernels; on the CPU it runs
the reference (the specification), so the comparison below is exact there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vpfast.ops import compose, compose_backward_reference, compose_reference
from vpfast.ops._dispatch import choose
from vpfast.ops.compose import Layout

SIZE, PAD = 224, 30  # EVP: a 224 canvas, a 30 px prompt frame around a 164 x 164 image
INNER = SIZE - 2 * PAD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def synthetic_images(batch: int, height: int = 200, width: int = 240) -> torch.Tensor:
    """uint8 (B, 3, H, W) test patterns: colour ramps under a checkerboard and a disc, one per sample."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    images = []
    for b in range(batch):
        phase = b / batch
        checker = ((8 * x).astype(int) + (8 * y + 8 * phase).astype(int)) % 2
        disc = ((x - 0.5) * width) ** 2 + ((y - 0.5) * height) ** 2 < ((0.15 + 0.2 * phase) * height) ** 2
        rgb = np.stack([x, y, np.full_like(x, phase)]) * (0.5 + 0.5 * checker)
        rgb[:, disc] = [[1.0], [0.9], [0.2]]
        images.append(rgb)
    return torch.from_numpy(np.round(255 * np.stack(images)).astype(np.uint8))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max abs difference, and the same relative to b's largest entry."""
    diff = (a.double() - b.double()).abs().max().item()
    return diff, diff / b.abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compose_example"), help="where the PNG goes")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    images = synthetic_images(args.batch).to(device)
    crop = images[:, :, :, 20:220]  # a 200 x 200 center crop, passed as a strided view (not copied)

    prompt = torch.rand(3, SIZE, SIZE, generator=g).to(device).requires_grad_()  # pixel space, 0..1
    mask = torch.ones(SIZE, SIZE, device=device)
    mask[PAD:PAD + INNER, PAD:PAD + INNER] = 0  # the prompt is visible on the frame only
    mean = torch.tensor(CLIP_MEAN, device=device)
    std = torch.tensor(CLIP_STD, device=device)

    # Per-sample "input diversity": rows (size, ty, tx, flip), drawn by the caller.
    sizes = torch.randint(192, SIZE + 1, (args.batch,), generator=g)
    ty = (torch.rand(args.batch, generator=g) * (SIZE - sizes + 1)).long()
    tx = (torch.rand(args.batch, generator=g) * (SIZE - sizes + 1)).long()
    flip = torch.arange(args.batch) % 2
    transform = torch.stack([sizes, ty, tx, flip], dim=1).int()

    options = dict(mask=mask, mean=mean, std=std, transform=transform, grad_region="canvas", grad_norm="sample_l2")
    out = compose(crop, prompt, inner_size=INNER, **options)
    grad_out = torch.randn(out.shape, generator=g).to(device)  # stands in for dloss/dout
    out.backward(grad_out)

    # The specification: forward steps 1-5, and the prompt gradient with the same region and norm.
    layout = Layout(SIZE, INNER, PAD, PAD)
    rows = transform.to(device)
    ref = compose_reference(crop, prompt.detach(), mask, mean, std, rows, layout)
    ref_grad = compose_backward_reference(grad_out, mask, std, rows, "pixel", "canvas", "sample_l2")
    fwd_abs, fwd_rel = rel_diff(out, ref)
    bwd_abs, bwd_rel = rel_diff(prompt.grad, ref_grad)

    print(f"device {device}, compose backend: {choose('compose', device)}")
    print(f"images {tuple(crop.shape)} {crop.dtype} (strides {crop.stride()}), prompt {tuple(prompt.shape)}")
    print(f"output {tuple(out.shape)} {out.dtype}, prompt gradient {tuple(prompt.grad.shape)}")
    print(f"transform rows (size, ty, tx, flip): {transform.tolist()}")
    print(f"forward  max abs diff vs reference {fwd_abs:.2e} (relative {fwd_rel:.2e})")
    print(f"backward max abs diff vs reference {bwd_abs:.2e} (relative {bwd_rel:.2e})")
    if max(fwd_rel, bwd_rel) > 1e-4:
        raise SystemExit("compose does not match its reference")

    canvas = (out[0].detach() * std.view(3, 1, 1) + mean.view(3, 1, 1)).clamp(0, 1)  # undo the normalization
    pixels = (255 * canvas).round().byte().permute(1, 2, 0).cpu().numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "canvas0.png"
    Image.fromarray(pixels).save(path)
    print(f"wrote {path} (sample 0, de-normalized)")


if __name__ == "__main__":
    main()
