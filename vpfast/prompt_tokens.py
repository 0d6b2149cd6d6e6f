"""Prompt tokens in a frozen ViT's token sequence: PGN's placement, for open_clip, timm and torchvision ViTs.

``PromptedViT(model)(images, prompts)`` appends M prompt tokens to the token sequence after the positional
embedding and before the pre-norm, with no positional embedding of their own, and removes them again
before pooling (docs/methods.md, PGN; docs/backbones.md):

- open_clip ``VisionTransformer``: after ``+ positional_embedding`` (and patch dropout), before ``ln_pre``,
  so the prompts are ``ln_pre``'d with the image tokens; removed at the transformer's output, before
  ``ln_post`` and the pooling (``tok``, ``avg`` or attentional) and before ``output_tokens``.
- timm ``VisionTransformer``: after ``_pos_embed`` (and ``patch_drop``), before ``norm_pre``; removed before
  the final ``norm``, so the pooling (CLS, ``avg`` over non-prefix tokens, ``map``) sees the image tokens only.
- torchvision ``VisionTransformer``: after the ``encoder.pos_embedding`` addition, before ``encoder.dropout``;
  removed before ``encoder.ln`` (the CLS pooling reads token 0 either way).

The model's code is not touched: a forward pre-hook on the insertion module appends the prompts and a hook
on the removal module strips them. Both are registered once, by the constructor, and act only during a
prompted call of this wrapper (they read the call's prompts from it, and pass everything through otherwise), so
the model called on its own behaves as before; ``remove_hooks()`` takes them off. Registering hooks per call
would stop ``torch.compile`` (``fullgraph=True`` fails on the hook handle's class counter) and make a compiled
backbone recompile on every call; hooks that stay put are traced into the graph. With no prompts (None, or
M = 0) the wrapper calls the model unchanged, so its output equals the frozen forward exactly.

Compiling: ``torch.compile(PromptedViT(model), fullgraph=True)`` traces the whole prompted forward in one graph
(tested for the three families), and a ``FrozenClassifier`` built with ``compile`` traces these hooks into its
compiled forward (one graph per input signature, not one per call).

Prompts come per call: (B, M, d) input-dependent prompts (PGN) or (M, d) static ones shared by the batch
(PGN's IIP baseline, VPT-shallow), held and trained by the caller. Gradients reach the prompts; the
backbone is frozen like ``vpfast.backbones.FrozenClassifier`` (no parameter gradients, always eval mode).
Pass a ``FrozenClassifier`` (from ``from_open_clip``, ``from_timm`` or ``from_torchvision``) to get its
logits (for CLIP, the zero-shot head applies to the prompted image features; autocast as configured), or
a bare ViT to get its own output (open_clip: image features; timm and torchvision: logits).

open_clip's ``transformer.batch_first`` (True in 2.26-3.3, absent at HEAD) only changes the layout *inside*
the ``Transformer`` module, which transposes on entry and exit; its input and output, where the hooks act,
are (batch, tokens, width) in every open_clip from 2.26 on. Older open_clip transposes outside the module
and is refused with an error naming the version.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from vpfast.backbones.frozen import FrozenClassifier

# family -> (module, class name) of the supported ViT classes (subclasses included).
SUPPORTED_VITS = {
    "open_clip": ("open_clip.transformer", "VisionTransformer"),
    "timm": ("timm.models.vision_transformer", "VisionTransformer"),
    "torchvision": ("torchvision.models.vision_transformer", "VisionTransformer"),
}
OPEN_CLIP_MIN_VERSION = (2, 26)


def _supported_names() -> str:
    return ", ".join(f"{module}.{name}" for module, name in SUPPORTED_VITS.values())


def vit_family(vit: nn.Module) -> str | None:
    """'open_clip', 'timm' or 'torchvision' for a supported ViT class, else None.

    A model of one of these classes implies its package is imported, so nothing is imported here.
    """
    for family, (module_name, class_name) in SUPPORTED_VITS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(vit, getattr(module, class_name)):
            return family
    return None


def _check_open_clip_version() -> None:
    version = sys.modules["open_clip"].__version__
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if numbers < OPEN_CLIP_MIN_VERSION:
        raise RuntimeError(f"prompt tokens need open_clip >= {'.'.join(map(str, OPEN_CLIP_MIN_VERSION))} "
                           f"(earlier versions pass (tokens, batch, width) to the transformer), found {version}")


@dataclass(frozen=True)
class _TokenPath:
    """Where one ViT family's token sequence is reached, from the model's public attributes."""

    vit: nn.Module
    patch_conv: nn.Conv2d  # the patch embedding's convolution
    insert_before: nn.Module  # its input: tokens after the positional embedding, before the pre-norm
    strip_module: nn.Module  # prompts are removed at its output (strip_output) or its input
    strip_output: bool
    grid_size: tuple[int, int]


def _token_path(family: str, vit: nn.Module) -> _TokenPath:
    if family == "open_clip":
        _check_open_clip_version()
        return _TokenPath(vit, vit.conv1, vit.ln_pre, vit.transformer, True, tuple(vit.grid_size))
    if family == "timm":
        return _TokenPath(vit, vit.patch_embed.proj, vit.norm_pre, vit.norm, False, tuple(vit.patch_embed.grid_size))
    grid = vit.image_size // vit.patch_size
    return _TokenPath(vit, vit.conv_proj, vit.encoder.dropout, vit.encoder.ln, False, (grid, grid))


def _unwrap(model: nn.Module) -> nn.Module:
    """The ViT the prompts enter: ``model`` itself, or a FrozenClassifier's model or its ``visual`` tower."""
    if not isinstance(model, FrozenClassifier):
        return model
    visual = getattr(model.model, "visual", None)  # from_open_clip: Sequential(visual, head)
    return visual if isinstance(visual, nn.Module) else model.model


