"""Prompt inversion: prompt tokens -> pixel patches through the pseudo-inverse of the patch embedding."""

import pytest
import torch
from torch import nn

from vpfast.inversion import default_positions, inversion_gap, invert_prompts, paste_patches, run_inverted
from vpfast.prompt_tokens import PromptedViT

pytestmark = pytest.mark.cpu

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

BATCH, NUM_PROMPTS = 16, 4


def clip_visual(patch_size: int) -> nn.Module:
    """A tiny open_clip tower, width 64: invertible for patch 8 (3 * 8^2 = 192 >= 64), not for patch 4 (48 < 64)."""
    torch.manual_seed(0)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": patch_size},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    return open_clip.create_model("ViT-B-32", pretrained=None, **cfg).visual


def timm_vit() -> nn.Module:
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=10)


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initializes it: constant logits
    return model


INVERTIBLE = {"open_clip": lambda: clip_visual(8), "timm": timm_vit, "torchvision": torchvision_vit}


def tokens_entering(wrapper: PromptedViT, images: torch.Tensor) -> torch.Tensor:
    """The patch tokens the model computes for ``images`` (after the positional embedding, before the pre-norm)."""
    vit = wrapper.vit
    module = {"open_clip": lambda: vit.ln_pre, "timm": lambda: vit.norm_pre,
              "torchvision": lambda: vit.encoder.dropout}[wrapper.family]()
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        wrapper(images)
    finally:
        handle.remove()
    return seen[0][:, -wrapper.grid_size[0] * wrapper.grid_size[1]:]


@pytest.mark.parametrize("family", sorted(INVERTIBLE))
def test_invertible_embedding_reproduces_the_prompt_tokens(family):
    """d <= 3 p^2: the model's own embedding of the pasted patches gives back the prompts (bias included)."""
    wrapper = PromptedViT(INVERTIBLE[family]())
    prompts = torch.randn(BATCH, NUM_PROMPTS, wrapper.dim)
    inverted = invert_prompts(wrapper, prompts)
    assert inverted.exact and inverted.patches.shape == (BATCH, NUM_PROMPTS, 3, 8, 8)
    assert inverted.residual.shape == (BATCH, NUM_PROMPTS) and inverted.residual.max() < 1e-12
    images = torch.randn(BATCH, 3, 32, 32)
    tokens = tokens_entering(wrapper, paste_patches(images, inverted))
    torch.testing.assert_close(tokens[:, inverted.positions], prompts, atol=1e-5, rtol=1e-5)
    kept = [k for k in range(16) if k not in inverted.positions.tolist()]
    torch.testing.assert_close(tokens[:, kept], tokens_entering(wrapper, images)[:, kept])


def test_pixel_run_is_the_latent_run_without_the_covered_patches():
    """The only gap of an exact inversion: the M image patches the prompts replace (tokens are order-free)."""
    wrapper = PromptedViT(torchvision_vit())
    images, prompts = torch.randn(BATCH, 3, 32, 32), torch.randn(NUM_PROMPTS, wrapper.dim)
    positions = [0, 5, 10, 15]
    kept = [k for k in range(16) if k not in positions]

    def drop_covered_then_append(module, args):
        tokens = args[0]
        prefix, patches = tokens[:, :1], tokens[:, 1:]
        return (torch.cat([prefix, patches[:, kept], prompts.expand(len(tokens), -1, -1)], dim=1),)

    handle = wrapper.vit.encoder.dropout.register_forward_pre_hook(drop_covered_then_append)
    try:
        latent_without_covered = wrapper(images)
    finally:
        handle.remove()
    pixel = run_inverted(wrapper, images, prompts, positions)
    torch.testing.assert_close(pixel, latent_without_covered, atol=1e-5, rtol=1e-5)


