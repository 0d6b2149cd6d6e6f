"""Output label mappings: read a K-class target task off the logits of a 1000-class ImageNet classifier.

``FirstK`` takes the first K logits (Bahng et al.). ``FrequencyMapping`` is ILM-VP's frequency mapping:
count how often each source class is the prediction for each target label (with the current prompt),
then assign sources to targets one to one, greedily by count. Refreshing it every epoch is ILM-VP's
iterative mapping; every k epochs is AutoVP's IterMap.
"""

import torch
from torch import nn


class FirstK(nn.Module):
    """Target class t is source class t: the logits of the first ``k`` classes."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = int(k)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] < self.k:
            raise ValueError(f"FirstK({self.k}) needs at least {self.k} source logits, got {logits.shape[-1]}")
        return logits[..., : self.k]

    def extra_repr(self) -> str:
        return f"k={self.k}"


def greedy_one_to_one(counts: torch.Tensor) -> torch.Tensor:
    """Map each target to a distinct source from a (num_source, num_target) matrix of counts (or any scores).

    Repeatedly takes the largest remaining count, assigns its source to its target and retires that
    source and target (ties: the first in row-major order). Returns (num_target,) source indices.
    """
    num_source, num_target = counts.shape
    if num_target > num_source:
        raise ValueError(f"a one-to-one mapping needs num_target <= num_source, got {num_target} > {num_source}")
    remaining = counts.detach().to("cpu", torch.float64, copy=True)  # K tiny steps: run them on the host
    mapping = torch.empty(num_target, dtype=torch.long)
    for _ in range(num_target):
        flat = int(remaining.argmax())
        source, target = divmod(flat, num_target)
        mapping[target] = source
        remaining[source, :] = -torch.inf
        remaining[:, target] = -torch.inf
    return mapping.to(counts.device)


class FrequencyMapping(nn.Module):
    """ILM-VP frequency label mapping, refreshed every ``refresh_every`` epochs (None: computed once).

    Use: at each epoch where ``should_refresh(epoch)``, run the prompted model over (part of) the training
    set calling ``update(source_logits, targets)``, then ``assign()``. ``forward`` returns the (B, K)
    logits of the assigned source classes. Until the first ``assign()`` the mapping is first-K. The
    mapping is a buffer, saved with checkpoints; the counts are scratch and are not.
    """

    def __init__(self, num_source: int, num_target: int, refresh_every: int | None = None) -> None:
        super().__init__()
        if num_target > num_source:
            raise ValueError(f"num_target must be <= num_source for a one-to-one mapping, got {num_target} > "
                             f"{num_source}")
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be None or a positive number of epochs, got {refresh_every}")
        self.num_source = num_source
        self.num_target = num_target
        self.refresh_every = refresh_every
        self.register_buffer("mapping", torch.arange(num_target))
        self.register_buffer("counts", torch.zeros(num_source, num_target, dtype=torch.long), persistent=False)

    def should_refresh(self, epoch: int) -> bool:
        """Whether to recount and reassign before (0-based) ``epoch``."""
        if self.refresh_every is None:
            return epoch == 0
        return epoch % self.refresh_every == 0

    @torch.no_grad()
    def update(self, source_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count each sample's predicted source class against its target label (no host sync)."""
        if targets.dim() != 1 or source_logits.shape != (targets.shape[0], self.num_source):
            raise ValueError(f"expected source_logits (B, {self.num_source}) and targets (B,), got "
                             f"{tuple(source_logits.shape)} and {tuple(targets.shape)}")
        cells = (source_logits.argmax(dim=1) * self.num_target + targets).to(self.counts.device)
        self.counts.view(-1).index_add_(0, cells, torch.ones_like(cells))

    def assign(self) -> torch.Tensor:
        """Set the mapping from the counts so far and clear them for the next refresh; returns the mapping."""
        self.mapping.copy_(greedy_one_to_one(self.counts))
        self.counts.zero_()
        return self.mapping

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(-1, self.mapping)

    def extra_repr(self) -> str:
        return f"num_source={self.num_source}, num_target={self.num_target}, refresh_every={self.refresh_every}"
