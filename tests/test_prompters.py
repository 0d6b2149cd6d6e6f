"""EVPrompter, PadPrompter, PatchPrompter and Diversity against the compose reference; state, init, preview, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import vpfast
from compose_cases import reference_args, rel_err
from vpfast.ops.compose import check_transform, compose_reference
from vpfast.prompters import CLIP_MEAN, CLIP_STD, Diversity, EVPrompter, PadPrompter, PatchPrompter

pytestmark = pytest.mark.cpu

S, PAD, B = 32, 4, 3


def _frame(size: int, pad: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[:pad], mask[-pad:], mask[:, :pad], mask[:, -pad:] = 1, 1, 1, 1
    return mask


def _images(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uint8":
        return torch.randint(0, 256, (B, 3, 13, 19), generator=g, dtype=torch.uint8)
    if kind == "float_channels_last":
        return torch.rand(B, 3, 40, 37, generator=g).contiguous(memory_format=torch.channels_last)
    return torch.rand(B, 3, S - 2 * PAD, S - 2 * PAD, generator=g)  # already at EVP's inner size


def _randomize(prompter, seed: int = 1) -> None:
    with torch.no_grad():
        prompter.prompt.normal_(generator=torch.Generator().manual_seed(seed))


def _expected(images, prompt, mask, *, inner: int, space: str, transform=None, mode="bilinear", antialias=False):
    """The compose reference in float64 with CLIP normalization and a black fill."""
    kwargs = dict(inner_size=inner, offset=None, mask=mask, mean=torch.tensor(CLIP_MEAN), std=torch.tensor(CLIP_STD),
                  transform=transform, fill=0.0, mode=mode, antialias=antialias, prompt_space=space)
    return compose_reference(*reference_args(images, prompt.double(), kwargs))


def _twin_rows(prompter, batch: int) -> torch.Tensor:
    """The rows the prompter's next training forward will draw, from a copy of its generator."""
    g = torch.Generator()
    g.set_state(prompter.generator.get_state())
    return prompter.diversity.draw(batch, prompter.image_size, g)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kind", ["uint8", "float_channels_last", "float_inner"])
@pytest.mark.parametrize("mode, antialias", [("bilinear", False), ("bicubic", True)])
def test_evp_forward_matches_reference(kind, mode, antialias):
    prompter = EVPrompter(image_size=S, pad=PAD, mode=mode, antialias=antialias, diversity=None)
    _randomize(prompter)  # the centre too: the mask must hide it
    images = _images(kind)
    out = prompter(images)
    expected = _expected(images, prompter.prompt, _frame(S, PAD), inner=S - 2 * PAD, space="pixel", mode=mode,
                         antialias=antialias)
    assert out.shape == (B, 3, S, S) and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("kind", ["uint8", "float_full"])
def test_pad_forward_matches_reference(kind):
    prompter = PadPrompter(image_size=S, pad=PAD)
    images = _images("uint8") if kind == "uint8" else torch.rand(B, 3, S, S)
    out = prompter(images)
    expected = _expected(images, prompter.prompt, _frame(S, PAD), inner=S, space="normalized")
    assert out.shape == (B, 3, S, S)
    assert rel_err(out, expected) < 1e-5


def _placed(patch: torch.Tensor, row: int, col: int) -> torch.Tensor:
    canvas = torch.zeros(3, S, S, dtype=patch.dtype)
    canvas[:, row:row + patch.shape[-1], col:col + patch.shape[-1]] = patch
    return canvas


@pytest.mark.parametrize("random", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_patch_forward_and_gradient_match_reference(random, training):
    prompter, twin = (PatchPrompter(image_size=S, patch=6, random=random, seed=3) for _ in range(2))
    prompter.train(training)
    row, col = twin.location()  # the location the next forward uses, in training and eval alike
    assert (row, col) == (0, 0) or random
    images = _images("uint8")
    weights = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(2))
    out = prompter(images)
    (out * weights).sum().backward()
    patch64 = prompter.prompt.detach().double().requires_grad_(True)
    expected = _expected(images, _placed(patch64, row, col), None, inner=S, space="normalized")
    (expected * weights.double()).sum().backward()
    assert rel_err(out, expected) < 1e-5
    assert rel_err(prompter.prompt.grad, patch64.grad) < 1e-5