def test_least_squares_embedding_reports_its_residual():
    """d > 3 p^2 (64 > 48, like ViT-L/14's 1024 > 588): the re-embedded tokens miss by the reported residual."""
    wrapper = PromptedViT(clip_visual(4))
    prompts = torch.randn(BATCH, NUM_PROMPTS, 64)
    inverted = invert_prompts(wrapper, prompts)
    assert not inverted.exact
    images = torch.randn(BATCH, 3, 32, 32)
    tokens = tokens_entering(wrapper, paste_patches(images, inverted))[:, inverted.positions]
    measured = (tokens - prompts).norm(dim=-1) / prompts.norm(dim=-1)
    torch.testing.assert_close(measured, inverted.residual, atol=1e-5, rtol=1e-4)
    # a random token keeps about sqrt((d - 3 p^2) / d) = 0.5 of its norm outside the embedding's range
    assert 0.3 < inverted.residual.mean() < 0.7


@pytest.mark.parametrize(
    ("name", "build", "exact"),
    [("open_clip p8", lambda: clip_visual(8), True), ("open_clip p4", lambda: clip_visual(4), False),
     ("timm", timm_vit, True), ("torchvision", torchvision_vit, True)],
)
def test_gap_between_latent_and_pixel_prompts(name, build, exact):
    """Report the gap on random data; latent and pixel prompts agree within bounds seen on these tiny models."""
    wrapper = PromptedViT(build())
    torch.manual_seed(1)
    images, prompts = torch.randn(64, 3, 32, 32), torch.randn(64, NUM_PROMPTS, wrapper.dim)
    gap = inversion_gap(wrapper, images, prompts)
    print(f"{name}: {gap}")
    assert (gap.mean_residual < 1e-12) == exact
    assert gap.top1_agreement >= 0.5 and gap.mean_abs_logit_diff < 1.0


def test_static_prompts_give_one_set_of_patches_for_every_image():
    wrapper = PromptedViT(timm_vit())
    prompts = torch.randn(NUM_PROMPTS, 48)
    inverted = invert_prompts(wrapper, prompts, positions=[3, 2, 1, 0])
    assert inverted.patches.shape == (NUM_PROMPTS, 3, 8, 8)
    images = torch.randn(2, 3, 32, 32)
    pasted = paste_patches(images, inverted)
    torch.testing.assert_close(pasted[:, :, :8, 24:32], inverted.patches[0].expand(2, -1, -1, -1))  # position 3
    torch.testing.assert_close(pasted[:, :, 8:], images[:, :, 8:])  # rows 1-3 untouched


def test_patches_stay_differentiable_in_the_prompts():
    wrapper = PromptedViT(timm_vit())
    prompts = torch.randn(NUM_PROMPTS, 48, requires_grad=True)
    run_inverted(wrapper, torch.randn(2, 3, 32, 32), prompts).sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0


def test_default_positions_are_the_last_in_raster_order():
    assert default_positions(3, (4, 4)).tolist() == [13, 14, 15]
    with pytest.raises(ValueError, match=r"\[1, 15\].*got 16"):
        default_positions(16, (4, 4))


@pytest.mark.parametrize(("positions", "match"), [([0, 0, 1, 2], "distinct"), ([0, 1, 2], "4 distinct"),
                                                  ([0, 1, 2, 16], r"\[0, 15\]")])
def test_bad_positions_are_refused(positions, match):
    with pytest.raises(ValueError, match=match):
        invert_prompts(PromptedViT(timm_vit()), torch.randn(NUM_PROMPTS, 48), positions)


def test_wrong_token_width_and_image_size_are_refused():
    wrapper = PromptedViT(timm_vit())
    with pytest.raises(ValueError, match="d = 48"):
        invert_prompts(wrapper, torch.randn(NUM_PROMPTS, 64))
    inverted = invert_prompts(wrapper, torch.randn(NUM_PROMPTS, 48))
    with pytest.raises(ValueError, match=r"multiples of the patch size \(8, 8\)"):
        paste_patches(torch.randn(2, 3, 30, 32), inverted)


def test_a_nonlinear_patch_embedding_is_refused():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2,
                            embed_norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match="not linear"):
        invert_prompts(PromptedViT(vit), torch.randn(NUM_PROMPTS, 48))
