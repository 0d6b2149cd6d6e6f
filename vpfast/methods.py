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
    ``build(cfg, backbone)`` returns the trained part of that kind; ``settings(module)`` gives the JSON
    settings that ``rebuild(settings, backbone)`` turns back into an untrained copy (shareable prompts,
    ``vpfast.pretrained``); ``resolve(cfg)``, if set, fills and checks the method's own config fields
    before the recipe's defaults are applied.
    """

    name: str
    kind: str
    summary: str
    modules: tuple[str, ...]
    recipe: Recipe
    build: Callable[[TrainConfig, FrozenClassifier], nn.Module]
    settings: Callable[[nn.Module], dict]
    rebuild: Callable[[dict, FrozenClassifier | None], nn.Module]
    export: str
    demo: str
    resolve: Callable[[TrainConfig], None] | None = None


def scaled_width(value: int | None, size: int) -> int:
    """``value`` (a frame width or patch side) if given, else the released 30 / 224 of a ``size`` canvas."""
    return value or max(1, round(REFERENCE_PAD * size / REFERENCE_SIZE))


def _prompter_options(cfg: TrainConfig, backbone: FrozenClassifier) -> dict:
    import torch

    from vpfast.prompters import Diversity

    diversity = Diversity(p=cfg.diversity, flip=cfg.flip) if cfg.diversity > 0 or cfg.flip else None
    bf16 = getattr(backbone, "precision", "fp32") == "bf16"  # a bf16 model takes bf16 canvases
    return dict(image_size=cfg.image_size or backbone.input_size[0], mean=backbone.mean, std=backbone.std,
                mode=cfg.mode, antialias=cfg.antialias, diversity=diversity, grad_region=cfg.grad_region,
                seed=cfg.seed, out_dtype=torch.bfloat16 if bf16 else None)


def _build_evp(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.prompters import EVPrompter

    options = _prompter_options(cfg, backbone)
    return EVPrompter(pad=scaled_width(cfg.pad, options["image_size"]), **options)


def _build_pad(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.prompters import PadPrompter

    options = _prompter_options(cfg, backbone)
    return PadPrompter(pad=scaled_width(cfg.pad, options["image_size"]), **options)


def _build_patch(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.prompters import PatchPrompter

    options = _prompter_options(cfg, backbone)
    return PatchPrompter(patch=scaled_width(cfg.patch, options["image_size"]), random=True, **options)


def _build_pgn(cfg: TrainConfig, backbone: FrozenClassifier) -> nn.Module:
    from vpfast.pgn import PGN
    from vpfast.prompt_tokens import token_width

    try:
        dim = token_width(backbone)
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


def _expect(module: nn.Module, classes: type | tuple[type, ...], what: str) -> None:
    if not isinstance(module, classes):
        names = " or ".join(c.__name__ for c in (classes if isinstance(classes, tuple) else (classes,)))
        raise ValueError(f"{what} is a {names}, got {type(module).__name__}")


def _prompter_settings(module: nn.Module) -> dict:
    from dataclasses import asdict

    from vpfast.prompters import EVPrompter, PadPrompter, PatchPrompter

    _expect(module, (EVPrompter, PadPrompter, PatchPrompter), "a pixel prompt")
    options = module.options
    geometry = {"patch": module.patch, "random": module.random} if isinstance(module, PatchPrompter) else {
        "pad": module.pad}
    return {"class": type(module).__name__, "image_size": module.image_size, **geometry, "options": {
        **asdict(options), "mean": None if options.mean is None else list(options.mean),
        "std": None if options.std is None else list(options.std),
        "out_dtype": None if options.out_dtype is None else str(options.out_dtype).removeprefix("torch.")}}


def _rebuild_prompter(settings: dict, backbone: FrozenClassifier | None) -> nn.Module:
    import torch

    from vpfast import prompters

    options = dict(settings["options"])
    if options["diversity"] is not None:
        options["diversity"] = prompters.Diversity(**options["diversity"])
    if options["out_dtype"] is not None:
        options["out_dtype"] = getattr(torch, options["out_dtype"])
    geometry = {k: v for k, v in settings.items() if k not in ("class", "options")}
    cls = {c.__name__: c for c in (prompters.EVPrompter, prompters.PadPrompter, prompters.PatchPrompter)}
    return cls[settings["class"]](**geometry, options=prompters.PrompterOptions(**options))


def _pgn_settings(module: nn.Module) -> dict:
    from vpfast.pgn import PGN

    _expect(module, PGN, "a pgn prompt")
    return {"num_prompts": module.num_prompts, "library_size": module.library_size, "dim": module.dim,
            "generator": module.generator, "input_size": module.input_size, **module.mix_options}


def _rebuild_pgn(settings: dict, backbone: FrozenClassifier | None) -> nn.Module:
    from vpfast.pgn import PGN

    return PGN(**settings)


def _provp_settings(module: nn.Module) -> dict:
    from vpfast.provp import ProVPClassifier

    _expect(module, ProVPClassifier, "a provp or vpt prompt")
    provp = module.provp
    return {"num_prompts": provp.num_prompts, "alpha": provp.alpha, "deep": provp.deep,
            "ref_weight": module.ref_weight, "ref_temperature": module.ref_temperature}


def _rebuild_provp(settings: dict, backbone: FrozenClassifier | None) -> nn.Module:
    from vpfast.provp import ProVP, ProVPClassifier

    provp = ProVP(backbone, num_prompts=settings["num_prompts"], alpha=settings["alpha"], deep=settings["deep"])
    return ProVPClassifier(provp, ref_weight=settings["ref_weight"], ref_temperature=settings["ref_temperature"])


def _protuning_settings(module: nn.Module) -> dict:
    from vpfast.protuning import ProTuningAdapter

    _expect(module, ProTuningAdapter, "a protuning prompt")
    return {"ratio": module.ratio, "vit_stages": module.vit_stages}


def _rebuild_protuning(settings: dict, backbone: FrozenClassifier | None) -> nn.Module:
    from vpfast.protuning import ProTuningAdapter

    return ProTuningAdapter(backbone, **settings)


_PIXELS = "nothing: the prompt is already pixels (prompt.png and the shareable prompt)"
_NO_EXPORT = "nothing: its prompts live inside the backbone and have no pixel form"
_SGD_40 = Recipe("sgd", 40.0, 0.9)

_PIXEL_IO = dict(settings=_prompter_settings, rebuild=_rebuild_prompter)
_PROVP_IO = dict(settings=_provp_settings, rebuild=_rebuild_provp, resolve=_resolve_provp)

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("evp", "pixel", "EVP, a zero-initialized pixel frame around the shrunk image",
           ("vpfast.prompters", "vpfast.optim"),
           Recipe("normalized-sgd", 70.0, flip=True, grad_region="canvas"),
           _build_evp, export=_PIXELS, demo="EfficientNet-Lite0 on MNIST, NormalizedSGD at lr 20", **_PIXEL_IO),
    Method("pad", "pixel", "Bahng et al.'s pad prompter, a frame added to the normalized image",
           ("vpfast.prompters",), _SGD_40, _build_pad, export=_PIXELS,
           demo="EfficientNet-Lite0 on MNIST, SGD at lr 2", **_PIXEL_IO),
    Method("patch", "pixel", "Bahng et al.'s random patch prompter", ("vpfast.prompters",), _SGD_40, _build_patch,
           export=_PIXELS, demo="not in the demo", **_PIXEL_IO),
    Method("pgn", "tokens", "PGN, prompt tokens mixed from a library by a ResNet-10 (ViTs)",
           ("vpfast.pgn", "vpfast.prompt_tokens", "vpfast.inversion"),
           Recipe("sgd", 0.1, 0.9, warmup_divisor=2, warmup="pgn", min_lr_ratio=0.01), _build_pgn,
           settings=_pgn_settings, rebuild=_rebuild_pgn,
           export="the generator + patch inverse as pixel prompts (vpfast.export)",
           demo="a small ViT on MNIST, 4 tokens from a library of 32, then exported as pixels"),
    # Pro-tuning has no released code: Adam at 1e-3 for its zero-initialized blocks is our choice [NOT VERIFIED]
    Method("protuning", "adapter", "Pro-tuning, prompt blocks before each backbone stage",
           ("vpfast.protuning",), Recipe("adam", 1e-3), _build_protuning, settings=_protuning_settings,
           rebuild=_rebuild_protuning, export=_NO_EXPORT, demo="EfficientNet-Lite0 on MNIST, its recipe"),
    Method("provp", "adapter", "ProVP-Ref, deep prompts blended across layers (ViTs)",
           ("vpfast.provp", "vpfast.train.provp"), Recipe("sgd", 0.1, 0.9, weight_decay=5e-4), _build_provp,
           export=_NO_EXPORT, demo="a small ViT on MNIST, 4 prompts per layer, lr 1", **_PROVP_IO),
    Method("vpt", "adapter", "VPT, deep or --no-deep shallow prompt tokens (ViTs)",
           ("vpfast.provp", "vpfast.train.provp"), Recipe("sgd", 0.1, 0.9, weight_decay=1e-4, warmup_divisor=10),
           _build_provp, export=_NO_EXPORT, demo="not in the demo", **_PROVP_IO),
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
