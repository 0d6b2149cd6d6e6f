"""Prompt Generation Network (Loedeman et al.): a small CNN that mixes a learned token library into prompts.

``PGN`` maps the normalized image the backbone gets to M input-dependent prompt tokens: a ResNet
generator gives (B, M, N) mixing logits, ``vpfast.ops.token_mix`` turns them into softmax weights
over the N library tokens and mixes the (N, d) library into (B, M, d) prompts, which
``vpfast.prompt_tokens.PromptedViT`` appends to a frozen ViT's tokens. As published
(jochemloedeman/PGN ``tlpgn.py``, ``resnet.py``; docs/methods.md, PGN):

- ResNet-10 generator: 3x3/2 stem convolution (no bias) + BN + ReLU + 3x3/2 max-pool, one basic block
  per group with 16/32/64/128 channels, stride 2 and a 1x1 convolution shortcut (with bias, no BN) in
  groups 1-3, global average pool, ``Linear(128, M*N)`` head; Kaiming normal (fan_out) convolutions.
  torchvision's ResNet-18 (random weights, 512 features) is the alternative generator.
- Library N(0, 0.02^2) of shape (N, d); softmax mixing at tau = 1 with no noise, top-k or hard sampling
  (the op's other options are exposed).
- The generator sees the image resized (shorter side, bilinear, not antialiased: torchvision 0.13's tensor
  resize) to ``input_size``: 224 as published, a no-op on CLIP's 224 input.

``PGN.from_released`` loads the 18 PGNs the authors publish (``pretrained_pgns/``: CLIP, DINO and ViT).

At the defaults (M 16, N 256, d 768) it has 1,032,304 parameters: library 196,608, head 528,384,
ResNet-10 trunk 307,312.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpfast.backbones._imports import require
from vpfast.ops.token_mix import token_mix

GENERATORS = ("resnet10", "resnet18")
RESNET10_CHANNELS = (16, 32, 64, 128)
LIBRARY_STD = 0.02


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN; when it downsamples, a strided 1x1 convolution (with bias) on the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        downsample = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if downsample else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def resnet10_trunk(channels: tuple[int, ...] = RESNET10_CHANNELS) -> nn.Sequential:
    """PGN's ResNet-10 without its head: (B, 3, H, W) images -> (B, channels[-1]) features."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, channels[0], 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(channels[0]),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    in_channels = channels[0]
    for group, out_channels in enumerate(channels):
        layers.append(BasicBlock(in_channels, out_channels, stride=1 if group == 0 else 2))
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    trunk = nn.Sequential(*layers)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return trunk


def resnet18_trunk() -> nn.Module:
    """torchvision's ResNet-18 (random weights) with its classifier removed: images -> (B, 512) features."""
    torchvision = require("torchvision", extra="torchvision")
    trunk = torchvision.models.resnet18(weights=None)
    trunk.fc = nn.Identity()
    return trunk


