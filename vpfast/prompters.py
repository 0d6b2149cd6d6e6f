"""Pixel prompters: EVP (Wu et al.) and the Bahng et al. pad and patch prompters, all on ``vpfast.ops.compose``.

A prompter holds the learned prompt, the mask of its visible entries and the normalization as
device buffers, and turns a batch of images (uint8 0..255 or float 0..1, any spatial size) into the
prompted, normalized S x S batch a frozen model takes, in one fused op. Its own CPU
``torch.Generator`` draws everything random (input-diversity rows, random patch locations, the
N(0, 1) init); its state is saved with ``state_dict`` so a resumed run repeats the same draws. A training
loop may draw a step's values before the forward (``draw_step``), into device buffers that a step
replayed from a CUDA graph reads anew at every replay.
Under DDP each rank has its own generator: with one seed, every rank's sample i gets the same
diversity row; pass ``seed + rank`` for independent draws (DDP broadcasts rank 0's initial prompt).
Methods: docs/methods.md (EVP, Bahng prompters); the op: docs/ops.md (compose).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vpfast.ops.compose import (
    GRAD_NORMS,
    GRAD_REGIONS,
    MODES,
    OUT_DTYPES,
    channel_vector,
    check_choice,
    check_transform,
    compose,
)

if TYPE_CHECKING:
    from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FILL = 0.0  # canvas value around the image: black, as EVP pads


def _check_int(name: str, value: int, low: int, high: int | None = None, why: str = "") -> None:
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {bounds}{why}, got {value!r}")


def check_channels(images: torch.Tensor, channels: int) -> None:
    """Raise ValueError naming the images' shape when a (B, C, H, W) batch has not the prompter's C channels."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] != channels:
        raise ValueError(f"images must have {channels} channels, (B, {channels}, H, W), to match the prompter, got "
                         f"shape {tuple(images.shape)}: repeat a grayscale batch with images.expand(-1, 3, -1, -1), "
                         f"drop an alpha channel with images[:, :3]")


def _channel_buffer(name: str, value: Sequence[float] | None, nonzero: bool = False) -> torch.Tensor | None:
    """Three per-channel float32 values as a fresh CPU tensor (None stays None), checked as compose checks them."""
    vec = channel_vector(name, value, 3, torch.device("cpu"), nonzero=nonzero)
    return None if vec is None else vec.clone()


@dataclass(frozen=True)
class Diversity:
    """Per-sample input diversity: with probability ``p`` a sample's prompted canvas is resized and moved.

    A transformed sample is resized to a size drawn uniformly from [``min_size``, ``max_size``]
    (defaults: max_size S, min_size int(0.875 max_size)) and placed at a uniform random offset on the
    S x S canvas (the rest normalized fill); the others keep (S, 0, 0). With ``flip`` every sample's
    image, transformed or not, is also mirrored horizontally with probability 0.5, before the prompt is
    added (the prompt is never mirrored): ``Diversity(p=0, flip=True)`` is EVP's released random flip.
    With p == 0 the prompters pass the flips as compose's ``flip`` flags (no transform path; same draws).
    Applied in training mode only (docs/ops.md, compose; docs/methods.md, EVP).
    """

    p: float = 0.5
    min_size: int | None = None
    max_size: int | None = None
    flip: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"Diversity.p must be a probability in [0, 1], got {self.p!r}")
        for name in ("min_size", "max_size"):
            if getattr(self, name) is not None:
                _check_int(f"Diversity.{name}", getattr(self, name), 1)

    def size_range(self, canvas: int) -> tuple[int, int]:
        """(min_size, max_size) on an S = ``canvas`` canvas, defaults filled in; raises if they do not fit."""
        high = canvas if self.max_size is None else self.max_size
        low = max(1, int(0.875 * high)) if self.min_size is None else self.min_size
        _check_int("Diversity.max_size", high, 1, canvas, " (the canvas size S)")
        _check_int("Diversity.min_size", low, 1, high, " (up to max_size)")
        return low, high

    def draw(self, batch: int, canvas: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, 4) int32 CPU rows (size, ty, tx, flip); the same number of draws whatever the coins say."""
        low, high = self.size_range(canvas)
        apply = torch.rand(batch, generator=generator, dtype=torch.float64) < self.p
        size = torch.randint(low, high + 1, (batch,), generator=generator)
        room = canvas - size + 1
        ty = (torch.rand(batch, generator=generator, dtype=torch.float64) * room).long()
        tx = (torch.rand(batch, generator=generator, dtype=torch.float64) * room).long()
        flip = torch.randint(0, 2, (batch,), generator=generator) if self.flip else torch.zeros_like(size)
        placed = torch.where(apply[:, None], torch.stack([size, ty, tx], 1), torch.tensor([canvas, 0, 0]))
        return torch.cat([placed, flip[:, None]], 1).to(torch.int32)


def _pinned(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host ``values`` on their way to ``device``: in page-locked memory when that is a GPU, so the copy is
    asynchronous (a copy from pageable memory may wait for the stream); torch's pinned-memory cache reuses
    a block only once its copy has completed."""
    return values.pin_memory() if device.type == "cuda" else values


