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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vpfast import methods
from vpfast.backbones.label_mapping import FirstK, FrequencyMapping
from vpfast.version import __version__

FORMAT = "vpfast-prompt-1"
CARD, TENSORS = "vpfast.json", "prompt.safetensors"


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
        if resize is None:
            raise ValueError("this card does not say how the images were normalized and resized (save_pretrained "
                             "was called without preprocessing=): build the classifier by hand")
        normalizer = Normalizer(self.card["canvas_size"], self.card["mean"], self.card["std"], resize["mode"],
                                resize["antialias"])
        parts = {"tokens": self.module} if kind == "tokens" else {"adapter": self.module}
        return PromptedClassifier(normalizer, backbone, self.mapping, **parts).eval()


def _trained_tensors(module: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """What a shareable prompt saves: the whole state of a prompter or generator (its generator state and BN
    statistics too), only the trained parameters of an adapter (its frozen backbone is the user's)."""
    if kind != "adapter":
        return module.state_dict()
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


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
                    metrics: dict | None = None, preprocessing: dict | None = None) -> Path:
    """Write ``module`` (a method's trained part) as a shareable prompt in ``directory``; returns the directory.

    ``method``: its registry name (``vpfast.methods``); ``mapping``: the label mapping trained with it;
    ``backbone``: {"model": name, "pretrained": tag} of the frozen model it was trained for; ``class_names``
    and ``metrics`` go into the card as given. ``preprocessing``: for methods that are not pixel prompters,
    how the images were prepared, {"canvas_size", "mean", "std", "mode", "antialias"} (a prompter carries its
    own).
    """
    record = methods.get(method)
    settings = record.settings(module)
    out = {f"module.{k}": v.detach().cpu().contiguous() for k, v in _trained_tensors(module, record.kind).items()}
    if isinstance(mapping, FrequencyMapping):
        out["mapping.mapping"] = mapping.mapping.detach().cpu().contiguous()
    if record.kind == "pixel":
        options = settings["options"]
        preprocessing = {"canvas_size": settings["image_size"], "mean": options["mean"], "std": options["std"],
                         "mode": options["mode"], "antialias": options["antialias"]}
    preprocessing = preprocessing or {}
    resize = {"mode": preprocessing["mode"], "antialias": preprocessing["antialias"]} if preprocessing else None
    card = {"format": FORMAT, "vpfast_version": __version__, "method": method, "kind": record.kind,
            "settings": settings, "canvas_size": preprocessing.get("canvas_size"),
            "inner_size": module.inner_size if record.kind == "pixel" else None,
            "mean": preprocessing.get("mean"), "std": preprocessing.get("std"), "resize": resize,
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

    prompter, preprocessing = model.prompter, None
    if isinstance(prompter, Normalizer):  # the plain input the generator or adapter was trained on
        preprocessing = {"canvas_size": prompter.size, "mean": prompter.mean.tolist(), "std": prompter.std.tolist(),
                 "mode": prompter.mode, "antialias": prompter.antialias}
    return save_pretrained(model.trained, directory, method=cfg.method, mapping=model.mapping,
                           backbone={"model": cfg.model, "pretrained": cfg.pretrained}, class_names=class_names,
                           metrics=metrics, preprocessing=preprocessing)


def from_pretrained(directory: str | Path, backbone: nn.Module | None = None) -> Pretrained:
    """Load a shareable prompt that ``save_pretrained`` (or ``vpfast train``, ``<out>/pretrained``) wrote.

    Reads JSON and safetensors only. ``backbone`` (a ``FrozenClassifier``) is needed by methods that
    prompt inside it (ProVP, VPT, Pro-tuning), not by pixel prompters or PGN.
    """
    card = read_card(directory)
    tensors = load_file(str(Path(directory) / TENSORS))
    if card["kind"] == "adapter" and backbone is None:
        raise ValueError(f"a {card['method']} prompt lives inside its backbone: pass backbone= (the frozen "
                         f"{(card.get('backbone') or {}).get('model', 'model')} it was trained for)")
    module = methods.get(card["method"]).rebuild(card["settings"], backbone)
    state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    expected = set(_trained_tensors(module, card["kind"]))
    if set(state) != expected:
        raise ValueError(f"{Path(directory) / TENSORS} does not fit the card's {card['method']} settings: "
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
