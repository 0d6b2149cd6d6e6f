"""The frozen classifier every prompting method is trained in front of, and its fast settings.

``precision="bf16"`` casts the frozen weights to bfloat16 once (modules marked ``keeps_float32``, such as
the zero-shot head, stay float32) and runs the model under bf16 autocast, so no weight is cast per step
while trainable parts inserted by prompting methods (fp32 tokens, adapter blocks) still mix in; logits
come out float32. ``compile`` wraps the forward in ``torch.compile``. Convolutional networks run channels-last
(NHWC): oneDNN and cuDNN pick their fast convolutions for it (EfficientNet-Lite0's forward and input-gradient
backward took 1.4-2.8x less time on 2 CPU cores).
"""

from collections.abc import Sequence

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")


def check_compile(compile: bool | str) -> None:
    """``compile`` is False, True (inductor) or a torch.compile backend name."""
    if not isinstance(compile, (bool, str)) or compile == "":
        raise ValueError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")


def compile_function(function, compile: bool | str):
    """``function`` compiled as ``compile`` says (True: inductor, a str: that backend), or itself when False.

    Modules keep the result as a plain attribute, not a submodule, so their state_dict keeps its keys."""
    check_compile(compile)
    if not compile:
        return function
    return torch.compile(function, backend="inductor" if compile is True else compile)


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` is a CNN: more than one 2-d convolution (a ViT has one, its patch embedding)."""
    return sum(isinstance(module, nn.Conv2d) for module in model.modules()) > 1


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and buffers of ``module`` to ``dtype``, except under modules with
    ``keeps_float32 = True``."""
    if getattr(module, "keeps_float32", False):
        return module
    for name, param in module.named_parameters(recurse=False):
        if param.is_floating_point():
            setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
    for name, buffer in module.named_buffers(recurse=False):
        if buffer is not None and buffer.is_floating_point():
            module._buffers[name] = buffer.to(dtype)
    for child in module.children():
        cast_frozen(child, dtype)
    return module


class FrozenClassifier(nn.Module):
    """A pretrained classifier held fixed while a prompt is learned in front of it.

    Its parameters never require gradients and it stays in eval mode whatever mode the surrounding
    module is put in, so BatchNorm statistics and dropout never move (``requires_grad=False`` alone
    does not freeze BatchNorm). The input still gets its gradient: prompting backpropagates through
    the frozen model. ``forward`` takes images already normalized with ``mean``/``std`` at
    ``input_size`` (height, width) and returns (B, ``num_classes``) logits.

    ``precision`` is "fp32" or "bf16" (weights cast once, bf16 autocast, float32 logits);
    ``autocast_dtype`` alone keeps float32 weights under autocast. ``compile`` (True, or a backend
    name such as "aot_eager") compiles the forward; batch sizes may change (torch's automatic dynamic
    shapes after the second size). Prompting wrappers keep it: ``PromptedViT`` and ``ProTuning`` hooks are
    traced into the compiled forward, and ``ProVP`` (which runs the ViT's parts itself) compiles its features.
    ``channels_last`` (default: for CNNs, see ``is_convolutional``) stores the
    weights and feeds the input in NHWC memory order; the values are the same up to rounding.
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
        precision: str = "fp32",
        compile: bool | str = False,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if len(input_size) != 2:
            raise ValueError(f"input_size must be (height, width), got {tuple(input_size)}")
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)} values")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_compile(compile)
        if channels_last is not None and not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be True, False or None (for CNNs), got {channels_last!r}")
        if precision == "bf16":
            if autocast_dtype not in (None, torch.bfloat16):
                raise ValueError(f"precision='bf16' runs under bfloat16 autocast, got autocast_dtype={autocast_dtype}")
            autocast_dtype = torch.bfloat16
            cast_frozen(model, torch.bfloat16)
        self.channels_last = is_convolutional(model) if channels_last is None else channels_last
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model.requires_grad_(False).eval()
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.num_classes = int(num_classes)
        self.autocast_dtype = autocast_dtype
        self.precision = precision
        self.compile = compile
        self._logits_fn = compile_function(self._logits, compile)

    def train(self, mode: bool = True) -> "FrozenClassifier":
        super().train(mode)
        self.model.eval()
        return self

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=False):  # CUDA-graph safe
            logits = self.model(x)
        return logits.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of normalized images; float32 when the model runs under autocast or in bf16."""
        return self._logits_fn(x)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, num_classes={self.num_classes}, mean={self.mean}, std={self.std}, "
                f"autocast_dtype={self.autocast_dtype}, precision={self.precision!r}, compile={self.compile!r}, "
                f"channels_last={self.channels_last}")