def test_options_reach_compose():
    options = dict(mode="bicubic", antialias=True, grad_region="canvas", grad_norm="sample_l2",
                   out_dtype=torch.bfloat16)
    prompter = EVPrompter(image_size=S, pad=PAD, diversity=None, **options)
    _randomize(prompter)
    images = _images("uint8")
    out = prompter(images)
    out.float().square().sum().backward()
    prompt = prompter.prompt.detach().clone().requires_grad_(True)
    direct = vpfast.ops.compose(images, prompt, inner_size=S - 2 * PAD, mask=_frame(S, PAD),
                                mean=CLIP_MEAN, std=CLIP_STD, **options)
    direct.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.equal(out, direct) and torch.equal(prompter.prompt.grad, prompt.grad)


# --------------------------------------------------------------------------- geometry, init, gradients


def test_defaults_geometry():
    evp = EVPrompter()
    assert evp.inner_size == 164 and evp.num_trainable == 69_840 and int(evp.mask.sum()) == 23_280
    assert torch.equal(evp.mask, _frame(224, 30))
    assert evp.prompt.shape == (3, 224, 224) and evp.prompt.dtype == torch.float32 and not evp.prompt.any()
    assert set(evp.state_dict()) == {"prompt", "_extra_state"}  # mask, mean, std are derived, not saved
    pad = PadPrompter()
    assert pad.inner_size == 224 and pad.num_trainable == 69_840 and torch.equal(pad.mask, _frame(224, 30))
    patch = PatchPrompter(patch=30)
    assert patch.prompt.shape == (3, 30, 30) and patch.num_trainable == 2_700 and patch.update_mask is None


@pytest.mark.parametrize("make", [lambda seed: PadPrompter(image_size=64, pad=8, seed=seed),
                                  lambda seed: PatchPrompter(image_size=64, patch=24, seed=seed)],
                         ids=["pad", "patch"])
def test_normal_init(make):
    prompter = make(0)
    values = prompter.prompt.detach()
    if isinstance(prompter, PadPrompter):
        assert not values[:, 8:-8, 8:-8].any()
        values = values[prompter.mask.expand(3, -1, -1).bool()]
    assert values.numel() == prompter.num_trainable
    assert abs(float(values.mean())) < 0.1 and abs(float(values.std()) - 1) < 0.1
    assert torch.equal(make(0).prompt, prompter.prompt) and not torch.equal(make(1).prompt, prompter.prompt)


@pytest.mark.parametrize("make, space, inner", [
    (lambda region: EVPrompter(image_size=S, pad=PAD, mode="bilinear", antialias=False, diversity=None,
                               grad_region=region), "pixel", S - 2 * PAD),
    (lambda region: PadPrompter(image_size=S, pad=PAD, grad_region=region), "normalized", S),
], ids=["evp", "pad"])
@pytest.mark.parametrize("grad_region", ["prompt", "canvas"])
def test_gradient_region(make, space, inner, grad_region):
    prompter = make(grad_region)
    _randomize(prompter)
    images = _images("uint8")
    weights = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(2))
    (prompter(images) * weights).sum().backward()
    prompt64 = prompter.prompt.detach().double().requires_grad_(True)
    mask = _frame(S, PAD) if grad_region == "prompt" else None  # "canvas": as if the prompt covered the canvas
    (_expected(images, prompt64, mask, inner=inner, space=space) * weights.double()).sum().backward()
    grad = prompter.prompt.grad
    assert rel_err(grad, prompt64.grad) < 1e-5
    assert grad[:, :PAD].ne(0).all()
    assert grad[:, PAD:-PAD, PAD:-PAD].eq(0).all() == (grad_region == "prompt")


# --------------------------------------------------------------------------- diversity


def test_diversity_rows():
    diversity = Diversity(p=0.5, min_size=5, flip=True)
    rows = diversity.draw(400, S, torch.Generator().manual_seed(3))
    assert rows.dtype == torch.int32 and rows.shape == (400, 4)
    assert torch.equal(rows, diversity.draw(400, S, torch.Generator().manual_seed(3)))
    assert not torch.equal(rows, diversity.draw(400, S, torch.Generator().manual_seed(4)))
    check_transform(rows, 400, S)
    identity = (rows[:, :3] == torch.tensor([S, 0, 0], dtype=torch.int32)).all(1)
    moved = rows[~identity]
    assert 0.4 < len(moved) / 400 < 0.6
    assert moved[:, 0].min() == 5 and moved[:, 0].max() == S - 1  # a size-S row can only sit at (0, 0)
    assert set(moved[:, 3].tolist()) == set(rows[identity, 3].tolist()) == {0, 1}  # flips whether moved or not
    assert 0.4 < rows[:, 3].float().mean() < 0.6
    assert (moved[:, 1] + moved[:, 0] == S).any() and (moved[:, 1] == 0).any()  # the whole offset range
    flips = Diversity(p=0.0, flip=True).draw(400, S, torch.Generator())  # EVP's augmentation: flip only
    assert (flips[:, :3] == torch.tensor([S, 0, 0])).all() and set(flips[:, 3].tolist()) == {0, 1}
    assert (Diversity(p=0.0).draw(50, S, torch.Generator()) == torch.tensor([S, 0, 0, 0])).all()
    assert Diversity().size_range(224) == (196, 224) and Diversity(max_size=200).size_range(224) == (175, 200)


