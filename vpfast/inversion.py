"""Prompt inversion: prompt tokens turned into pixel patches through the pseudo-inverse of the patch embedding.

PGN publishes no inversion code (docs/methods.md, PGN, "[inferred]"); this module decides the method.

**Placement.** The M inverted patches *replace* M patches of the image, at patch positions chosen by the
caller (by default the last M in raster order: the bottom row(s), the end of the row-major patch order).
The composed input has the model's native size and runs through the frozen, unmodified model as plain
pixels, so it works wherever only images can be passed in. (The alternative, an extra row of patches
below the image, keeps all image content but needs positional embeddings for a row the model never had,
i.e. a modified forward: that is no longer "pixels only".)

**Inversion.** The patch embedding is linear: the token of patch position k is ``W vec(x) + b + pos_k``
(W the (d, 3 p^2) convolution weight, b its bias if any: none for open_clip, present for timm and
torchvision; pos_k the position's embedding). To make that token equal a prompt token t, the patch is the
least-squares solution ``vec(x) = W^+ (t - pos_k - b)``. A token at position k enters the transformer
exactly as an appended prompt does (attention is permutation-equivariant, and the prompt's lack of a
positional embedding is compensated by subtracting pos_k), so:

- d <= 3 p^2 and W of full row rank (e.g. ViT-B/32: d 768 <= 3072; B/16: 768 <= 768): ``W W^+ = I``, the
  re-embedded patch reproduces t up to float error, and the pixel run equals the latent run on the image
  *without the M covered patches*; the remaining gap is only that lost image content.
- d > 3 p^2 (e.g. ViT-L/14: 1024 > 588): only the projection of ``t - pos_k - b`` on W's range is
  reachable; ``residual`` reports the relative token error ``||embed(x) - t|| / ||t||`` per prompt.

The patches live in the model's input space (normalized images); nothing clamps them to the valid pixel
range or rounds them to 8 bits, either of which adds error (``x * std + mean`` gives 0..1 pixels).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vpfast.prompt_tokens import PromptedViT


@dataclass(frozen=True)
class InvertedPrompts:
    """Pixel patches standing in for prompt tokens, and where they go.

    ``patches``: (..., M, 3, p, p) in the model's input space, one per prompt (leading dims as the prompts');
    ``positions``: (M,) raster indices of the patches they replace; ``residual``: (..., M) relative token
    error ``||W vec(x) + b + pos_k - t|| / ||t||`` (float error when the embedding is invertible);
    ``exact``: whether the embedding has full row rank d, so every token is reachable.
    """

    patches: torch.Tensor
    positions: torch.Tensor
    residual: torch.Tensor
    exact: bool


@dataclass(frozen=True)
class InversionGap:
    """How far the pixel version of some prompts is from the prompts themselves, on one batch.

    Logit differences are between the model with latent prompts on the full images and the model on the
    images with the inverted patches pasted in; ``top1_agreement`` is the fraction of images whose
    top-1 class is the same; ``mean_residual`` the mean relative token error of the inversion.
    """

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    mean_residual: float


def default_positions(num_prompts: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """The last ``num_prompts`` patch positions in raster order (the bottom of the image)."""
    num_patches = grid_size[0] * grid_size[1]
    if not 0 < num_prompts < num_patches:
        raise ValueError(f"the number of prompts to invert must be in [1, {num_patches - 1}] (the model has "
                         f"{num_patches} patches and some must stay image), got {num_prompts}")
    return torch.arange(num_patches - num_prompts, num_patches)


def _check_positions(positions: Sequence[int] | torch.Tensor, num_prompts: int, num_patches: int) -> torch.Tensor:
    positions = torch.as_tensor(positions, dtype=torch.long).flatten().cpu()
    if len(positions) != num_prompts or len(set(positions.tolist())) != num_prompts:
        raise ValueError(f"positions must be {num_prompts} distinct patch indices (one per prompt), "
                         f"got {positions.tolist()}")
    if positions.min() < 0 or positions.max() >= num_patches:
        raise ValueError(f"positions must be raster patch indices in [0, {num_patches - 1}], got {positions.tolist()}")
    return positions


@dataclass(frozen=True)
class PatchInverse:
    """The linear map from prompt tokens to pixel patches at fixed positions: what a pixel deployment keeps.

    ``patch = (t - offset_k) @ pinv.T`` with ``offset_k`` the positional embedding (plus the patch bias) at
    position k and ``pinv`` the pseudo-inverse of ``matrix`` (d, 3 p^2), the patch embedding. float64.
    """

    matrix: torch.Tensor
    offset: torch.Tensor
    positions: torch.Tensor
    patch_shape: tuple[int, int, int]

    @functools.cached_property
    def pinv(self) -> torch.Tensor:
        return torch.linalg.pinv(self.matrix)

    @functools.cached_property
    def exact(self) -> bool:
        """Whether the embedding has full row rank d, so every token is reachable."""
        return int(torch.linalg.matrix_rank(self.matrix)) == self.matrix.shape[0]

    def invert(self, prompts: torch.Tensor) -> InvertedPrompts:
        """Patches for ``prompts`` ((M, d) or (B, M, d)), in their dtype, differentiable with respect to them."""
        num_prompts, dim = self.offset.shape
        if prompts.dim() not in (2, 3) or tuple(prompts.shape[-2:]) != (num_prompts, dim):
            raise ValueError(f"prompts must be (M, d) or (B, M, d) with M = {num_prompts} and d = {dim}, "
                             f"got shape {tuple(prompts.shape)}")
        target = prompts.double() - self.offset.to(prompts.device)
        pixels = target @ self.pinv.to(prompts.device).t()  # (..., M, 3 p^2)
        error = pixels @ self.matrix.to(prompts.device).t() - target
        residual = error.norm(dim=-1) / prompts.double().norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
        patches = pixels.to(prompts.dtype).unflatten(-1, self.patch_shape)
        return InvertedPrompts(patches, self.positions, residual.detach().to(prompts.dtype), self.exact)


def patch_inverse(vit: PromptedViT, num_prompts: int, positions: Sequence[int] | torch.Tensor | None = None,
                  device: torch.device | str | None = None) -> PatchInverse:
    """The pseudo-inverse of ``vit``'s patch embedding for ``num_prompts`` prompts at ``positions``."""
    if positions is None:
        positions = default_positions(num_prompts, vit.grid_size)
    positions = _check_positions(positions, num_prompts, vit.grid_size[0] * vit.grid_size[1])
    weight, bias = vit.linear_patch_embedding()
    as_float64 = {"device": device if device is not None else weight.device, "dtype": torch.float64}
    matrix = weight.detach().to(**as_float64).flatten(1)  # (d, 3 p^2), columns in (channel, row, column) order
    offset = vit.patch_positional_embedding().detach().to(**as_float64)[positions.to(as_float64["device"])]
    if bias is not None:
        offset = offset + bias.detach().to(**as_float64)
    return PatchInverse(matrix, offset, positions, tuple(weight.shape[1:]))


