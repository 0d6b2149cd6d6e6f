"""torchvision classifiers, with weights named by their enum (e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``)."""

from typing import Any

import torch

from vpfast.backbones._imports import require
from vpfast.backbones.frozen import FrozenClassifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_preprocessing(weights: Any) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(crop size, mean, std) of a torchvision weights enum's evaluation transform."""
    transform = weights.transforms()
    return transform.crop_size[0], tuple(transform.mean), tuple(transform.std)


def from_torchvision(name: str, weights: Any = None, *, autocast_dtype: torch.dtype | None = None,
                     precision: str = "fp32", compile: bool | str = False) -> FrozenClassifier:
    """A frozen torchvision classifier; mean/std and size from the weights' transform, else ImageNet at 224.

    ``weights`` is None (random weights), a weights enum member, or its name as a string. ``precision``
    and ``compile``: see ``FrozenClassifier``.
    """
    torchvision = require("torchvision", extra="torchvision")
    models = torchvision.models
    if name not in models.list_models(module=models):
        raise ValueError(f"unknown torchvision classifier {name!r}; "
                         f"torchvision.models.list_models(module=torchvision.models) lists the known names")
    if isinstance(weights, str):
        try:
            weights = models.get_weight(weights)
        except (KeyError, ValueError) as error:
            raise ValueError(f"weights={weights!r} names no torchvision weights enum member, expected e.g. "
                             f"{str(models.get_model_weights(name).DEFAULT)!r}") from error
    model = models.get_model(name, weights=weights)
    if weights is None:
        size, mean, std, num_classes = 224, IMAGENET_MEAN, IMAGENET_STD, 1000
    else:
        size, mean, std = weights_preprocessing(weights)
        num_classes = len(weights.meta["categories"])
    return FrozenClassifier(model, input_size=(size, size), mean=mean, std=std, num_classes=num_classes,
                            autocast_dtype=autocast_dtype, precision=precision, compile=compile)