EVP_FLIP = Diversity(p=0.0, flip=True)  # EVP's augmentation: a random horizontal flip, nothing else


@dataclass(frozen=True)
class PrompterOptions:
    """What every pixel prompter takes besides its geometry, declared once.

    ``mean``/``std``: the normalization (None: none); ``mode``/``antialias``: the resize of the images to
    the inner size; ``diversity``: the training-time per-sample transform; ``grad_region``/``grad_norm``:
    the prompt gradient (see ``vpfast.ops.compose``); ``out_dtype``: the output dtype (None: float32);
    ``seed``: the prompter's generator. A prompter takes an ``options`` object and/or any of these as
    keyword arguments, which override the object's fields.
    """

    mean: Sequence[float] | None = CLIP_MEAN
    std: Sequence[float] | None = CLIP_STD
    mode: str = "bilinear"
    antialias: bool = False
    diversity: Diversity | None = None
    grad_region: str = "prompt"
    grad_norm: str | None = None
    out_dtype: torch.dtype | None = None
    seed: int = 0


def _options(options: PrompterOptions, overrides: dict[str, Any]) -> PrompterOptions:
    """``options`` with ``overrides`` (a prompter's keyword arguments) applied; anything else is refused."""
    if not isinstance(options, PrompterOptions):
        raise ValueError(f"options must be a vpfast.prompters.PrompterOptions, got {options!r}")
    names = tuple(f.name for f in fields(PrompterOptions))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown prompter option(s) {unknown}: expected fields of PrompterOptions {names}")
    return replace(options, **overrides)


# The released EVP recipe: bicubic antialiased resize, random flip, gradient norm over the whole canvas.
EVP_OPTIONS = PrompterOptions(mode="bicubic", antialias=True, diversity=EVP_FLIP, grad_region="canvas")


