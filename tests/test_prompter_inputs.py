"""The pixel prompters name the images' shape when a batch has the wrong number of channels."""

from __future__ import annotations

import re

import pytest
import torch

from vpfast.prompters import EVPrompter, PadPrompter, PatchPrompter

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("make", [lambda: EVPrompter(image_size=32, pad=4), lambda: PadPrompter(image_size=32, pad=4),
                                  lambda: PatchPrompter(image_size=32, patch=4)])
@pytest.mark.parametrize("shape,dtype", [((2, 1, 28, 28), torch.uint8), ((2, 4, 28, 28), torch.float32)])
def test_grayscale_or_rgba_batches_are_named(make, shape, dtype):
    prompter = make()
    message = re.escape(f"images must have 3 channels, (B, 3, H, W), to match the prompter, got shape {shape}: "
                        "repeat a grayscale batch with images.expand(-1, 3, -1, -1), drop an alpha channel with "
                        "images[:, :3]")
    with pytest.raises(ValueError, match=message):
        prompter(torch.zeros(shape, dtype=dtype))
    fixed = torch.zeros(shape, dtype=dtype)
    fixed = fixed.expand(-1, 3, -1, -1) if shape[1] == 1 else fixed[:, :3]
    assert prompter(fixed).shape == (2, 3, 32, 32)
