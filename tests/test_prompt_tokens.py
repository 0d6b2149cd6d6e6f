"""PromptedViT: prompt tokens after the positional embedding and before the pre-norm of open_clip, timm and
torchvision ViTs, checked against forwards re-implemented here from the models' public attributes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpfast.backbones import FrozenClassifier, from_open_clip
from vpfast.prompt_tokens import PromptedViT, token_width

pytestmark = pytest.mark.cpu

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

BATCH, NUM_PROMPTS = 3, 5
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSNAMES = ["cat", "dog", "ship"]


def clip_visual(**vision_cfg) -> nn.Module:
    torch.manual_seed(0)
    cfg = {**CLIP_CFG, "vision_cfg": {**CLIP_CFG["vision_cfg"], **vision_cfg}}
    return open_clip.create_model("ViT-B-32", pretrained=None, **cfg).visual.eval()


def timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=10,
                             **kwargs).eval()


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initializes it: constant logits
    return model.eval()


def tiny_clip_classifier(**kwargs) -> FrozenClassifier:
    torch.manual_seed(0)
    return from_open_clip("ViT-B-32", None, classnames=CLASSNAMES, model_cfg=CLIP_CFG, **kwargs)


# ---- forwards written out from the public attributes (docs/backbones.md) ------------------------------


def reference_open_clip(visual: nn.Module, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(torch.cat([x, prompts], dim=1))  # the prompts are ln_pre'd, without a position
    x = visual.transformer(x)[:, : -prompts.shape[1]]
    x = visual.ln_post(x)
    pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
    return pooled @ visual.proj


def reference_timm(vit: nn.Module, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    x = vit.patch_embed(images)
    x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + vit.pos_embed
    x = vit.blocks(vit.norm_pre(torch.cat([x, prompts], dim=1)))
    return vit.forward_head(vit.norm(x[:, : -prompts.shape[1]]))


def reference_torchvision(vit: nn.Module, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    x = vit.conv_proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([vit.class_token.expand(len(x), -1, -1), x], dim=1) + vit.encoder.pos_embedding
    x = vit.encoder.layers(vit.encoder.dropout(torch.cat([x, prompts], dim=1)))
    return vit.heads(vit.encoder.ln(x[:, : -prompts.shape[1]])[:, 0])


FAMILIES = {
    "open_clip": (clip_visual, reference_open_clip),
    "open_clip_avg": (lambda: clip_visual(pool_type="avg"), reference_open_clip),
    "timm": (timm_vit, reference_timm),
    "timm_avg": (lambda: timm_vit(global_pool="avg"), reference_timm),
    "torchvision": (torchvision_vit, reference_torchvision),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    build, reference = FAMILIES[request.param]
    return build(), reference


def test_no_prompts_run_the_frozen_forward_exactly(family):
    vit, _ = family
    images = torch.randn(BATCH, 3, 32, 32)
    wrapper = PromptedViT(vit)
    expected = vit(images)  # frozen: without parameter gradients attention may take a different (fast) path
    assert torch.equal(wrapper(images), expected)
    assert torch.equal(wrapper(images, torch.randn(0, wrapper.dim)), expected)
    assert torch.equal(wrapper(images, torch.randn(BATCH, 0, wrapper.dim)), expected)


def test_prompts_enter_after_the_positional_embedding_and_leave_before_pooling(family):
    vit, reference = family
    images = torch.randn(BATCH, 3, 32, 32)
    wrapper = PromptedViT(vit)
    prompts = torch.randn(BATCH, NUM_PROMPTS, wrapper.dim)
    out = wrapper(images, prompts)
    torch.testing.assert_close(out, reference(vit, images, prompts), atol=1e-5, rtol=1e-5)
    assert (out - vit(images)).abs().max() > 1e-3  # the prompts change the output
    assert torch.equal(vit(images), wrapper(images))  # and leave nothing behind


def test_pooling_never_sees_the_prompts():
    """avg pooling over prompts as well would differ: the prompts are stripped first."""
    vit = timm_vit(global_pool="avg")
    images, prompts = torch.randn(BATCH, 3, 32, 32), torch.randn(BATCH, NUM_PROMPTS, 48)
    x = torch.cat([vit.cls_token.expand(BATCH, -1, -1), vit.patch_embed(images)], dim=1) + vit.pos_embed
    unstripped = vit.forward_head(vit.norm(vit.blocks(torch.cat([x, prompts], dim=1))))
    assert (PromptedViT(vit)(images, prompts) - unstripped).abs().max() > 1e-4


def test_static_prompts_broadcast_over_the_batch(family):
    vit, _ = family
    wrapper = PromptedViT(vit)
    images, prompts = torch.randn(BATCH, 3, 32, 32), torch.randn(NUM_PROMPTS, wrapper.dim)
    torch.testing.assert_close(wrapper(images, prompts), wrapper(images, prompts.expand(BATCH, -1, -1)))


def test_gradients_reach_the_prompts_only_and_the_model_stays_in_eval(family):
    vit, _ = family
    wrapper = nn.Sequential(PromptedViT(vit)).train()[0]
    images = torch.randn(BATCH, 3, 32, 32)
    prompts = torch.randn(BATCH, NUM_PROMPTS, wrapper.dim, requires_grad=True)
    wrapper(images, prompts).square().sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0 and torch.isfinite(prompts.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in vit.parameters())
    assert not any(module.training for module in vit.modules())


def test_clip_classifier_gives_zero_shot_logits_of_prompted_features():
    classifier = tiny_clip_classifier()
    wrapper = PromptedViT(classifier)
    assert wrapper.vit is classifier.model.visual and wrapper.family == "open_clip"
    images, prompts = torch.randn(BATCH, 3, 32, 32), torch.randn(NUM_PROMPTS, 64)
    features = reference_open_clip(classifier.model.visual, images, prompts.expand(BATCH, -1, -1))
    torch.testing.assert_close(wrapper(images, prompts), classifier.model.head(features), atol=1e-4, rtol=1e-5)
    assert torch.equal(wrapper(images), classifier(images))
    bf16 = PromptedViT(tiny_clip_classifier(autocast_dtype=torch.bfloat16))(images, prompts)  # prompts cast
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, wrapper(images, prompts), atol=1.0, rtol=0.05)


def _batch_first_false(visual: nn.Module) -> nn.Module:
    """The same tower run (tokens, batch, width) inside its Transformer, as open_clip builds batch_first=False."""
    visual.transformer.batch_first = False
    for block in visual.transformer.resblocks:
        block.attn.batch_first = False
    return visual


def test_open_clip_batch_first_false():
    nld, lnd = clip_visual(), _batch_first_false(clip_visual())
    seen = []
    lnd.transformer.resblocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    images, prompts = torch.randn(BATCH, 3, 32, 32), torch.randn(BATCH, NUM_PROMPTS, 64)
    wrapper = PromptedViT(lnd)
    assert torch.equal(wrapper(images), lnd(images))
    out = wrapper(images, prompts)
    assert seen[-1] == (1 + 4 + NUM_PROMPTS, BATCH, 64)  # the blocks did run tokens-first, prompts included
    torch.testing.assert_close(out, PromptedViT(nld)(images, prompts), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, reference_open_clip(nld, images, prompts), atol=1e-5, rtol=1e-5)


def test_the_model_is_unchanged_after_a_failed_call_and_after_remove_hooks():
    vit = torchvision_vit()
    images = torch.randn(BATCH, 3, 32, 32)
    wrapper = PromptedViT(vit)
    frozen = vit(images)
    with pytest.raises(Exception, match="Wrong image height"):
        wrapper(torch.randn(BATCH, 3, 40, 40), torch.randn(NUM_PROMPTS, 48))
    assert wrapper._prompts is None and torch.equal(vit(images), frozen)
    wrapper.remove_hooks()
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in vit.modules())
    with pytest.raises(RuntimeError, match=r"hooks were removed \(remove_hooks\)"):
        wrapper(images, torch.randn(NUM_PROMPTS, 48))


def test_token_width_reads_the_vit_without_hooking_it():
    vit = timm_vit()
    assert token_width(vit) == 48 and token_width(FrozenClassifier(
        vit, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)) == 48
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in vit.modules())
    with pytest.raises(TypeError, match="PromptedViT supports"):
        token_width(nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["open_clip", "timm", "torchvision"])
def test_compiled_prompted_forward_is_one_graph_and_matches_eager(family):
    """fullgraph=True: no graph break; aot_eager runs the traced graph, so values and prompt gradients match the
    eager forward (to float32 rounding of a re-ordered graph); batch sizes change without breaking."""
    vit = {"open_clip": clip_visual, "timm": timm_vit, "torchvision": torchvision_vit}[family]()
    wrapper = PromptedViT(vit)
    compiled = torch.compile(wrapper, fullgraph=True, backend="aot_eager")
    for batch in (2, 3):
        images = torch.randn(batch, 3, 32, 32)
        prompts = torch.randn(batch, NUM_PROMPTS, wrapper.dim, requires_grad=True)
        got, want = compiled(images, prompts), wrapper(images, prompts)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.equal(want, vit(images))  # the prompts did enter
        (got_grad,), (want_grad,) = (torch.autograd.grad(out.square().sum(), prompts) for out in (got, want))
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(images), vit(images), atol=1e-5, rtol=1e-5)


def test_geometry():
    wrapper = PromptedViT(timm_vit())
    assert (wrapper.family, wrapper.dim, wrapper.patch_size, wrapper.grid_size) == ("timm", 48, (8, 8), (4, 4))
    assert wrapper.patch_positional_embedding().shape == (16, 48)
    clip = PromptedViT(clip_visual())
    assert (clip.dim, clip.patch_size, clip.grid_size) == (64, (16, 16), (2, 2))
    torch.testing.assert_close(clip.patch_positional_embedding(), clip.vit.positional_embedding[1:])


@pytest.mark.parametrize(
    ("shape", "match"),
    [((NUM_PROMPTS, 47), "d = 48"), ((NUM_PROMPTS,), "d = 48"), ((1, 2, NUM_PROMPTS, 48), "d = 48"),
     ((BATCH + 1, NUM_PROMPTS, 48), "one row per image: batch 3")],
)
def test_prompt_shape_errors_name_what_was_expected(shape, match):
    with pytest.raises(ValueError, match=match):
        PromptedViT(timm_vit())(torch.randn(BATCH, 3, 32, 32), torch.randn(shape))


def test_integer_prompts_are_refused():
    with pytest.raises(ValueError, match="floating point"):
        PromptedViT(timm_vit())(torch.randn(BATCH, 3, 32, 32), torch.zeros(NUM_PROMPTS, 48, dtype=torch.long))


@pytest.mark.parametrize("model", [nn.Linear(3, 3), torchvision.models.resnet18(weights=None)])
def test_unsupported_models_are_refused_naming_the_supported_ones(model):
    with pytest.raises(TypeError, match="open_clip.transformer.VisionTransformer, timm.*torchvision"):
        PromptedViT(model)


def test_frozen_classifier_around_a_timm_vit():
    vit = timm_vit()
    classifier = FrozenClassifier(vit, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    images, prompts = torch.randn(BATCH, 3, 32, 32), torch.randn(NUM_PROMPTS, 48)
    torch.testing.assert_close(PromptedViT(classifier)(images, prompts), PromptedViT(vit)(images, prompts))
    assert F.softmax(PromptedViT(classifier)(images, prompts), dim=-1).shape == (BATCH, 10)


def test_open_clip_before_2_26_is_refused(monkeypatch):
    """Those versions transpose to (tokens, batch, width) outside the Transformer, where the hooks act."""
    monkeypatch.setattr(open_clip, "__version__", "2.24.0")
    with pytest.raises(RuntimeError, match=r"open_clip >= 2.26.*found 2.24.0"):
        PromptedViT(clip_visual())
