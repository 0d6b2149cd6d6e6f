"""Shareable prompts: a trained prompt as safetensors plus a JSON card, loadable anywhere without pickle.

A shareable prompt is a directory with ``prompt.safetensors`` (the trained part's tensors and the label
mapping's) and ``vpfast.json`` (the card: method, vpfast version, canvas and inner sizes, normalization and
resize, backbone name and tag, class names, label mapping, metrics, and the settings that rebuild the module).
``save_pretrained`` writes one for any method's trained part, ``from_pretrained`` reads it back in a fresh
process (no training config, nothing executed), ``push_to_hub``/``from_hub`` move it through the Hugging Face
Hub. Pixel prompters and PGN load standalone; methods that prompt inside the backbone need the backbone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vpfast import methods
from vpfast.backbones.label_mapping import FirstK, FrequencyMapping
from vpfast.pgn import PGN
from vpfast.prompters import Diversity, EVPrompter, PadPrompter, PatchPrompter
from vpfast.protuning import ProTuningAdapter
from vpfast.provp import ProVP, ProVPClassifier
from vpfast.version import __version__

FORMAT = "vpfast-prompt-1"
CARD, TENSORS = "vpfast.json", "prompt.safetensors"
PROMPTERS = {"EVPrompter": EVPrompter, "PadPrompter": PadPrompter, "PatchPrompter": PatchPrompter}
DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


@dataclass
class Pretrained:
    """A loaded shareable prompt: the trained ``module``, its label ``mapping`` (or None) and its ``card``.

    ``classifier(backbone)`` assembles uint8 images -> prompted backbone -> target-class logits, as in training.
    """

    module: nn.Module
    mapping: nn.Module | None
    card: dict

    def classifier(self, backbone: nn.Module) -> nn.Module:
        from vpfast.train.build import Normalizer, PromptedClassifier

        kind = self.card["kind"]
        if kind == "pixel":
            return PromptedClassifier(self.module, backbone, self.mapping).eval()
        resize = self.card["resize"]
        normalizer = Normalizer(self.card["canvas_size"], self.card["mean"], self.card["std"], resize["mode"],
                                resize["antialias"])
        parts = {"tokens": self.module} if kind == "tokens" else {"adapter": self.module}
        return PromptedClassifier(normalizer, backbone, self.mapping, **parts).eval()


def _prompter_settings(module: nn.Module) -> dict:
    settings = {"image_size": module.image_size, "mode": module.mode, "antialias": module.antialias,
                "mean": None if module.mean is None else module.mean.tolist(),
                "std": None if module.std is None else module.std.tolist(),
                "diversity": None if module.diversity is None else asdict(module.diversity),
                "grad_region": module.grad_region, "grad_norm": module.grad_norm,
                "out_dtype": None if module.out_dtype is None else str(module.out_dtype)}
    if isinstance(module, PatchPrompter):
        settings.update(patch=module.patch, random=module.random)
    else:
        settings["pad"] = module.pad
    return settings


def _describe(module: nn.Module) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(class name, constructor settings, tensors to save) of a trained part."""
    if type(module).__name__ in PROMPTERS and isinstance(module, tuple(PROMPTERS.values())):
        return type(module).__name__, _prompter_settings(module), module.state_dict()
    if isinstance(module, PGN):
        settings = {"num_prompts": module.num_prompts, "library_size": module.library_size, "dim": module.dim,
                    "generator": module.generator, "input_size": module.input_size, **module.mix_options}
        return "PGN", settings, module.state_dict()
    trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if isinstance(module, ProVPClassifier):
        provp = module.provp
        settings = {"num_prompts": provp.num_prompts, "alpha": provp.alpha, "deep": provp.deep,
                    "ref_weight": module.ref_weight, "ref_temperature": module.ref_temperature}
        return "ProVPClassifier", settings, trained
    if isinstance(module, ProTuningAdapter):
        return "ProTuningAdapter", {"ratio": module.ratio, "vit_stages": module.vit_stages}, trained
    raise ValueError(f"save_pretrained saves a vpfast prompter, PGN, ProVPClassifier or ProTuningAdapter, "
                     f"got {type(module).__name__}")


def _describe_mapping(mapping: nn.Module | None) -> dict | None:
    if mapping is None:
        return None
    if isinstance(mapping, FirstK):
        return {"kind": "first-k", "k": mapping.k}
    if isinstance(mapping, FrequencyMapping):
        return {"kind": "frequency", "num_source": mapping.num_source, "num_target": mapping.num_target}
    raise ValueError(f"mapping must be vpfast's FirstK, FrequencyMapping or None, got {type(mapping).__name__}")


def save_pretrained(module: nn.Module, directory: str | Path, *, method: str, mapping: nn.Module | None = None,
                    backbone: dict | None = None, class_names: list[str] | None = None,
                    metrics: dict | None = None) -> Path:
    """Write ``module`` (a method's trained part) as a shareable prompt in ``directory``; returns the directory.

    ``method``: its registry name (``vpfast.methods``); ``mapping``: the label mapping trained with it;
    ``backbone``: {"model": name, "pretrained": tag} of the frozen model it was trained for; ``class_names``
    and ``metrics`` go into the card as given.
    """
    record = methods.get(method)
    name, settings, tensors = _describe(module)
    out = {f"module.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    if isinstance(mapping, FrequencyMapping):
        out["mapping.mapping"] = mapping.mapping.detach().cpu().contiguous()
    pixel = record.kind == "pixel"
    card = {"format": FORMAT, "vpfast_version": __version__, "method": method, "kind": record.kind,
            "module": {"class": name, "settings": settings},
            "canvas_size": settings["image_size"] if pixel else None,
            "inner_size": getattr(module, "inner_size", None),
            "mean": settings["mean"] if pixel else None, "std": settings["std"] if pixel else None,
            "resize": {"mode": settings["mode"], "antialias": settings["antialias"]} if pixel else None,
            "backbone": backbone, "class_names": class_names, "label_mapping": _describe_mapping(mapping),
            "metrics": metrics or {}}
    return _write(directory, card, out)


def _write(directory: str | Path, card: dict, tensors: dict[str, torch.Tensor]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / TENSORS), metadata={"format": FORMAT})
    (directory / CARD).write_text(json.dumps(card, indent=1) + "\n")
    return directory


