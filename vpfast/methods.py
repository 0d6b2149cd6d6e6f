"""The method registry: one record per method, read by the config, the builders, the demo, export and the CLI.

A record says what a method is (its kind and modules), its released recipe defaults, how to build its
trained part from a ``TrainConfig`` and a frozen backbone, and what ``vpfast export`` and the demo do
with it. Adding a method is one record here, its module and its tests (docs/adding-a-method.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from vpfast.backbones.frozen import FrozenClassifier
    from vpfast.train.config import TrainConfig

KINDS = ("pixel", "tokens", "adapter")
REFERENCE_SIZE, REFERENCE_PAD = 224, 30  # the released frames: 30 px of a 224 canvas, scaled to other canvases


@dataclass(frozen=True)
class Recipe:
    """The released training recipe's defaults (``TrainConfig`` fields left ``None`` take these)."""

    optimizer: str
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    mode: str = "bicubic"  # the released pipelines resize with PIL bicubic, antialiased
    antialias: bool = True
    flip: bool = False  # random horizontal flip of each training sample
    grad_region: str = "prompt"  # pixel prompters: "canvas" takes the gradient norm over the whole canvas (EVP)
    warmup_divisor: int = 0  # warmup over epochs // warmup_divisor epochs (0: none)
    warmup: str = "linear"  # warmup factor at epoch e < W: "linear" (e + 1) / (W + 1); "pgn" max(e, 1) / W
    min_lr_ratio: float = 0.0  # the cosine's floor, as a fraction of lr


@dataclass(frozen=True)
class Method:
    """What a method is and how vpfast builds, trains, exports and demonstrates it.

    ``kind``: "pixel" (a prompter that composes the input), "tokens" (a generator of prompt tokens
    appended to a ViT's tokens) or "adapter" (a module that runs the backbone with prompts inside).
    ``build(cfg, backbone)`` returns the trained part of that kind; ``resolve(cfg)``, if set, fills and
    checks the method's own config fields before the recipe's defaults are applied.
    """

    name: str
    kind: str
    summary: str
    modules: tuple[str, ...]
    recipe: Recipe
    build: Callable[[TrainConfig, FrozenClassifier], nn.Module]
    export: str
    demo: str
    resolve: Callable[[TrainConfig], None] | None = None


def frame_width(cfg: TrainConfig, size: int) -> int:
    """``cfg.pad`` or the released 30 / 224 of the canvas."""
    return cfg.pad or max(1, round(REFERENCE_PAD * size / REFERENCE_SIZE))


def _prompter_options(cfg: TrainConfig, backbone: FrozenClassifier) -> dict:
    from vpfast.prompters import Diversity

    diversity = Diversity(p=cfg.diversity, flip=cfg.flip) if cfg.diversity > 0 or cfg.flip else None
    return dict(image_size=cfg.image_size or backbone.input_size[0], mean=backbone.mean, std=backbone.std,
                mode=cfg.mode, antialias=cfg.antialias, diversity=diversity, grad_region=cfg.grad_region,
                seed=cfg.seed)