def test_diversity_forward_matches_reference_and_eval_draws_nothing():
    prompter = EVPrompter(image_size=S, pad=PAD, diversity=Diversity(p=0.7, flip=True), seed=5)
    _randomize(prompter)
    images = _images("uint8")
    rows = _twin_rows(prompter, B)
    assert not (rows == torch.tensor([S, 0, 0, 0], dtype=torch.int32)).all()
    out = prompter(images)
    expected = _expected(images, prompter.prompt, _frame(S, PAD), inner=S - 2 * PAD, space="pixel", transform=rows,
                         mode="bicubic", antialias=True)
    assert rel_err(out, expected) < 1e-5
    prompter.eval()
    state = prompter.generator.get_state()
    out = prompter(images)
    assert torch.equal(prompter.generator.get_state(), state)
    assert rel_err(out, _expected(images, prompter.prompt, _frame(S, PAD), inner=S - 2 * PAD, space="pixel",
                                  mode="bicubic", antialias=True)) < 1e-5


def test_evp_flip_runs_as_compose_flip_flags_with_the_same_draws(monkeypatch):
    """EVP's default flip (Diversity(p=0, flip=True)) reaches compose as flip flags, not transform rows: the
    plain row-wise path; the draws (and so the output) are those of the transform rows (S, 0, 0, flip)."""
    import vpfast.prompters as prompters_module

    prompter = EVPrompter(image_size=S, pad=PAD, seed=5)
    _randomize(prompter)
    images = _images("uint8")
    rows = _twin_rows(prompter, B)
    assert set(rows[:, 3].tolist()) == {0, 1}
    calls = []
    compose = prompters_module.compose
    monkeypatch.setattr(prompters_module, "compose", lambda *a, **k: calls.append(k) or compose(*a, **k))
    out = prompter(images)
    assert calls[0]["transform"] is None and torch.equal(calls[0]["flip"], rows[:, 3])
    expected = _expected(images, prompter.prompt, _frame(S, PAD), inner=S - 2 * PAD, space="pixel", transform=rows,
                         mode="bicubic", antialias=True)
    assert rel_err(out, expected) < 1e-5
    assert torch.equal(prompter.generator.get_state(), _advanced(rows, seed=5))


