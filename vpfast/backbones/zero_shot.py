"""CLIP image towers from open_clip with a zero-shot head built once from class names.

The text tower runs only while the head is built: the class embeddings are cached as a buffer and the
text tower is dropped, so training never re-encodes text (EVP's released code re-encodes every batch).
"""

import inspect
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpfast.backbones._imports import require
from vpfast.backbones.frozen import FrozenClassifier

EVP_TEMPLATE = "this is a photo of a {}"


class ZeroShotHead(nn.Module):
    """Logits = ``logit_scale`` * cosine(image feature, class embedding), one fixed embedding per class.

    Computed in float32 whatever the tower's precision or autocast: the head is tiny and the logits feed the loss.
    """

    keeps_float32 = True

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.logit_scale * F.normalize(features.float(), dim=-1) @ self.class_embeddings.t()

    def extra_repr(self) -> str:
        num_classes, dim = self.class_embeddings.shape
        return f"num_classes={num_classes}, dim={dim}, logit_scale={self.logit_scale}"


def prompt_class_name(name: str) -> str:
    """A class name as EVP writes it into the template: lower case, '_' and '-' as spaces."""
    return name.lower().replace("_", " ").replace("-", " ")


def class_text_embeddings(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str,
    batch_size: int = 256,
) -> torch.Tensor:
    """(K, D) class embeddings: the mean of each class's normalized template embeddings, renormalized."""
    if not classnames:
        raise ValueError("classnames must name at least one class, got none")
    if not templates or any("{}" not in template for template in templates):
        raise ValueError(f"templates must be one or more strings with a '{{}}' for the class name, got {templates!r}")
    texts = [template.format(prompt_class_name(name)) for name in classnames for template in templates]
    tokens = tokenizer(texts).to(device)
    with torch.no_grad():  # not inference_mode: the result becomes a buffer used in autograd graphs
        embeddings = torch.cat([encode_text(chunk).float() for chunk in tokens.split(batch_size)])
    embeddings = F.normalize(embeddings, dim=-1).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1)


def _check_model_cfg(open_clip: Any, model_cfg: Mapping[str, Any]) -> None:
    """``model_cfg`` describes the model; keys that are ``create_model``'s own arguments (``weights_only``,
    ``pretrained_image_path``, ``cache_dir``...) would decide what is loaded and how: refused."""
    loader_arguments = sorted(set(model_cfg) & set(inspect.signature(open_clip.create_model).parameters))
    if loader_arguments:
        raise ValueError(f"model_cfg may only change the model's configuration, got {loader_arguments}: "
                         f"arguments of open_clip.create_model that choose what is loaded and how")


def _check_open_clip_source(open_clip: Any, name: str, pretrained: str | None) -> None:
    if ":" in name:  # 'local-dir:' and 'hf-hub:' sources carry their own config and weights
        return
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip model name {name!r}; open_clip.list_models() lists the known names")
    if pretrained is None or os.path.isfile(pretrained) or open_clip.get_pretrained_cfg(name, pretrained):
        return
    raise ValueError(f"pretrained={pretrained!r} is neither a checkpoint file nor an open_clip tag for {name!r}; "
                     f"its tags are {open_clip.list_pretrained_tags_by_model(name)}")


def _needs_quick_gelu(open_clip: Any, name: str, pretrained: str | None) -> bool:
    """Whether the weights were trained with QuickGELU but the named config uses GELU (openai CLIP weights).

    open_clip only warns on this mismatch, and the model then computes wrong features.
    """
    if pretrained is None or not open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False):
        return False
    return not open_clip.get_model_config(name).get("quick_gelu", False)


def from_open_clip(
    name: str,
    pretrained: str | None = None,
    *,
    classnames: Sequence[str],
    templates: Sequence[str] = (EVP_TEMPLATE,),
    logit_scale: float | None = 100.0,
    model_cfg: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    cache_dir: str | None = None,
    precision: str = "fp32",
    compile: bool | str = False,
) -> FrozenClassifier:
    """A frozen open_clip image tower with a zero-shot head over ``classnames``.

    ``name`` is an open_clip config name, or a ``"local-dir:"``/``"hf-hub:"`` source with its own config
    and weights. ``pretrained`` is an open_clip tag (e.g. ``"openai"``) or a checkpoint file; None builds
    random weights without any download. Weights trained with QuickGELU get QuickGELU whatever the name says.
    ``model_cfg`` replaces top-level keys of the named config (e.g. ``vision_cfg``, ``text_cfg``,
    ``embed_dim``) to build small models. ``logit_scale`` None uses the model's learned scale; EVP uses
    100. ``device`` is where the model is built and the class names are encoded. ``precision`` and
    ``compile``: see ``FrozenClassifier`` (the text is encoded in float32 before any cast).
    """
    open_clip = require("open_clip", extra="clip")
    _check_open_clip_source(open_clip, name, pretrained)
    _check_model_cfg(open_clip, model_cfg or {})
    model = open_clip.create_model(
        name,
        pretrained=pretrained,
        device=device,
        force_quick_gelu=_needs_quick_gelu(open_clip, name, pretrained),
        cache_dir=cache_dir,
        **dict(model_cfg or {}),
    ).eval()
    tokenizer = open_clip.get_tokenizer(name, context_length=model.context_length)
    embeddings = class_text_embeddings(model.encode_text, tokenizer, classnames, templates, device)
    scale = model.logit_scale.exp().item() if logit_scale is None else logit_scale
    preprocess = model.visual.preprocess_cfg
    size = preprocess["size"]
    return FrozenClassifier(
        nn.Sequential(OrderedDict(visual=model.visual, head=ZeroShotHead(embeddings, scale))),
        input_size=(size, size) if isinstance(size, int) else size,
        mean=preprocess["mean"],
        std=preprocess["std"],
        num_classes=len(classnames),
        autocast_dtype=autocast_dtype,
        precision=precision,
        compile=compile,
    )
