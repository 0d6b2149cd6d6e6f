"""Frozen pretrained classifiers (open_clip, timm, torchvision, packaged offline weights) and label mappings.

Every builder returns a ``FrozenClassifier``: logits of normalized images, with the ``input_size``,
``mean`` and ``std`` its prompter must produce. open_clip, timm and torchvision are imported only by
the builder that needs them.
"""

from vpfast.backbones.frozen import PRECISIONS, FrozenClassifier, cast_frozen, compile_function
from vpfast.backbones.label_mapping import FirstK, FrequencyMapping, greedy_one_to_one
from vpfast.backbones.packaged_weights import EFFICIENTNET_LITE0, PACKAGED_WEIGHTS, load_state_dict_by_position
from vpfast.backbones.timm_models import efficientnet_lite0, from_timm
from vpfast.backbones.torchvision_models import from_torchvision
from vpfast.backbones.zero_shot import EVP_TEMPLATE, ZeroShotHead, from_open_clip

__all__ = [
    "EFFICIENTNET_LITE0",
    "EVP_TEMPLATE",
    "PACKAGED_WEIGHTS",
    "PRECISIONS",
    "FirstK",
    "FrequencyMapping",
    "FrozenClassifier",
    "ZeroShotHead",
    "cast_frozen",
    "compile_function",
    "efficientnet_lite0",
    "from_open_clip",
    "from_timm",
    "from_torchvision",
    "greedy_one_to_one",
    "load_state_dict_by_position",
]