def save_run(directory: str | Path, model: nn.Module, cfg: Any, class_names: list[str], metrics: dict) -> Path:
    """The shareable prompt of a ``vpfast train`` run's ``PromptedClassifier`` and resolved ``TrainConfig``."""
    from vpfast.train.build import Normalizer

    directory = save_pretrained(model.trained, directory, method=cfg.method, mapping=model.mapping,
                                backbone={"model": cfg.model, "pretrained": cfg.pretrained},
                                class_names=class_names, metrics=metrics)
    if isinstance(model.prompter, Normalizer):  # the plain input the generator or adapter was trained on
        card = json.loads((directory / CARD).read_text())
        card.update(canvas_size=model.prompter.size, mean=model.prompter.mean.tolist(), std=model.prompter.std.tolist(),
                    resize={"mode": model.prompter.mode, "antialias": model.prompter.antialias})
        (directory / CARD).write_text(json.dumps(card, indent=1) + "\n")
    return directory


def _build(card: dict, backbone: nn.Module | None) -> nn.Module:
    name, settings = card["module"]["class"], dict(card["module"]["settings"])
    if name in PROMPTERS:
        if settings["diversity"] is not None:
            settings["diversity"] = Diversity(**settings["diversity"])
        if settings["out_dtype"] is not None:
            settings["out_dtype"] = DTYPES[settings["out_dtype"]]
        return PROMPTERS[name](**settings)
    if name == "PGN":
        return PGN(**settings)
    if backbone is None:
        raise ValueError(f"a {card['method']} prompt lives inside its backbone: pass backbone= (the frozen "
                         f"{(card.get('backbone') or {}).get('model', 'model')} it was trained for)")
    if name == "ProVPClassifier":
        provp = ProVP(backbone, num_prompts=settings["num_prompts"], alpha=settings["alpha"], deep=settings["deep"])
        return ProVPClassifier(provp, ref_weight=settings["ref_weight"], ref_temperature=settings["ref_temperature"])
    if name == "ProTuningAdapter":
        return ProTuningAdapter(backbone, **settings)
    raise ValueError(f"unknown module class {name!r} in the card")


def from_pretrained(directory: str | Path, backbone: nn.Module | None = None) -> Pretrained:
    """Load a shareable prompt that ``save_pretrained`` (or ``vpfast train``, ``<out>/pretrained``) wrote.

    Reads JSON and safetensors only. ``backbone`` (a ``FrozenClassifier``) is needed by methods that
    prompt inside it (ProVP, VPT, Pro-tuning), not by pixel prompters or PGN.
    """
    card = read_card(directory)
    tensors = load_file(str(Path(directory) / TENSORS))
    module = _build(card, backbone)
    state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    expected = set(_describe(module)[2])
    if set(state) != expected:
        raise ValueError(f"{Path(directory) / TENSORS} does not fit the card's {card['module']['class']}: "
                         f"unexpected keys {sorted(set(state) - expected)[:5]}, missing keys "
                         f"{sorted(expected - set(state))[:5]}")
    module.load_state_dict(state, strict=card["kind"] != "adapter")  # an adapter's backbone is not in the file
    return Pretrained(module.eval(), _mapping(card["label_mapping"], tensors), card)


def read_card(directory: str | Path) -> dict:
    """The card of a shareable prompt directory, checked: both files present, the right format, a known method."""
    directory = Path(directory)
    for name in (CARD, TENSORS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a shareable vpfast prompt: {name} is missing")
    card = json.loads((directory / CARD).read_text())
    if card.get("format") != FORMAT:
        raise ValueError(f"{directory / CARD} has format {card.get('format')!r}, expected {FORMAT!r}")
    methods.get(card["method"])
    return card


def _mapping(described: dict | None, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    if described is None:
        return None
    if described["kind"] == "first-k":
        return FirstK(described["k"])
    mapping = FrequencyMapping(described["num_source"], described["num_target"])
    mapping.mapping.copy_(tensors["mapping.mapping"])
    return mapping


def push_to_hub(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "vpfast prompt") -> str:
    """Upload a shareable prompt directory to the Hugging Face Hub model repo ``repo_id``; returns the commit URL."""
    hub = _hub()
    directory = Path(directory)
    read_card(directory)
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                             allow_patterns=[CARD, TENSORS], commit_message=commit_message)
    return str(info)


def from_hub(repo_id: str, *, revision: str | None = None, backbone: nn.Module | None = None,
             token: str | None = None) -> Pretrained:
    """Download the shareable prompt in Hub model repo ``repo_id`` (its card and tensors only) and load it."""
    hub = _hub()
    local = hub.snapshot_download(repo_id, repo_type="model", revision=revision, allow_patterns=[CARD, TENSORS],
                                  token=token)
    return from_pretrained(local, backbone=backbone)


def _hub():
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError("sharing prompts through the Hub needs huggingface_hub: pip install 'vpfast[hub]'") from error
    return huggingface_hub
