"""``vpfast train --method provp|vpt``: their own config fields, checks, and the adapter built from a TrainConfig.

ProVP-Ref (docs/methods.md): M = 16 prompts in every layer blended with alpha = 0.01, re-formation
loss weight 1.0 at temperature 1.0, SGD lr 0.1, momentum 0.9, cosine, weight decay 5e-4, one warmup epoch
(the released code warms up at a constant 1e-5; here the linear warmup starts at lr / 2). VPT: the same
prompts with alpha = 0 (deep) or layer 0 only (``--no-deep``), no re-formation loss, weight decay 1e-4, a
linear warmup over the first tenth of the epochs. The optimizer, lr, weight decay and VPT's warmup are in
their records' recipes (vpfast/methods.py). Batch size and epochs are left to the command line
(published: ProVP batch 32, 200 epochs at 8/16 shots, 100 base-to-novel; VPT batch 128, 100 epochs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vpfast.backbones.frozen import FrozenClassifier
from vpfast.provp import ProVP, ProVPClassifier

if TYPE_CHECKING:
    from vpfast.train.config import TrainConfig


def resolve(cfg: TrainConfig) -> None:
    """Fill and check ProVP's and VPT's own fields in a config (in place); runs before the recipe's defaults."""
    provp = cfg.method == "provp"
    cfg.alpha = (0.01 if provp else 0.0) if cfg.alpha is None else cfg.alpha
    cfg.ref_weight = (1.0 if provp else 0.0) if cfg.ref_weight is None else cfg.ref_weight
    if cfg.warmup_epochs is None and provp:
        cfg.warmup_epochs = min(1, cfg.epochs - 1)
    if not 0 <= cfg.alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1] (0.01: ProVP, 0: VPT-deep), got {cfg.alpha}")
    if not provp and (cfg.alpha != 0 or cfg.ref_weight != 0):
        raise ValueError(f"--method vpt replaces its prompts and has no re-formation loss: alpha and ref_weight must "
                         f"be 0, got alpha {cfg.alpha} and ref_weight {cfg.ref_weight} (use --method provp)")
    if cfg.ref_weight < 0:
        raise ValueError(f"ref_weight must be >= 0, got {cfg.ref_weight}")
    if not cfg.ref_temperature > 0:
        raise ValueError(f"ref_temperature must be > 0, got {cfg.ref_temperature}")
    if cfg.num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1 for --method {cfg.method}, got {cfg.num_prompts}")


def build_provp_adapter(cfg: TrainConfig, backbone: FrozenClassifier) -> ProVPClassifier:
    """ProVP (or VPT) on the backbone's ViT, scored by its head (CLIP: the cached zero-shot text head)."""
    try:
        provp = ProVP(backbone, num_prompts=cfg.num_prompts, alpha=cfg.alpha, deep=cfg.deep)
    except TypeError as exc:
        raise ValueError(f"--method {cfg.method} needs an open_clip or timm ViT, and {cfg.model} is not one: "
                         f"{exc}") from exc
    return ProVPClassifier(provp, ref_weight=cfg.ref_weight, ref_temperature=cfg.ref_temperature)