def _supported_vit(model: nn.Module) -> tuple[nn.Module, str]:
    """(the ViT the prompts enter, its family); TypeError naming the supported classes for any other model."""
    vit = _unwrap(model)
    family = vit_family(vit)
    if family is None:
        raise TypeError(f"PromptedViT supports {_supported_names()} (bare, or inside a FrozenClassifier; "
                        f"for a whole open_clip CLIP pass its .visual), "
                        f"got {type(vit).__module__}.{type(vit).__qualname__}")
    return vit, family


def token_width(model: nn.Module) -> int:
    """The token width d of the ViT that ``PromptedViT(model)`` would prompt, without wrapping (hooking) it."""
    vit, family = _supported_vit(model)
    return _token_path(family, vit).patch_conv.out_channels


class PromptedViT(nn.Module):
    """A frozen ViT run with M prompt tokens appended after its positional embedding (PGN's placement).

    ``model`` is a ``FrozenClassifier`` around a supported ViT (for open_clip, around its ``visual`` tower
    and zero-shot head) or a bare supported ViT, which is frozen in place the same way. Supported classes
    (and their subclasses): open_clip ``VisionTransformer`` (pass ``clip.visual`` rather than the whole
    CLIP), timm ``VisionTransformer``, torchvision ``VisionTransformer``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        vit, family = _supported_vit(model)
        self.model = model.requires_grad_(False).eval()
        self.family = family
        self._path = _token_path(family, vit)  # holds the ViT without registering it twice
        self._prompts: torch.Tensor | None = None  # the prompts of the call in progress, else None
        self._handles = self._register_hooks()  # never read in forward: torch.compile cannot trace a handle
        self._hooked = True

    @property
    def vit(self) -> nn.Module:
        """The ViT the prompts enter (``model`` itself, or the tower inside it)."""
        return self._path.vit

    @property
    def dim(self) -> int:
        """Token width d."""
        return self._path.patch_conv.out_channels

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self._path.patch_conv.kernel_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch rows and columns at the model's native input size."""
        return self._path.grid_size

    def train(self, mode: bool = True) -> PromptedViT:
        """Whatever the mode asked for, the frozen model stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def linear_patch_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (d, 3, p, p), bias (d,) or None): the patch embedding as the linear map it is.

        Raises if the embedding is not one non-overlapping convolution (e.g. timm's patch-embed norm or a
        hybrid CNN stem), since then no pseudo-inverse exists.
        """
        conv = self._path.patch_conv
        if conv.stride != conv.kernel_size or conv.padding not in ((0, 0), "valid") or conv.groups != 1:
            raise ValueError(f"the patch embedding must be a convolution with stride = kernel and no padding, got "
                             f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}")
        norm = getattr(getattr(self.vit, "patch_embed", None), "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            raise ValueError(f"the patch embedding is not linear: timm patch_embed.norm is {type(norm).__name__}")
        return conv.weight, conv.bias

    def patch_positional_embedding(self) -> torch.Tensor:
        """(G, d) positional embeddings of the G = rows * columns patch positions, in raster order."""
        num_patches = self.grid_size[0] * self.grid_size[1]
        if self.family == "open_clip":
            table = self.vit.positional_embedding
        elif self.family == "timm":
            if self.vit.pos_embed is None:
                return self._path.patch_conv.weight.new_zeros(num_patches, self.dim)
            table = self.vit.pos_embed[0]
        else:
            table = self.vit.encoder.pos_embedding[0]
        return table[-num_patches:]  # prefix (class, register) rows, where present, come first

    def check_prompts(self, prompts: torch.Tensor, images: torch.Tensor) -> None:
        """Raise a ValueError naming the problem unless ``prompts`` is (M, d) or (B, M, d) for these images."""
        if prompts.dim() not in (2, 3) or prompts.shape[-1] != self.dim:
            raise ValueError(f"prompts must be (M, d) or (B, M, d) with d = {self.dim} (the model's token width), "
                             f"got shape {tuple(prompts.shape)}")
        if prompts.dim() == 3 and prompts.shape[0] != images.shape[0]:
            raise ValueError(f"per-sample prompts must have one row per image: batch {images.shape[0]}, "
                             f"got prompts of shape {tuple(prompts.shape)}")
        if prompts.device != images.device or not prompts.is_floating_point():
            raise ValueError(f"prompts must be floating point on the images' device {images.device}, "
                             f"got {prompts.dtype} on {prompts.device}")

    def _register_hooks(self) -> list:
        """The insertion and removal hooks, active only while ``self._prompts`` is set (see the module docstring)."""

        def append(module: nn.Module, args: tuple) -> tuple | None:
            if self._prompts is None:
                return None
            tokens, *rest = args
            batch_prompts = self._prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
            return (torch.cat([tokens, batch_prompts], dim=1), *rest)

        def strip_input(module: nn.Module, args: tuple) -> tuple | None:
            if self._prompts is None:
                return None
            tokens, *rest = args
            return (tokens[:, :-self._prompts.shape[-2]], *rest)

        def strip_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return None if self._prompts is None else output[:, :-self._prompts.shape[-2]]

        path = self._path
        handles = [path.insert_before.register_forward_pre_hook(append)]
        if path.strip_output:
            handles.append(path.strip_module.register_forward_hook(strip_output))
        else:
            handles.append(path.strip_module.register_forward_pre_hook(strip_input))
        return handles

    def remove_hooks(self) -> None:
        """Take the hooks off the model (prompted calls fail afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], False

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """The model's output on ``images`` (normalized, at its input size) with ``prompts`` appended.

        ``prompts``: (B, M, d) per-sample, (M, d) shared, or None; None and M = 0 run the frozen model as is.
        """
        if prompts is None:
            return self.model(images)
        self.check_prompts(prompts, images)
        if prompts.shape[-2] == 0:
            return self.model(images)
        if not self._hooked:
            raise RuntimeError("this PromptedViT's hooks were removed (remove_hooks): it cannot prompt the model")
        self._prompts = prompts
        try:
            return self.model(images)
        finally:
            self._prompts = None

    def extra_repr(self) -> str:
        return f"family={self.family}, dim={self.dim}, patch_size={self.patch_size}, grid_size={self.grid_size}"
