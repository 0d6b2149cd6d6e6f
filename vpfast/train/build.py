"""From a TrainConfig to the pieces of a run: backbone, prompter, label mapping, optimizer, schedule.

What each method builds is its record's ``build`` (vpfast/methods.py); this module assembles the pieces.
"""

from __future__ import annotations

import torch
from torch import nn

from vpfast import backbones, methods
from vpfast.ops.compose import compose
from vpfast.optim import NormalizedSGD, cosine_per_epoch
from vpfast.prompt_tokens import PromptedViT
from vpfast.train import fast
from vpfast.train.config import TrainConfig
from vpfast.train.step import count_steps_on_device

IMAGENET_CLASSES = 1000


class Normalizer(nn.Module):
    """uint8 (or float 0..1) images of any size -> the backbone's normalized S x S input, on the device.

    compose with an invisible (all-zero, untrained) prompt: token-prompting methods such as PGN take
    the plain input, and get it through the same fused op as the pixel prompters.
    """

    def __init__(self, size: int, mean, std, mode: str = "bilinear", antialias: bool = False) -> None:
        super().__init__()
        self.size, self.mode, self.antialias = size, mode, antialias
        self.register_buffer("zero", torch.zeros(3, size, size), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return compose(images, self.zero, inner_size=self.size, mean=self.mean, std=self.std, mode=self.mode,
                       antialias=self.antialias)


class PromptedClassifier(nn.Module):
    """prompter -> frozen backbone -> label mapping: uint8 images in, target-class logits out.

    With ``tokens`` (PGN), the prompter only normalizes, ``tokens`` turns the normalized images into
    prompt tokens and the backbone (a ViT) runs with them appended. With ``adapter`` (methods that
    prompt inside the backbone), the prompter only normalizes and ``adapter`` runs the backbone: it
    maps normalized images to source logits, and may offer ``auxiliary_loss()``, a term computed in
    its last forward that training adds to the cross-entropy.

    ``compile`` (True: inductor, or a backend name) compiles ``source_logits``, prompter to source logits with
    the backbone's hooks, as one graph (``vpfast train --compile`` for token and adapter methods); leave the
    backbone itself uncompiled then.
    """

    def __init__(self, prompter: nn.Module, backbone: backbones.FrozenClassifier, mapping: nn.Module | None,
                 tokens: nn.Module | None = None, adapter: nn.Module | None = None,
                 compile: bool | str = False) -> None:
        super().__init__()
        if tokens is not None and adapter is not None:
            raise ValueError("PromptedClassifier takes tokens or an adapter, not both")
        if compile and backbone.compile:
            raise ValueError(f"compile={compile!r} compiles the whole prompted forward, but the backbone is already "
                             f"compiled (compile={backbone.compile!r}): compile one of them")
        self.prompter, self.backbone, self.mapping, self.tokens = prompter, backbone, mapping, tokens
        self.adapter = adapter
        self.vit = None if tokens is None else PromptedViT(backbone)
        self.compile = compile
        self._source_logits_fn = backbones.compile_function(self._source_logits, compile)

    @property
    def compiled(self) -> str:
        """What is compiled: "prompted forward", "backbone" or "off" (as reported by ``vpfast train``)."""
        if self.compile:
            return "prompted forward"
        return "backbone" if self.backbone.compile else "off"

    def source_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's logits of the prompted ``images`` (before the label mapping)."""
        return self._source_logits_fn(images)

    def _source_logits(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prompter(images)
        if self.adapter is not None:
            return self.adapter(x)
        return self.backbone(x) if self.tokens is None else self.vit(x, self.tokens(x))

    def draw_step(self, batch: int) -> None:
        """Draw the next training step's random values (a pixel prompter's diversity rows, flips, patch
        location) into device buffers, outside the forward (``vpfast.prompters``): a step replayed from a
        CUDA graph then gets new ones. Other prompters draw nothing."""
        draw = getattr(self.prompter, "draw_step", None)
        if draw is not None:
            draw(batch)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The adapter's extra loss term from the last forward, or None."""
        extra = getattr(self.adapter, "auxiliary_loss", None)
        return None if extra is None else extra()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.source_logits(images)
        return logits if self.mapping is None else self.mapping(logits)

    @property
    def trained(self) -> nn.Module:
        """The module the optimizer trains: the pixel prompter, the token generator or the adapter."""
        if self.adapter is not None:
            return self.adapter
        return self.prompter if self.tokens is None else self.tokens

    @property
    def num_trainable(self) -> int:
        """Trained values: the visible prompt entries of a pixel prompter, or every trainable parameter of
        the token generator or the adapter."""
        if self.tokens is None and self.adapter is None:
            return self.prompter.num_trainable
        return sum(p.numel() for p in self.trained.parameters() if p.requires_grad)

    def _parts(self) -> dict[str, nn.Module]:
        parts = (("prompter", self.prompter), ("tokens", self.tokens), ("adapter", self.adapter),
                 ("mapping", self.mapping))
        return {name: m for name, m in parts if m is not None}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves: the prompter (prompt and generator state), PGN and the label mapping."""
        return {f"{name}.{k}": v for name, m in self._parts().items() for k, v in m.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, m in self._parts().items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})


def _pretrained_flag(value: str | None) -> bool | str:
    """"none"/"false"/"" -> False (random weights), "true" -> True (the library's default weights), else the name."""
    if value is None or value.lower() in ("none", "false", ""):
        return False
    return True if value.lower() == "true" else value


def build_backbone(cfg: TrainConfig, classnames: list[str], device: torch.device) -> backbones.FrozenClassifier:
    """The frozen model named by ``cfg.model`` (CLIP gets a zero-shot head over ``classnames``)."""
    family, name = cfg.model.split(":", 1)
    compile_backbone = fast.compile_target(cfg, device, methods.get(cfg.method).kind) == "backbone"
    speed = dict(precision=fast.precision(cfg, device), compile=fast.COMPILE_BACKEND if compile_backbone else False)
    if family == "open_clip":
        return backbones.from_open_clip(name, _pretrained_flag(cfg.pretrained) or None, classnames=classnames,
                                        templates=tuple(cfg.templates), model_cfg=cfg.model_cfg, device=device,
                                        **speed)
    if family == "timm":
        return backbones.from_timm(name, _pretrained_flag(cfg.pretrained), **speed)
    return backbones.from_torchvision(name, cfg.pretrained, **speed)


def build_prompter(cfg: TrainConfig, backbone: backbones.FrozenClassifier) -> nn.Module:
    """The method's prompter, sized to the backbone's input and normalized with its mean/std (a plain
    ``Normalizer`` for methods that are not pixel prompts)."""
    method = methods.get(cfg.method)
    if method.kind == "pixel":
        return method.build(cfg, backbone)
    return Normalizer(cfg.image_size or backbone.input_size[0], backbone.mean, backbone.std, cfg.mode, cfg.antialias)


def build_tokens(cfg: TrainConfig, backbone: backbones.FrozenClassifier) -> nn.Module | None:
    """The prompt-token generator of a "tokens" method (PGN), else None."""
    method = methods.get(cfg.method)
    return method.build(cfg, backbone) if method.kind == "tokens" else None


def build_adapter(cfg: TrainConfig, backbone: backbones.FrozenClassifier) -> nn.Module | None:
    """The module that prompts inside the backbone for an "adapter" method (ProVP, VPT, Pro-tuning), else None."""
    method = methods.get(cfg.method)
    return method.build(cfg, backbone) if method.kind == "adapter" else None


def build_mapping(cfg: TrainConfig, backbone: backbones.FrozenClassifier, num_classes: int) -> nn.Module | None:
    """None for CLIP (its head already scores the target classes), else first-K or frequency mapping."""
    if cfg.model.startswith("open_clip:"):
        return None
    if num_classes > backbone.num_classes:
        raise ValueError(f"the task has {num_classes} classes but {cfg.model} predicts only {backbone.num_classes}")
    if cfg.label_mapping == "first-k":
        return backbones.FirstK(num_classes)
    return backbones.FrequencyMapping(backbone.num_classes, num_classes, refresh_every=cfg.mapping_refresh)


def build_optimizer(cfg: TrainConfig, model: PromptedClassifier, epochs: int):
    """(optimizer, per-epoch schedule) over the trained module: optional warmup (the recipe's), then cosine."""
    trained = model.trained
    if cfg.optimizer == "normalized-sgd":
        optimizer = NormalizedSGD.for_prompter(trained, lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(trained.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        count_steps_on_device(optimizer)  # capturable on CUDA: the step can be replayed from a CUDA graph
    if not cfg.warmup_epochs and not cfg.min_lr_ratio:
        return optimizer, cosine_per_epoch(optimizer, epochs)
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=epochs - cfg.warmup_epochs, eta_min=cfg.lr * cfg.min_lr_ratio)
    if not cfg.warmup_epochs:
        return optimizer, cosine
    if methods.get(cfg.method).recipe.warmup == "pgn":  # released PGN: lr / W at epochs 0 and 1, then e lr / W
        warmup = sched.LambdaLR(optimizer, _PGNWarmup(cfg.warmup_epochs))
    else:
        warmup = sched.LinearLR(optimizer, start_factor=1 / (cfg.warmup_epochs + 1), total_iters=cfg.warmup_epochs)
    return optimizer, sched.SequentialLR(optimizer, [warmup, cosine], milestones=[cfg.warmup_epochs])


class _PGNWarmup:
    """The released PGN warmup factor max(e, 1) / W at epoch e < W (jochemloedeman/PGN ``CosineWithWarmup``)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def __call__(self, epoch: int) -> float:
        return max(epoch, 1) / self.epochs