def _advanced(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """The generator state after one EVP_FLIP draw of len(rows) rows from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    Diversity(p=0.0, flip=True).draw(len(rows), S, g)
    return g.get_state()


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_state_dict_restores_the_generator(fmt):
    def make(seed):
        return EVPrompter(image_size=S, pad=PAD, diversity=Diversity(p=0.8, flip=True), seed=seed)

    trained = make(seed=1)
    _randomize(trained)
    images = _images("float_inner")
    trained(images)  # advance the generator
    state = trained.state_dict()
    if fmt == "torch":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer)
    else:
        state = load_safetensors(save_safetensors(state))
    resumed = make(seed=2)
    resumed.load_state_dict(state)
    for _ in range(2):  # the same next draws
        assert torch.equal(resumed(images), trained(images))


DRAWING = {
    "evp flip": lambda: EVPrompter(image_size=S, pad=PAD, seed=5),
    "evp diversity": lambda: EVPrompter(image_size=S, pad=PAD, diversity=Diversity(p=0.5, flip=True), seed=5),
    "random patch": lambda: PatchPrompter(image_size=S, patch=6, random=True, seed=5),
}


@pytest.mark.parametrize("make", DRAWING.values(), ids=DRAWING)
def test_draw_step_gives_the_training_forward_the_same_draws(make):
    """draw_step draws what the forward would, in the same order, into buffers that stay put; eval forwards
    still draw their own (the random patch)."""
    drawing, pre_drawn = make(), make()
    images = _images("uint8")
    buffers = None
    for training in (True, True, False, True):
        drawing.train(training), pre_drawn.train(training)
        if training:
            pre_drawn.draw_step(B)
            current = {name: t.data_ptr() for name, t in pre_drawn._drawn[B].items()}
            assert buffers is None or current == buffers  # the same device memory at every step
            buffers = current
        assert torch.equal(pre_drawn(images), drawing(images))
        assert torch.equal(pre_drawn.generator.get_state(), drawing.generator.get_state())
    assert buffers  # something was drawn
    pre_drawn.to("meta").draw_step(B)  # moved to another device: the buffers follow the prompt
    assert {t.device.type for t in pre_drawn._drawn[B].values()} == {"meta"}
    with pytest.raises(RuntimeError, match=r"a training forward of 2 images, but draw_step was called for batch "
                                           r"sizes \[3\] only: call draw_step\(2\)"):
        pre_drawn(images[:2])


def test_random_patch_locations():
    def locations(seed):
        prompter = PatchPrompter(image_size=8, patch=6, random=True, seed=seed)
        return [prompter.location() for _ in range(60)]

    drawn = locations(0)
    assert drawn == locations(0) and drawn != locations(1)
    assert {v for loc in drawn for v in loc} == {0, 1, 2}  # every position inside the 8 x 8 canvas


# --------------------------------------------------------------------------- preview


def test_to_image(tmp_path):
    evp = EVPrompter(image_size=S, pad=PAD)
    with torch.no_grad():
        evp.prompt.fill_(0.5)
        evp.prompt[0, 0, 0], evp.prompt[1, 0, 0] = 3.0, -1.0
    image = evp.to_image()
    assert isinstance(image, Image.Image) and image.size == (S, S) and image.mode == "RGB"
    pixels = np.asarray(image)
    expected = (_frame(S, PAD) * 128).to(torch.uint8)[..., None].expand(S, S, 3).numpy().copy()
    expected[0, 0, :2] = (255, 0)  # clamped
    np.testing.assert_array_equal(pixels, expected)
    path = tmp_path / "prompt.png"
    image.save(path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels)

    pad = PadPrompter(image_size=S, pad=PAD)
    with torch.no_grad():
        pad.prompt.fill_(1.0)
    corner = np.asarray(pad.to_image())[0, 0]  # normalized units: the pixel change is std * prompt
    np.testing.assert_array_equal(corner, np.round(np.array(CLIP_STD) * 255).astype(np.uint8))

    patch = PatchPrompter(image_size=S, patch=6, random=True)
    state = patch.generator.get_state()
    pixels = np.asarray(patch.to_image())  # shown at the top-left corner, without drawing a location
    assert torch.equal(patch.generator.get_state(), state)
    assert pixels[6:].max() == 0 and pixels[:, 6:].max() == 0 and pixels[:6, :6].max() > 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("make, message", [
    (lambda: EVPrompter(image_size=S, pad=16),
     r"pad must be an integer in \[0, 15\] so that the inner square image_size - 2 \* pad is at least 1 "
     r"\(image_size = 32\), got 16"),
    (lambda: EVPrompter(pad=-1), r"pad must be an integer in \[0, 111\].*got -1"),
    (lambda: PadPrompter(pad=2.5), r"pad must be an integer .*got 2.5"),
    (lambda: EVPrompter(image_size=0), r"image_size must be an integer >= 1, got 0"),
    (lambda: PatchPrompter(image_size=S, patch=33), r"patch must be an integer in \[1, 32\] .*got 33"),
    (lambda: EVPrompter(mode="nearest"), r"mode must be one of \('bilinear', 'bicubic'\), got 'nearest'"),
    (lambda: EVPrompter(grad_region="frame"), r"grad_region must be one of .*got 'frame'"),
    (lambda: PadPrompter(grad_norm="l2"), r"grad_norm must be one of .*got 'l2'"),
    (lambda: PatchPrompter(out_dtype=torch.int8), r"out_dtype must be one of .*got torch.int8"),
    (lambda: EVPrompter(mean=(0.5, 0.5)), r"mean must have one value per channel \(3\), got 2 values"),
    (lambda: EVPrompter(std=(1.0, 0.0, 1.0)), r"std must be non-zero"),
    (lambda: EVPrompter(image_size=S, pad=PAD, diversity=Diversity(max_size=40)),
     r"Diversity.max_size must be an integer in \[1, 32\] \(the canvas size S\), got 40"),
    (lambda: EVPrompter(diversity="flip"), r"diversity must be a vpfast.prompters.Diversity or None, got 'flip'"),
    (lambda: Diversity(p=1.5), r"Diversity.p must be a probability in \[0, 1\], got 1.5"),
    (lambda: Diversity(min_size=0), r"Diversity.min_size must be an integer >= 1, got 0"),
    (lambda: Diversity(min_size=30, max_size=20).size_range(S),
     r"Diversity.min_size must be an integer in \[1, 20\] \(up to max_size\), got 30"),
    (lambda: EVPrompter(image_size=S, pad=PAD).set_extra_state("state"),
     r"extra state must be the generator state \(a uint8 tensor\), got str"),
])
def test_errors_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()