class PGN(nn.Module):
    """Generates (B, ``num_prompts``, ``dim``) prompt tokens from images by mixing a learned token library.

    ``generator`` is "resnet10" (published) or "resnet18". ``input_size`` is the generator's input
    resolution (shorter side); None feeds the images as they come. ``tau``, ``gumbel``, ``topk``, ``hard``
    and ``activation`` are passed to ``vpfast.ops.token_mix`` (published: 1, off, None, off, "softmax").
    """

    def __init__(
        self,
        num_prompts: int = 16,
        library_size: int = 256,
        dim: int = 768,
        generator: str = "resnet10",
        *,
        input_size: int | None = 224,
        tau: float = 1.0,
        gumbel: bool = False,
        topk: int | None = None,
        hard: bool = False,
        activation: str = "softmax",
    ) -> None:
        super().__init__()
        for name, value in (("num_prompts", num_prompts), ("library_size", library_size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int)
                                       or input_size < 1):
            raise ValueError(f"input_size must be a positive integer or None, got {input_size!r}")
        self.num_prompts, self.library_size, self.dim = num_prompts, library_size, dim
        self.input_size = input_size
        self.mix_options = {"tau": tau, "gumbel": gumbel, "topk": topk, "hard": hard, "activation": activation}
        if generator == "resnet10":
            self.trunk, features = resnet10_trunk(), RESNET10_CHANNELS[-1]
        else:
            self.trunk, features = resnet18_trunk(), 512
        self.generator = generator
        self.head = nn.Linear(features, num_prompts * library_size)
        self.library = nn.Parameter(torch.empty(library_size, dim).normal_(std=LIBRARY_STD))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` with the shorter side at ``input_size`` (bilinear, no antialiasing), as the generator sees them.

        As the published code's ``torchvision.transforms.functional.resize(images, input_size)`` on tensors
        with torchvision 0.13, whose tensor resize does not antialias.
        """
        if self.input_size is None:
            return images
        height, width = images.shape[-2:]
        short, long = min(height, width), max(height, width)  # not sorted(): dynamic shapes can't be sorted
        if short == self.input_size:
            return images
        new_long = int(self.input_size * long / short)  # torchvision's resize(int) rule
        size = (self.input_size, new_long) if height <= width else (new_long, self.input_size)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, M, N) mixing logits of normalized (B, 3, H, W) images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        return self.head(self.trunk(self.resize(images))).view(-1, self.num_prompts, self.library_size)

    def forward(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """(B, M, d) prompt tokens for normalized images; ``seed`` drives the Gumbel noise when it is on."""
        return token_mix(self.logits(images), self.library, seed=seed, **self.mix_options)

    @classmethod
    def from_released(cls, path: str | Path, **mix_options) -> PGN:
        """A PGN with the weights of a checkpoint published in jochemloedeman/PGN (``pretrained_pgns/*.pt``).

        Those files are plain state dicts of the authors' ``TLPGN`` (``tl_vectors`` and the ResNet-10
        ``model.*``), read here with ``torch.load(weights_only=True)``: tensors and containers only, nothing
        executed; a file that holds anything else is refused. The library size and token width come from
        ``tl_vectors``, the number of prompts from the head's outputs, so the CLIP (M 16, N 256, d 768), DINO
        (N 128, d 384) and ViT (N 128, d 768) variants all load. ``mix_options`` go to ``PGN`` (tau, ...).
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path} is not a plain state dict of tensors (weights_only=True refused it): "
                             f"{exc}") from exc
        if not isinstance(state, dict) or "tl_vectors" not in state or "model.output_net.2.weight" not in state:
            keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is not a released PGN checkpoint: expected the keys 'tl_vectors' and "
                             f"'model.output_net.2.weight', got {keys}")
        library_size, dim = state["tl_vectors"].shape
        outputs = state["model.output_net.2.weight"].shape[0]
        if outputs % library_size:
            raise ValueError(f"{path}: the head's {outputs} outputs are not a multiple of the library size "
                             f"{library_size}")
        pgn = cls(outputs // library_size, library_size, dim, **mix_options)
        renamed = {_vpfast_key(key): value for key, value in state.items()}
        expected = pgn.state_dict()
        unknown, missing = sorted(set(renamed) - set(expected)), sorted(set(expected) - set(renamed))
        if unknown or missing:
            raise ValueError(f"{path} does not match PGN's ResNet-10: unexpected keys {unknown[:5]}, missing keys "
                             f"{missing[:5]} (vpfast names)")
        for key, value in renamed.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, PGN's ResNet-10 expects "
                                 f"{tuple(expected[key].shape)}")
        pgn.load_state_dict(renamed)
        return pgn

    def extra_repr(self) -> str:
        options = ", ".join(f"{key}={value}" for key, value in self.mix_options.items())
        return (f"num_prompts={self.num_prompts}, library_size={self.library_size}, dim={self.dim}, "
                f"generator={self.generator!r}, input_size={self.input_size}, {options}")


_RELEASED_KEYS = (  # released TLPGN state-dict names -> PGN's
    (re.compile(r"^tl_vectors$"), "library"),
    (re.compile(r"^model\.input_net\.(\d+)\."), r"trunk.\1."),
    (re.compile(r"^model\.blocks\.(\d+)\.net\."), lambda m: f"trunk.{4 + int(m.group(1))}.body."),
    (re.compile(r"^model\.blocks\.(\d+)\.downsample\."), lambda m: f"trunk.{4 + int(m.group(1))}.shortcut."),
    (re.compile(r"^model\.output_net\.2\."), "head."),
)


def _vpfast_key(key: str) -> str:
    """PGN's name for a key of the released ``TLPGN`` state dict (unknown keys stay as they are)."""
    for pattern, replacement in _RELEASED_KEYS:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    return key