class _Prompter(nn.Module):
    """What every pixel prompter shares: configuration, buffers, the generator, forward and preview.

    Subclasses set ``prompt`` (the trainable parameter) and ``_num_trainable`` and implement
    ``_prompt_and_mask`` (the (C, S, S) canvas prompt and its (S, S) mask for one forward).
    """

    prompt: nn.Parameter

    def __init__(self, image_size: int, inner_size: int, prompt_space: str, options: PrompterOptions) -> None:
        super().__init__()
        check_choice("mode", options.mode, MODES)
        check_choice("grad_region", options.grad_region, GRAD_REGIONS)
        check_choice("grad_norm", options.grad_norm, GRAD_NORMS)
        if options.out_dtype is not None:
            check_choice("out_dtype", options.out_dtype, OUT_DTYPES)
        if options.diversity is not None:
            if not isinstance(options.diversity, Diversity):
                raise ValueError(f"diversity must be a vpfast.prompters.Diversity or None, got {options.diversity!r}")
            options.diversity.size_range(image_size)
        self.options = options
        self.image_size, self.inner_size, self.prompt_space = image_size, inner_size, prompt_space
        self.mode, self.antialias, self.diversity = options.mode, bool(options.antialias), options.diversity
        self.grad_region, self.grad_norm, self.out_dtype = options.grad_region, options.grad_norm, options.out_dtype
        # Derived from the arguments, so not saved: a checkpoint holds the prompt and the generator.
        self.register_buffer("mean", _channel_buffer("mean", options.mean), persistent=False)
        self.register_buffer("std", _channel_buffer("std", options.std, nonzero=True), persistent=False)
        self.generator = torch.Generator().manual_seed(options.seed)
        self._drawn: dict[int, dict[str, torch.Tensor]] = {}  # batch size -> draw_step's device buffers

    def _prompt_and_mask(self, location: torch.Tensor | None = None,
                         preview: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The (C, S, S) canvas prompt and its (S, S) mask; ``location``: a training step's drawn placement."""
        raise NotImplementedError

    def _draw_placement(self) -> dict[str, torch.Tensor]:
        """A training forward's placement of the prompt, drawn first ({}: the prompt does not move)."""
        return {}

    def _draw(self, batch: int) -> dict[str, torch.Tensor]:
        """A training forward's random values, drawn on the host from the generator in a fixed order: the
        placement, then the diversity rows ("transform", or only the "flip" flags when nothing is moved)."""
        draws = self._draw_placement()
        if self.diversity is not None:
            rows = self.diversity.draw(batch, self.image_size, self.generator)
            check_transform(rows, batch, self.image_size)
            if self.diversity.p > 0:
                draws["transform"] = rows
            elif self.diversity.flip:  # rows (S, 0, 0, flip): compose's flip flags, off the transform path
                draws["flip"] = rows[:, 3].contiguous()
        return draws

    def draw_step(self, batch: int) -> None:
        """Draw the next training forward's random values now, into device buffers that stay put (one set per
        batch size), so that a training step replayed from a CUDA graph reads new values at every replay.

        Once it has been called, training forwards read these buffers and draw nothing: call it before every
        training step (``vpfast train`` does). The generator gives the same values in the same order as when
        the forward draws them, so both ways train the same prompt.
        """
        draws = self._draw(batch)
        buffers = self._drawn.get(batch)
        if buffers is None or any(buffer.device != self.prompt.device for buffer in buffers.values()):
            buffers = {name: torch.empty_like(value, device=self.prompt.device) for name, value in draws.items()}
            self._drawn[batch] = buffers  # new ones only for a new batch size, or after the prompter moved
        for name, value in draws.items():
            buffers[name].copy_(_pinned(value, buffers[name].device), non_blocking=True)

    def _step_draws(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """A training forward's random values on the device: draw_step's buffers, or drawn now."""
        batch = images.shape[0]
        if not self._drawn:
            return {name: _pinned(value, images.device).to(images.device, non_blocking=True)
                    for name, value in self._draw(batch).items()}
        if batch not in self._drawn:
            raise RuntimeError(f"a training forward of {batch} images, but draw_step was called for batch sizes "
                               f"{sorted(self._drawn)} only: call draw_step({batch}) before each training step")
        return self._drawn[batch]

    @property
    def num_trainable(self) -> int:
        """How many prompt values are visible and trained (3 x the mask's area)."""
        return self._num_trainable

    @property
    def update_mask(self) -> torch.Tensor | None:
        """The mask an optimizer applies to ``prompt``'s update (None: every entry is trainable)."""
        return None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted, normalized (B, 3, S, S) batch from (B, 3, H, W) uint8 (0..255) or float (0..1) images."""
        draws = self._step_draws(images) if self.training else {}
        prompt, mask = self._prompt_and_mask(draws.get("location"))
        check_channels(images, prompt.shape[0])
        return compose(
            images, prompt, inner_size=self.inner_size, mask=mask, fill=FILL, mode=self.mode,
            antialias=self.antialias, mean=self.mean, std=self.std, prompt_space=self.prompt_space,
            transform=draws.get("transform"), flip=draws.get("flip"), grad_region=self.grad_region,
            grad_norm=self.grad_norm, out_dtype=self.out_dtype,
        )

    @torch.no_grad()
    def to_image(self) -> Image.Image:
        """The visible prompt on a black canvas, in pixel units, as an S x S RGB ``PIL.Image``.

        Normalized-space prompts are scaled by std (the pixel change they make). Values are clamped
        to [0, 1] and rounded to uint8; ``prompter.to_image().save("prompt.png")`` writes a PNG.
        """
        from PIL import Image

        prompt, mask = self._prompt_and_mask(preview=True)
        visible = prompt * mask
        if self.prompt_space == "normalized" and self.std is not None:
            visible = visible * self.std.view(-1, 1, 1)
        pixels = (FILL + visible).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).contiguous().cpu().numpy())

    def get_extra_state(self) -> torch.Tensor:
        """The generator state (a uint8 tensor, so the state_dict also saves with safetensors)."""
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            got = f"a {state.dtype} tensor" if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"extra state must be the generator state (a uint8 tensor), got {got}")
        self.generator.set_state(state.cpu())

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, inner_size={self.inner_size}, prompt_space={self.prompt_space!r}, "
                f"num_trainable={self.num_trainable}, mode={self.mode!r}, diversity={self.diversity}")


class _FramePrompter(_Prompter):
    """A frame of width ``pad`` on the S x S canvas: a (3, S, S) prompt and an (S, S) mask buffer."""

    def __init__(self, image_size: int, pad: int, inner_size: int, prompt_space: str, normal_init: bool,
                 options: PrompterOptions) -> None:
        _check_int("image_size", image_size, 1)
        _check_int("pad", pad, 0, (image_size - 1) // 2,
                   f" so that the inner square image_size - 2 * pad is at least 1 (image_size = {image_size})")
        super().__init__(image_size, inner_size, prompt_space, options)
        mask = torch.ones(image_size, image_size)
        mask[pad:image_size - pad, pad:image_size - pad] = 0
        self.register_buffer("mask", mask, persistent=False)
        self.pad = pad
        self._num_trainable = 3 * (image_size**2 - (image_size - 2 * pad) ** 2)
        prompt = torch.zeros(3, image_size, image_size)
        if normal_init:
            prompt = torch.randn(3, image_size, image_size, generator=self.generator) * mask
        self.prompt = nn.Parameter(prompt)

    def _prompt_and_mask(self, location: torch.Tensor | None = None,
                         preview: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prompt, self.mask

    @property
    def update_mask(self) -> torch.Tensor:
        return self.mask


class EVPrompter(_FramePrompter):
    """EVP: a zero-initialized pixel-space frame of width ``pad`` around the image shrunk to S - 2 pad.

    Forward: resize to s = S - 2 pad, zero pad to S, add prompt * mask, normalize (CLIP by default),
    then, in training, apply ``diversity``. The defaults are the released EVP recipe: bicubic,
    antialiased resize, a random horizontal flip of each training sample (``Diversity(p=0, flip=True)``)
    and ``grad_region="canvas"``, which with ``NormalizedSGD.for_prompter`` is the released update
    (gradient norm over the whole canvas, masked step). Differences: docs/methods.md, EVP.
    69,840 trainable values at the defaults.
    """

    def __init__(self, image_size: int = 224, pad: int = 30, options: PrompterOptions = EVP_OPTIONS,
                 **overrides: Any) -> None:
        super().__init__(image_size, pad, image_size - 2 * pad, "pixel", False, _options(options, overrides))


class PadPrompter(_FramePrompter):
    """Bahng et al.'s pad prompter: an N(0, 1)-initialized frame of width ``pad`` over the full image.

    The image is resized to S only if it is not S x S already, and the prompt is added in normalized
    space (after mean/std), as the released code adds it to the CLIP-preprocessed image.
    """

    def __init__(self, image_size: int = 224, pad: int = 30, options: PrompterOptions = PrompterOptions(),
                 **overrides: Any) -> None:
        super().__init__(image_size, pad, image_size, "normalized", True, _options(options, overrides))


class PatchPrompter(_Prompter):
    """Bahng et al.'s patch prompter: an N(0, 1)-initialized ``patch`` x ``patch`` prompt in normalized space.

    ``random=False``: the patch sits at the top-left corner. ``random=True``: every forward, in training
    *and* eval, draws one location (row, col) uniform over all positions inside the canvas from the
    module's generator, for the whole batch, as the released code does (its eval numbers are with
    random locations; the learned patch is trained to work anywhere). Two deliberate differences:
    the range includes the last row and column (``np.random.choice(S - p)`` never picks S - p), and
    eval draws advance the generator, so a run is reproducible when its train/eval order is.
    ``prompt`` is the (3, p, p) patch; ``to_image`` shows it at the top-left corner.
    """

    def __init__(self, image_size: int = 224, patch: int = 30, random: bool = False,
                 options: PrompterOptions = PrompterOptions(), **overrides: Any) -> None:
        _check_int("image_size", image_size, 1)
        _check_int("patch", patch, 1, image_size, " (the canvas size image_size)")
        super().__init__(image_size, image_size, "normalized", _options(options, overrides))
        self.patch, self.random = patch, bool(random)
        self._num_trainable = 3 * patch * patch
        self.prompt = nn.Parameter(torch.randn(3, patch, patch, generator=self.generator))

    def location(self) -> tuple[int, int]:
        """(row, col) of the patch's top-left corner for the next forward (draws one if ``random``)."""
        if not self.random:
            return 0, 0
        row, col = self._draw_placement()["location"].tolist()
        return row, col

    def _draw_placement(self) -> dict[str, torch.Tensor]:
        if not self.random:
            return {}
        return {"location": torch.randint(0, self.image_size - self.patch + 1, (2,), generator=self.generator)}

    def _prompt_and_mask(self, location: torch.Tensor | None = None,
                         preview: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if location is not None:
            return self._placed(location)
        row, col = (0, 0) if preview else self.location()
        pads = (col, self.image_size - self.patch - col, row, self.image_size - self.patch - row)
        return F.pad(self.prompt, pads), F.pad(self.prompt.new_ones(self.patch, self.patch), pads)

    def _placed(self, location: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch placed at a (row, col) device tensor by gathering, with no host read of the location."""
        span = torch.arange(self.image_size, device=location.device)
        rows, cols = span - location[0], span - location[1]
        inside = ((rows >= 0) & (rows < self.patch))[:, None] & ((cols >= 0) & (cols < self.patch))[None, :]
        rows, cols = rows.clamp(0, self.patch - 1), cols.clamp(0, self.patch - 1)
        canvas = self.prompt[:, rows[:, None], cols[None, :]]
        return torch.where(inside, canvas, 0.0), inside.to(self.prompt.dtype)
