"""Pro-tuning (Nie et al., TCSVT 2023, arXiv 2207.14381): light, input-dependent prompt blocks on the features
entering each stage of a frozen backbone, for classification and dense prediction (docs/methods.md, Pro-tuning).

Each block maps a stage's input x to ``x + beta * g(x)`` with a zero-initialized per-channel scale beta, so a
freshly wrapped model computes exactly what the frozen one does. The paper's block has no public code and is
[NOT VERIFIED]; the design here follows the third-party jimmylin0979/PAT ``PromptBlock`` without its SE gate
(whose output is passed on instead of scaling, a bug) and without its final group conv:
g = 1x1 group conv (C -> C/ratio) -> GELU -> k x k depthwise conv -> GELU -> 1x1 conv (-> C).

The blocks enter through forward pre-hooks on the *first block* of each stage (not the stage container, so
timm's flattened gradient checkpointing cannot skip them). The hooks are registered once and act only while
``ProTuning`` runs the model (or inside ``installed()``), so the model called on its own is unchanged;
hooks that stay put are traced by ``torch.compile`` (a ``ProTuning`` compiles with ``fullgraph=True``), where
hooks added per call are not. They return new tensors and never edit saved activations (open_clip's
ModifiedResNet uses in-place ReLUs). The backbone (the module holding
the stages) is frozen: no gradients, and eval mode whatever mode the wrapper is put in, so its BatchNorm
statistics never move. Modules outside it (segmentation and detection heads, FPN) keep their own settings.

Supported backbones, found as the first match among the model's modules:

- ResNet-style, stages ``layer1..layer4``: torchvision and timm ResNets, open_clip ``ModifiedResNet`` (RN50-style
  CLIP), and the ResNet bodies of torchvision segmentation (FCN, DeepLabV3) and detection (Faster R-CNN) models;
- timm ``EfficientNet`` (e.g. ``tf_efficientnet_lite0``), stages ``blocks[i]``;
- ViTs from open_clip, timm and torchvision: ``vit_stages`` groups of consecutive transformer blocks; at each
  group's first block the patch tokens are reshaped to a (B, d, H, W) grid, prompted and flattened back, while
  class and other prefix tokens pass through unchanged.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vpfast.prompt_tokens import vit_family

SUPPORTED = ("ResNet-style models with stages layer1..layer4 (torchvision/timm ResNet, open_clip ModifiedResNet, "
             "torchvision FCN/DeepLabV3/Faster R-CNN ResNet backbones), timm EfficientNet (stages blocks[i]), "
             "and open_clip, timm or torchvision VisionTransformer")


class PromptBlock(nn.Module):
    """``x + beta * g(x)`` on (B, C, H, W) features; beta (C,) starts at zero, so the block starts as the identity.

    g = 1x1 conv C -> C/ratio in ``groups`` groups (reduced to a common divisor) -> GELU -> ``kernel_size``
    depthwise conv -> GELU -> 1x1 conv back to C. No normalization layer, so train and eval compute the same.
    """

    def __init__(self, channels: int, ratio: int = 4, kernel_size: int = 5, groups: int = 4,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        groups = math.gcd(groups, channels, hidden)
        factory = dict(device=device, dtype=dtype)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, groups=groups, **factory),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, **factory),
            nn.GELU(),
            nn.Conv2d(hidden, channels, 1, **factory),
        )
        self.beta = nn.Parameter(torch.zeros(channels, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.beta.view(1, -1, 1, 1) * self.body(x)).to(x.dtype)


@dataclass(frozen=True)
class _ViTLayout:
    """How one ViT's tokens map to a grid at a block's input."""

    patch_conv: nn.Conv2d  # its output's spatial size is the token grid of the current call
    num_prefix: int  # class / register tokens before the patch tokens
    batch_first: bool  # False: blocks see (tokens, batch, width) (open_clip with transformer.batch_first False)


@dataclass(frozen=True)
class Stages:
    """Where the prompt blocks of one backbone go: the frozen module, and each stage's first block and width."""

    backbone: nn.Module
    entries: tuple[nn.Module, ...]
    channels: tuple[int, ...]
    vit: _ViTLayout | None = None


