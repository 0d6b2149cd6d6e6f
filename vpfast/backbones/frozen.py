"""The frozen classifier every prompting method is trained in front of."""

from collections.abc import Sequence

import torch
from torch import nn


class FrozenClassifier(nn.Module):
    """A pretrained classifier held fixed while a prompt is learned in front of it.

    Its parameters never require gradients and it stays in eval mode whatever mode the surrounding
    module is put in, so BatchNorm statistics and dropout never move (``requires_grad=False`` alone
    does not freeze BatchNorm). The input still gets its gradient: prompting backpropagates through
    the frozen model. ``forward`` takes images already normalized with ``mean``/``std`` at
    ``input_size`` (height, width) and returns (B, ``num_classes``) logits.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(input_size) != 2:
            raise ValueError(f"input_size must be (height, width), got {tuple(input_size)}")
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)} values")
        self.model = model.requires_grad_(False).eval()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.num_classes = int(num_classes)
        self.autocast_dtype = autocast_dtype

    def train(self, mode: bool = True) -> "FrozenClassifier":
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of normalized images; float32 when the model runs under autocast."""
        if self.autocast_dtype is None:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            logits = self.model(x)
        return logits.float()

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, num_classes={self.num_classes}, mean={self.mean}, std={self.std}, "
                f"autocast_dtype={self.autocast_dtype}")