def invert_prompts(
    vit: PromptedViT,
    prompts: torch.Tensor,
    positions: Sequence[int] | torch.Tensor | None = None,
) -> InvertedPrompts:
    """Pixel patches whose embeddings at ``positions`` best reproduce ``prompts`` ((M, d) or (B, M, d)).

    Solved in float64 through the pseudo-inverse of the patch embedding; the patches come back in the
    prompts' dtype and stay differentiable with respect to the prompts.
    """
    if prompts.dim() not in (2, 3) or prompts.shape[-1] != vit.dim:
        raise ValueError(f"prompts must be (M, d) or (B, M, d) with d = {vit.dim}, got shape {tuple(prompts.shape)}")
    return patch_inverse(vit, prompts.shape[-2], positions, prompts.device).invert(prompts)


def paste_patches(images: torch.Tensor, inverted: InvertedPrompts) -> torch.Tensor:
    """``images`` (B, 3, H, W) with the inverted patches in place of the image patches at their positions.

    H and W must be whole multiples of the patch size (the model's native input); the result is a new
    tensor, differentiable with respect to the patches.
    """
    patches = inverted.patches
    channels, patch_h, patch_w = patches.shape[-3:]
    batch, image_channels, height, width = images.shape
    if image_channels != channels or height % patch_h or width % patch_w:
        raise ValueError(f"images must be (B, {channels}, H, W) with H and W multiples of the patch size "
                         f"{(patch_h, patch_w)}, got shape {tuple(images.shape)}")
    if patches.dim() == 5 and patches.shape[0] != batch:
        raise ValueError(f"per-sample patches must have one row per image: batch {batch}, "
                         f"got patches of shape {tuple(patches.shape)}")
    rows, cols = height // patch_h, width // patch_w
    tiles = images.reshape(batch, channels, rows, patch_h, cols, patch_w).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(batch, rows * cols, channels, patch_h, patch_w)
    source = patches.to(images.dtype).expand(batch, *patches.shape[-4:])
    tiles = tiles.index_copy(1, inverted.positions.to(images.device), source)
    tiles = tiles.reshape(batch, rows, cols, channels, patch_h, patch_w).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(batch, channels, height, width)


def run_inverted(
    vit: PromptedViT,
    images: torch.Tensor,
    prompts: torch.Tensor,
    positions: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The frozen model's output on pixels only: ``images`` with ``prompts`` inverted and pasted in."""
    return vit(paste_patches(images, invert_prompts(vit, prompts, positions)))


@torch.no_grad()
def inversion_gap(
    vit: PromptedViT,
    images: torch.Tensor,
    prompts: torch.Tensor,
    positions: Sequence[int] | torch.Tensor | None = None,
) -> InversionGap:
    """Compare the model with latent ``prompts`` to the model on the pixel version of them (one batch)."""
    inverted = invert_prompts(vit, prompts, positions)
    latent = vit(images, prompts).float()
    pixel = vit(paste_patches(images, inverted)).float()
    difference = (latent - pixel).abs()
    return InversionGap(
        max_abs_logit_diff=difference.max().item(),
        mean_abs_logit_diff=difference.mean().item(),
        top1_agreement=(latent.argmax(-1) == pixel.argmax(-1)).float().mean().item(),
        mean_residual=inverted.residual.float().mean().item(),
    )