def _build_evp(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.prompters import EVPrompter

    options = _prompter_options(cfg, backbone)
    return EVPrompter(pad=frame_width(cfg, options["image_size"]), **options)


def _build_pad(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.prompters import PadPrompter

    options = _prompter_options(cfg, backbone)
    return PadPrompter(pad=frame_width(cfg, options["image_size"]), **options)


def _build_patch(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.prompters import PatchPrompter

    options = _prompter_options(cfg, backbone)
    size = options["image_size"]
    return PatchPrompter(patch=cfg.patch or max(1, round(REFERENCE_PAD * size / REFERENCE_SIZE)), random=True,
                         **options)


def _build_pgn(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.pgn import PGN
    from vpfast.prompt_tokens import PromptedViT

    try:
        dim = PromptedViT(backbone).dim
    except TypeError as exc:
        raise ValueError(f"--method pgn needs a ViT backbone, and {cfg.model} is not one: {exc}") from exc
    return PGN(cfg.num_prompts, cfg.library_size, dim, input_size=cfg.image_size or backbone.input_size[0])


def _build_protuning(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.protuning import ProTuningAdapter

    try:
        return ProTuningAdapter(backbone, ratio=cfg.block_ratio, vit_stages=cfg.vit_stages)
    except TypeError as exc:
        raise ValueError(f"--method protuning cannot prompt {cfg.model}: {exc}") from exc


def _build_provp(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.train.provp import build_provp_adapter

    return build_provp_adapter(cfg, backbone)


def _resolve_provp(cfg: TrainConfig) -> None:
    from vpfast.train.provp import resolve

    resolve(cfg)


_PIXELS = "nothing: the prompt is already pixels (prompt.png and the shareable prompt)"
_NO_EXPORT = "nothing: its prompts live inside the backbone and have no pixel form"
_SGD_40 = Recipe("sgd", 40.0, 0.9)

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("evp", "pixel", "EVP, a zero-initialized pixel frame around the shrunk image",
           ("vpfast.prompters", "vpfast.optim"),
           Recipe("normalized-sgd", 70.0, flip=True, grad_region="canvas"),
           _build_evp, _PIXELS, "EfficientNet-Lite0 on MNIST, NormalizedSGD at lr 20"),
    Method("pad", "pixel", "Bahng et al.'s pad prompter, a frame added to the normalized image",
           ("vpfast.prompters",), _SGD_40, _build_pad, _PIXELS, "EfficientNet-Lite0 on MNIST, SGD at lr 2"),
    Method("patch", "pixel", "Bahng et al.'s random patch prompter", ("vpfast.prompters",), _SGD_40, _build_patch,
           _PIXELS, "not in the demo"),
    Method("pgn", "tokens", "PGN, prompt tokens mixed from a library by a ResNet-10 (ViTs)",
           ("vpfast.pgn", "vpfast.prompt_tokens", "vpfast.inversion"),
           Recipe("sgd", 0.1, 0.9, warmup_divisor=2, warmup="pgn", min_lr_ratio=0.01),
           _build_pgn, "the generator + patch inverse as pixel prompts (vpfast.export)",
           "a small ViT on MNIST, 4 tokens from a library of 32, then exported as pixels"),
    # Pro-tuning has no released code: Adam at 1e-3 for its zero-initialized blocks is our choice [NOT VERIFIED]
    Method("protuning", "adapter", "Pro-tuning, prompt blocks before each backbone stage",
           ("vpfast.protuning",), Recipe("adam", 1e-3), _build_protuning, _NO_EXPORT,
           "EfficientNet-Lite0 on MNIST, its recipe"),
    Method("provp", "adapter", "ProVP-Ref, deep prompts blended across layers (ViTs)",
           ("vpfast.provp", "vpfast.train.provp"), Recipe("sgd", 0.1, 0.9, weight_decay=5e-4),
           _build_provp, _NO_EXPORT, "a small ViT on MNIST, 4 prompts per layer, lr 1", _resolve_provp),
    Method("vpt", "adapter", "VPT, deep or --no-deep shallow prompt tokens (ViTs)",
           ("vpfast.provp", "vpfast.train.provp"), Recipe("sgd", 0.1, 0.9, weight_decay=1e-4, warmup_divisor=10),
           _build_provp, _NO_EXPORT, "not in the demo", _resolve_provp),
)}


def names(kind: str | None = None) -> tuple[str, ...]:
    """The registered method names (of one ``kind`` if given), in registration order."""
    return tuple(name for name, m in REGISTRY.items() if kind is None or m.kind == kind)


def describe() -> str:
    """One line per method for ``--help``: name, kind, summary."""
    return "; ".join(f"{m.name} ({m.kind}): {m.summary}" for m in REGISTRY.values())


def get(name: str) -> Method:
    """The record of method ``name``; raises with the known names if there is none."""
    if name not in REGISTRY:
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return REGISTRY[name]