def _in_channels(stage: nn.Module) -> int:
    conv = next((m for m in stage.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise TypeError(f"cannot tell the input width of stage {type(stage).__name__}: it has no Conv2d")
    return conv.in_channels


def _is_timm_efficientnet(module: nn.Module) -> bool:
    efficientnet = sys.modules.get("timm.models.efficientnet")
    return efficientnet is not None and isinstance(module, efficientnet.EfficientNet)


def _cnn_stages(backbone: nn.Module, stages: Sequence[nn.Module]) -> Stages:
    entries = tuple(stage[0] for stage in stages)
    return Stages(backbone, entries, tuple(_in_channels(stage) for stage in stages))


def _vit_stages(backbone: nn.Module, family: str, vit_stages: int) -> Stages:
    if family == "open_clip":
        blocks, conv, prefix = backbone.transformer.resblocks, backbone.conv1, 1
        batch_first = getattr(backbone.transformer, "batch_first", True)
    elif family == "timm":
        blocks, conv, prefix, batch_first = backbone.blocks, backbone.patch_embed.proj, backbone.num_prefix_tokens, True
    else:
        blocks, conv, prefix, batch_first = backbone.encoder.layers, backbone.conv_proj, 1, True
    depth = len(blocks)
    if not 1 <= vit_stages <= depth:
        raise ValueError(f"vit_stages must be in [1, {depth}] (the ViT's depth), got {vit_stages}")
    entries = tuple(blocks[i * depth // vit_stages] for i in range(vit_stages))
    layout = _ViTLayout(conv, prefix, batch_first)
    return Stages(backbone, entries, (conv.out_channels,) * vit_stages, layout)


def find_stages(model: nn.Module, vit_stages: int = 4) -> Stages:
    """The stages of the first supported backbone among ``model.modules()``; TypeError naming the supported ones."""
    for module in model.modules():
        family = vit_family(module)
        if family is not None:
            return _vit_stages(module, family, vit_stages)
        if _is_timm_efficientnet(module):
            return _cnn_stages(module, list(module.blocks))
        layers = [getattr(module, f"layer{i}", None) for i in range(1, 5)]
        if all(isinstance(layer, nn.Sequential) and len(layer) for layer in layers):
            return _cnn_stages(module, layers)
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    raise TypeError(f"Pro-tuning supports {SUPPORTED}; found none in {name}")


def _first_float_parameter(module: nn.Module) -> torch.Tensor | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def make_blocks(stages: Stages, ratio: int = 4, kernel_size: int = 5, groups: int = 4) -> nn.ModuleList:
    """One zero-initialized PromptBlock per stage, on the backbone's device and in its dtype."""
    for name, value in (("ratio", ratio), ("kernel_size", kernel_size), ("groups", groups)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
    reference = _first_float_parameter(stages.backbone)
    factory = {} if reference is None else dict(device=reference.device, dtype=reference.dtype)
    return nn.ModuleList(PromptBlock(c, ratio, kernel_size, groups, **factory) for c in stages.channels)


def _cnn_hook(block: PromptBlock, owner: ProTuning):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not owner._active:
            return None
        if not args:
            raise TypeError(f"Pro-tuning expects the features as the first positional argument of "
                            f"{type(module).__name__}")
        return (block(args[0]), *args[1:])

    return hook


def _vit_hook(block: PromptBlock, layout: _ViTLayout, owner: ProTuning):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not owner._active:
            return None
        tokens = args[0] if layout.batch_first else args[0].transpose(0, 1)
        prefix, patches = tokens[:, :layout.num_prefix], tokens[:, layout.num_prefix:]
        if owner._grid is None:
            raise RuntimeError("Pro-tuning saw no patch embedding in this call, so it cannot shape the token grid")
        rows, cols = owner._grid
        if patches.shape[1] != rows * cols:
            raise ValueError(f"Pro-tuning expects {layout.num_prefix} prefix tokens and a {rows}x{cols} patch grid, "
                             f"got {tokens.shape[1]} tokens")
        batch, width = patches.shape[0], patches.shape[2]
        prompted = block(patches.transpose(1, 2).reshape(batch, width, rows, cols)).flatten(2).transpose(1, 2)
        tokens = torch.cat([prefix, prompted], dim=1)
        return (tokens if layout.batch_first else tokens.transpose(0, 1), *args[1:])

    return hook


class ProTuning(nn.Module):
    """A model whose frozen backbone runs with Pro-tuning prompt blocks before each stage.

    ``model`` is a classifier (e.g. a ``FrozenClassifier``), a segmentation or a detection model, called as
    usual through this wrapper (``forward`` passes every argument on). Its backbone (see the module docstring)
    is frozen in place; ``trainable`` names submodules of ``model`` inside the backbone that train with the
    blocks anyway (e.g. a new classification head ``"fc"``). Blocks: hidden width C/``ratio``, ``kernel_size``
    depthwise conv, ``groups`` in the first 1x1 conv. ``vit_stages``: groups of ViT blocks, each prompted once.
    """

    def __init__(self, model: nn.Module, *, trainable: Sequence[str] = (), ratio: int = 4, kernel_size: int = 5,
                 groups: int = 4, vit_stages: int = 4) -> None:
        super().__init__()
        self._stages = find_stages(model, vit_stages)
        self.model = model
        self._stages.backbone.requires_grad_(False).eval()
        self.trainable = tuple(trainable)
        for name in self.trainable:
            try:
                self.model.get_submodule(name).requires_grad_(True)
            except AttributeError as error:
                raise ValueError(f"trainable names no submodule of the model: {name!r} ({error})") from error
        self.blocks = make_blocks(self._stages, ratio, kernel_size, groups)
        self._active = False  # the hooks act only while True (inside installed())
        self._grid: tuple[int, int] | None = None  # ViTs: the patch grid of the call in progress
        self._handles = self._register_hooks()  # never read in forward: torch.compile cannot trace a hook handle
        self._hooked = True

    @property
    def backbone(self) -> nn.Module:
        """The frozen module holding the prompted stages."""
        return self._stages.backbone

    def train(self, mode: bool = True) -> ProTuning:
        """The blocks and the modules outside the backbone follow ``mode``; the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        for name in self.trainable:
            self.model.get_submodule(name).train(mode)
        return self

    def _register_hooks(self) -> list:
        """A pre-hook per stage entry (and, for ViTs, one recording the patch grid), acting only while ``_active``."""
        stages, handles = self._stages, []
        if stages.vit is not None:
            def record_grid(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if self._active:
                    self._grid = tuple(output.shape[-2:])

            handles.append(stages.vit.patch_conv.register_forward_hook(record_grid))
        for entry, block in zip(stages.entries, self.blocks, strict=True):
            hook = _cnn_hook(block, self) if stages.vit is None else _vit_hook(block, stages.vit, self)
            handles.append(entry.register_forward_pre_hook(hook))
        return handles

    def remove_hooks(self) -> None:
        """Take the hooks off the model (the blocks no longer act; ``installed()`` raises afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Prompt the backbone's stages inside the ``with`` statement (to call parts of the model directly)."""
        if self._active:
            yield
            return
        if not self._hooked:
            raise RuntimeError("this ProTuning's hooks were removed (remove_hooks): it cannot prompt the model")
        self._active, self._grid = True, None
        try:
            yield
        finally:
            self._active, self._grid = False, None

    def forward(self, *args, **kwargs):
        """The model's output on these arguments, with the prompt blocks in its backbone."""
        with self.installed():
            return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"backbone={type(self.backbone).__name__}, stages={len(self.blocks)}, trainable={self.trainable}"


class ProTuningAdapter(nn.Module):
    """Pro-tuning as a ``PromptedClassifier`` adapter: normalized images -> source logits.

    Only the prompt blocks are registered here, so a checkpoint saves them alone; the frozen classifier is
    registered (and moved to its device) by the ``PromptedClassifier`` that holds it.
    """

    def __init__(self, classifier: nn.Module, *, ratio: int = 4, vit_stages: int = 4) -> None:
        super().__init__()
        protuning = ProTuning(classifier, ratio=ratio, vit_stages=vit_stages)
        self.ratio, self.vit_stages = ratio, vit_stages  # what rebuilds it (vpfast.pretrained)
        self.blocks = protuning.blocks
        self._protuning = (protuning,)  # a tuple, so the classifier is not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._protuning[0](x)


def _head(model: nn.Module) -> nn.Module | None:
    """The classification head a linear probe would train: timm ``get_classifier()``, torchvision fc/heads."""
    for module in model.modules():
        if hasattr(module, "get_classifier"):
            return module.get_classifier()
        for name in ("fc", "heads"):
            head = getattr(module, name, None)
            if isinstance(head, nn.Module):
                return head
    return None


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(model: nn.Module, *, ratio: int = 4, kernel_size: int = 5, groups: int = 4,
                     vit_stages: int = 4) -> dict[str, int | None]:
    """Trained parameters per method for ``model``; the model is not changed.

    ``protuning``: the prompt blocks; ``protuning_head``: blocks and the classification head; ``linear_probe``:
    the head alone; ``full_finetune``: every parameter. The head entries are None when no head is found
    (e.g. an open_clip tower, whose zero-shot head has no parameters).
    """
    blocks = _count(make_blocks(find_stages(model, vit_stages), ratio, kernel_size, groups))
    head = _head(model)
    return {
        "protuning": blocks,
        "protuning_head": None if head is None else blocks + _count(head),
        "linear_probe": None if head is None else _count(head),
        "full_finetune": _count(model),
    }
