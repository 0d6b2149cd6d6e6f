"""From a TrainConfig to the pieces of a run: backbone, prompter, label mapping, optimizer, schedule."""

from __future__ import annotations

import torch
from torch import nn

from vpfast import backbones
from vpfast.optim import NormalizedSGD, cosine_per_epoch
from vpfast.prompters import Diversity, EVPrompter, PadPrompter, PatchPrompter
from vpfast.train.config import TrainConfig

IMAGENET_CLASSES = 1000


class PromptedClassifier(nn.Module):
    """prompter -> frozen backbone -> label mapping: uint8 images in, target-class logits out."""

    def __init__(self, prompter: nn.Module, backbone: backbones.FrozenClassifier, mapping: nn.Module | None) -> None:
        super().__init__()
        self.prompter, self.backbone, self.mapping = prompter, backbone, mapping

    def source_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prompter(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.source_logits(images)
        return logits if self.mapping is None else self.mapping(logits)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves: the prompter (prompt and generator) and the label mapping."""
        state = {f"prompter.{k}": v for k, v in self.prompter.state_dict().items()}
        if self.mapping is not None:
            state.update({f"mapping.{k}": v for k, v in self.mapping.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.prompter.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("prompter.")})
        if self.mapping is not None:
            self.mapping.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("mapping.")})


def _pretrained_flag(value: str | None) -> bool | str:
    """"none"/"false"/"" -> False (random weights), "true" -> True (the library's default weights), else the name."""
    if value is None or value.lower() in ("none", "false", ""):
        return False
    return True if value.lower() == "true" else value


def build_backbone(cfg: TrainConfig, classnames: list[str], device: torch.device) -> backbones.FrozenClassifier:
    """The frozen model named by ``cfg.model`` (CLIP gets a zero-shot head over ``classnames``)."""
    family, name = cfg.model.split(":", 1)
    autocast = torch.bfloat16 if cfg.amp == "bf16" else None
    if family == "open_clip":
        return backbones.from_open_clip(name, _pretrained_flag(cfg.pretrained) or None, classnames=classnames,
                                        templates=tuple(cfg.templates), model_cfg=cfg.model_cfg, device=device,
                                        autocast_dtype=autocast)
    if family == "timm":
        return backbones.from_timm(name, _pretrained_flag(cfg.pretrained), autocast_dtype=autocast)
    return backbones.from_torchvision(name, cfg.pretrained, autocast_dtype=autocast)


def build_prompter(cfg: TrainConfig, backbone: backbones.FrozenClassifier) -> nn.Module:
    """The method's prompter, sized to the backbone's input and normalized with its mean/std."""
    size = cfg.image_size or backbone.input_size[0]
    scaled = max(1, round(30 * size / 224))
    diversity = Diversity(p=cfg.diversity) if cfg.diversity > 0 else None
    common = dict(image_size=size, mean=backbone.mean, std=backbone.std, mode=cfg.mode, antialias=cfg.antialias,
                  diversity=diversity, grad_region=cfg.grad_region, seed=cfg.seed)
    if cfg.method == "evp":
        return EVPrompter(pad=cfg.pad or scaled, **common)
    if cfg.method == "pad":
        return PadPrompter(pad=cfg.pad or scaled, **common)
    return PatchPrompter(patch=cfg.patch or scaled, random=True, **common)


def build_mapping(cfg: TrainConfig, backbone: backbones.FrozenClassifier, num_classes: int) -> nn.Module | None:
    """None for CLIP (its head already scores the target classes), else first-K or frequency mapping."""
    if cfg.model.startswith("open_clip:"):
        return None
    if num_classes > backbone.num_classes:
        raise ValueError(f"the task has {num_classes} classes but {cfg.model} predicts only {backbone.num_classes}")
    if cfg.label_mapping == "first-k":
        return backbones.FirstK(num_classes)
    return backbones.FrequencyMapping(backbone.num_classes, num_classes, refresh_every=cfg.mapping_refresh)


def build_optimizer(cfg: TrainConfig, prompter: nn.Module, epochs: int):
    """(optimizer, per-epoch cosine schedule) over the prompter's parameters."""
    if cfg.optimizer == "normalized-sgd":
        optimizer = NormalizedSGD.for_prompter(prompter, lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(prompter.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(prompter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, cosine_per_epoch(optimizer, epochs)
