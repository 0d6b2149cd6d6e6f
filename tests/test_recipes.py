"""The released recipes are the defaults: EVPrompter() and ``vpfast train --method evp`` train released EVP."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compose_cases import rel_err
from vpfast.optim import NormalizedSGD, cosine_per_epoch
from vpfast.prompters import (
    CLIP_MEAN,
    CLIP_STD,
    EVP_OPTIONS,
    Diversity,
    EVPrompter,
    PadPrompter,
    PatchPrompter,
    PrompterOptions,
)
from vpfast.train.build import build_optimizer, build_prompter
from vpfast.train.config import TrainConfig

pytestmark = pytest.mark.cpu

S, PAD, NATIVE, CLASSES = 32, 4, 50, 5


def _frozen_model(dtype: torch.dtype) -> nn.Module:
    """A tiny random conv net, not mirror-symmetric, frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 5, stride=3), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2), nn.Tanh(),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES))
    return model.to(dtype).requires_grad_(False)


def _batches(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images as stored (NATIVE x NATIVE, not the inner size) and labels."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (batch, 3, NATIVE, NATIVE), generator=g, dtype=torch.uint8),
             torch.randint(0, CLASSES, (batch,), generator=g)) for _ in range(steps)]


def _train_vpfast(batches, epochs: int, lr: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EVPrompter with its defaults (only the geometry scaled down); returns the prompt and the flips it drew."""
    model, prompter = _frozen_model(torch.float32), EVPrompter(image_size=S, pad=PAD, seed=3)
    opt = NormalizedSGD.for_prompter(prompter, lr=lr)
    schedule = cosine_per_epoch(opt, epochs)
    flips = []
    for _ in range(epochs):
        for images, labels in batches:
            twin = torch.Generator()
            twin.set_state(prompter.generator.get_state())
            flips.append(prompter.diversity.draw(images.shape[0], S, twin)[:, 3].bool())
            opt.zero_grad()
            F.cross_entropy(model(prompter(images)), labels).backward()
            opt.step()
        schedule.step()
    return prompter.prompt.detach(), flips


def _train_released(batches, epochs: int, lr: float, flips: list[torch.Tensor],
                    mirror_prompt: bool = False) -> torch.Tensor:
    """UCSC-VLAA/EVP's training step in float64, written from its description (docs/methods.md, EVP).

    Per sample: bicubic antialiased resize of the stored image to the inner size, a random horizontal
    flip, zero pad, + prompt, CLIP normalization. B prompt copies, their mean gradient, L2 norm over the
    whole canvas, masked step, per-epoch cosine. The flip mirrors the image only, as the released data
    pipeline does; ``mirror_prompt`` mirrors the prompted canvas instead (a flip after the prompt is added,
    what vpfast did before), to show the test tells the two apart.
    """
    model = _frozen_model(torch.float64)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    mask = torch.ones(3, S, S, dtype=torch.float64)
    mask[:, PAD:S - PAD, PAD:S - PAD] = 0
    prompt = torch.zeros(3, S, S, dtype=torch.float64)
    draws = iter(flips)
    for e in range(epochs):
        lr_e = lr / 2 * (1 + math.cos(math.pi * e / epochs))
        for images, labels in batches:
            flip = next(draws).view(-1, 1, 1, 1)
            x = F.interpolate(images.double() / 255, size=(S - 2 * PAD,) * 2, mode="bicubic", antialias=True,
                              align_corners=False)
            if not mirror_prompt:
                x = torch.where(flip, x.flip(-1), x)
            copies = prompt.repeat(images.shape[0], 1, 1, 1).requires_grad_(True)
            canvas = (F.pad(x, (PAD,) * 4, value=0.0) + copies - mean) / std
            if mirror_prompt:
                canvas = torch.where(flip, canvas.flip(-1), canvas)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(canvas), labels), copies)
            grad = grad.mean(0)
            prompt = prompt - lr_e * mask * grad / (grad.norm() + 1e-10)
    return prompt


def test_evprompter_defaults_are_the_released_recipe():
    evp = EVPrompter()
    assert (evp.mode, evp.antialias, evp.grad_region, evp.grad_norm) == ("bicubic", True, "canvas", None)
    assert evp.diversity == Diversity(p=0.0, flip=True)
    assert (evp.image_size, evp.inner_size, evp.prompt_space, evp.num_trainable) == (224, 164, "pixel", 69_840)


def test_evprompter_defaults_train_the_released_steps_in_float64():
    batches, epochs, lr = _batches(steps=2, batch=6), 2, 70.0
    got, flips = _train_vpfast(batches, epochs, lr)
    drawn = torch.cat(flips)
    assert 0 < int(drawn.sum()) < drawn.numel()  # both kinds of sample occur
    assert got.abs().max() > 1.0  # the prompt moved
    expected = _train_released(batches, epochs, lr, flips)
    assert rel_err(got, expected) < 1e-5
    assert (got[:, PAD:S - PAD, PAD:S - PAD] == 0).all()
    # The test can tell: without the flips, or with the prompt mirrored along with the image, the steps differ.
    unflipped = _train_released(batches, epochs, lr, [torch.zeros_like(f) for f in flips])
    assert rel_err(got, unflipped) > 1e-3
    prompt_mirrored = _train_released(batches, epochs, lr, flips, mirror_prompt=True)
    assert rel_err(got, prompt_mirrored) > 1e-3


def _backbone(size: int = 224) -> SimpleNamespace:
    return SimpleNamespace(input_size=(size, size), mean=CLIP_MEAN, std=CLIP_STD)


def test_train_method_evp_builds_the_released_recipe():
    cfg = TrainConfig(method="evp").resolved()
    assert (cfg.optimizer, cfg.lr, cfg.mode, cfg.antialias, cfg.flip, cfg.grad_region) == (
        "normalized-sgd", 70.0, "bicubic", True, True, "canvas")
    prompter = build_prompter(cfg, _backbone())
    assert isinstance(prompter, EVPrompter)
    assert (prompter.image_size, prompter.inner_size, prompter.mode, prompter.antialias, prompter.grad_region) == (
        224, 164, "bicubic", True, "canvas")
    assert prompter.diversity == Diversity(p=0.0, flip=True)


def test_recipe_fields_can_be_overridden():
    cfg = TrainConfig(method="evp", mode="bilinear", antialias=False, flip=False, diversity=0.5).resolved()
    prompter = build_prompter(cfg, _backbone(96))
    assert (prompter.mode, prompter.antialias, prompter.diversity) == ("bilinear", False, Diversity(p=0.5))
    assert (prompter.image_size, prompter.pad) == (96, 13)  # 30 / 224 of the canvas
    pad = build_prompter(TrainConfig(method="pad").resolved(), _backbone())
    assert (pad.mode, pad.antialias, pad.diversity) == ("bicubic", True, None)  # Bahng: CLIP's test preprocessing
    patch = build_prompter(TrainConfig(method="patch").resolved(), _backbone(112))
    assert (patch.patch, patch.random, patch.mode) == (15, True, "bicubic")
    with pytest.raises(ValueError, match=r"mode must be one of \(.*'bilinear', 'bicubic'\), got 'nearest'"):
        TrainConfig(mode="nearest").resolved()


def _lrs(cfg: TrainConfig, epochs: int) -> list[float]:
    model = SimpleNamespace(trained=nn.Linear(2, 2))
    optimizer, schedule = build_optimizer(cfg, model, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_pgn_schedule_is_the_released_warmup_then_cosine():
    """jochemloedeman/PGN CosineWithWarmup: lr / W at epochs 0 and 1, e lr / W up to W, then cosine to lr / 100."""
    epochs, lr = 10, 0.1
    cfg = TrainConfig(method="pgn", epochs=epochs).resolved()
    warmup, floor = cfg.warmup_epochs, lr / 100
    assert (cfg.optimizer, cfg.lr, cfg.momentum, warmup, cfg.min_lr_ratio) == ("sgd", 0.1, 0.9, 5, 0.01)
    released = [max(e, 1) * lr / warmup if e < warmup else
                floor + (lr - floor) * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))) / 2
                for e in range(epochs)]
    assert _lrs(cfg, epochs) == pytest.approx(released, rel=1e-9)
    # ProVP and VPT keep their linear warmup (e + 1) lr / (W + 1)
    vpt = TrainConfig(method="vpt", epochs=epochs, model="timm:vit_tiny_patch16_224").resolved()
    assert _lrs(vpt, epochs)[0] == pytest.approx(0.1 / 2)


def test_the_command_line_reads_the_registry_and_leaves_recipe_fields_to_the_recipe(capsys):
    from vpfast import cli, methods

    parser = cli.build_parser()
    assert cli.explicit_flags([]) == {}  # unset: the recipe's
    assert (TrainConfig().mode, TrainConfig().antialias, TrainConfig().flip) == (None, None, None)
    given = cli.explicit_flags(["--no-flip", "--no-antialias", "--mode", "bilinear"])
    assert given == {"flip": False, "antialias": False, "mode": "bilinear"}
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for method in methods.REGISTRY.values():
        assert "".join(f"{method.name} ({method.kind}): {method.summary}".split()) in shown


def test_one_options_object_is_shared_by_the_prompters():
    options = PrompterOptions(mode="bicubic", antialias=True, grad_norm="sample_l2", seed=4, mean=None, std=None)
    made = [EVPrompter(image_size=S, pad=PAD, options=options), PadPrompter(image_size=S, pad=PAD, options=options),
            PatchPrompter(image_size=S, patch=5, options=options)]
    assert all(p.options == options and p.mode == "bicubic" and p.grad_norm == "sample_l2" and p.mean is None
               for p in made)
    assert EVPrompter().options == EVP_OPTIONS and PadPrompter().options == PrompterOptions()
    overridden = EVPrompter(image_size=S, pad=PAD, options=options, mode="bilinear", seed=9)  # keywords win
    assert overridden.options == PrompterOptions(mode="bilinear", antialias=True, grad_norm="sample_l2", seed=9,
                                                 mean=None, std=None)
    with pytest.raises(ValueError, match=r"unknown prompter option\(s\) \['bogus'\]: expected fields of "
                                         r"PrompterOptions \('mean', 'std', 'mode'"):
        EVPrompter(bogus=1)
    with pytest.raises(ValueError, match=r"options must be a vpfast.prompters.PrompterOptions, got \{'mode'"):
        PadPrompter(options={"mode": "bicubic"})
