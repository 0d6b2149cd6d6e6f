"""The EVP update (globally L2-normalized, masked gradient step) and its per-epoch cosine schedule.

Contract: docs/ops.md, "The EVP update"; the released code: docs/methods.md, EVP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR


class NormalizedSGD(torch.optim.Optimizer):
    """EVP's update: ``p <- p - lr * M * g / (||g||_2 + eps)`` for every parameter p with gradient g.

    The norm is over the whole tensor (EVP takes it over the full canvas, centre included) and the
    optional mask M (param group key ``"mask"``, broadcastable to p; default none) is applied after
    it. No momentum, no weight decay, no host synchronization. Under DistributedDataParallel the
    gradient is already all-reduced (averaged over ranks) when ``step`` runs, so the norm is the
    global batch's and multi-process training gives the single-process update.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 eps: float = 1e-10) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(params, dict(lr=lr, eps=eps, mask=None))

    @classmethod
    def for_prompter(cls, prompter: torch.nn.Module, lr: float, eps: float = 1e-10) -> NormalizedSGD:
        """The optimizer of a vpfast prompter's ``prompt``, masked by its ``update_mask`` (EVP's masked step).

        Create it after moving the prompter to its device, as for any optimizer.
        """
        return cls([{"params": [prompter.prompt], "mask": prompter.update_mask}], lr=lr, eps=eps)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        mask = self.param_groups[-1]["mask"]
        if mask is None:
            return
        for p in self.param_groups[-1]["params"]:
            if not (isinstance(mask, torch.Tensor) and _broadcasts_to(mask.shape, p.shape)):
                self.param_groups.pop()
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"param group mask must be a tensor broadcastable to the parameter's shape "
                                 f"{tuple(p.shape)}, got {shape}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One normalized step for every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mask = group["mask"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad / (torch.linalg.vector_norm(p.grad) + group["eps"])
                if mask is not None:  # .to is a no-op unless a loaded state_dict left the mask elsewhere
                    update = update * mask.to(device=p.device, dtype=p.dtype, non_blocking=True)
                p.sub_(update, alpha=group["lr"])
        return loss


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def cosine_per_epoch(optimizer: torch.optim.Optimizer, epochs: int) -> CosineAnnealingLR:
    """EVP's schedule: ``lr_e = lr / 2 * (1 + cos(pi e / epochs))`` for epoch e, eta_min 0, no warmup.

    Step it once per epoch (after the epoch's last optimizer step), not once per batch.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    return CosineAnnealingLR(optimizer, T_max=epochs)
