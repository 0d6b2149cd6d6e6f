"""ProVP-Ref and VPT: deep prompts against a written-out forward, exactness, gradients, checkpointing, the loss."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpfast.backbones import from_open_clip
from vpfast.provp import ProVP, ProVPClassifier, reformation_loss

pytestmark = pytest.mark.cpu

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
BATCH, M = 3, 4


def clip_visual() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None, **CLIP_CFG).visual.eval().requires_grad_(False)


def timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=2, num_classes=10,
                             **kwargs).eval().requires_grad_(False)


VITS = {"open_clip": clip_visual, "timm": timm_vit, "timm-registers-avg": lambda: timm_vit(reg_tokens=2,
                                                                                           global_pool="avg")}


@pytest.fixture(params=sorted(VITS))
def family(request) -> str:
    return request.param


@pytest.fixture
def vit(family) -> nn.Module:
    return VITS[family]()


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32)


# ---- ProVP written out from the public attributes, one block at a time (docs/methods.md, VPT and ProVP-Ref) ------


def reference(vit: nn.Module, x: torch.Tensor, prompts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Insert P_0 after the prefix tokens after the pre-norm, blend (or replace) before each later block."""
    if hasattr(vit, "conv1"):
        tokens = vit.conv1(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.class_embedding.expand(x.shape[0], 1, -1), tokens], 1) + vit.positional_embedding
        tokens, blocks, start = vit.ln_pre(tokens), vit.transformer.resblocks, 1
    else:
        tokens, blocks, start = vit.norm_pre(vit._pos_embed(vit.patch_embed(x))), vit.blocks, vit.num_prefix_tokens
    count = prompts.shape[1]
    tokens = torch.cat([tokens[:, :start], prompts[0].expand(x.shape[0], -1, -1), tokens[:, start:]], 1)
    for layer, block in enumerate(blocks):
        if 0 < layer < prompts.shape[0]:
            slots = prompts[layer].expand(x.shape[0], -1, -1)
            if alpha:
                slots = alpha * tokens[:, start:start + count] + (1 - alpha) * slots
            tokens = torch.cat([tokens[:, :start], slots, tokens[:, start + count:]], 1)
        tokens = block(tokens)
    tokens = torch.cat([tokens[:, :start], tokens[:, start + count:]], 1)
    if hasattr(vit, "conv1"):
        return vit.ln_post(tokens[:, 0]) @ vit.proj
    return vit.forward_head(vit.norm(tokens))


@pytest.mark.parametrize("alpha,deep", [(0.0, True), (0.01, True), (0.4, True), (0.0, False)])
def test_matches_the_written_out_forward(family, alpha, deep):
    provp = ProVP(VITS[family](), num_prompts=M, alpha=alpha, deep=deep)
    x = images()
    # the same weights, built again: the ProVP's blend hooks stay on its own model's blocks
    expected = reference(VITS[family](), x, provp.prompts.detach(), alpha)
    torch.testing.assert_close(provp(x), expected, atol=1e-5, rtol=1e-5)
    assert provp.prompts.shape == ((3 if deep else 1), M, provp.dim)


def test_vpt_deep_replaces_the_slots_exactly():
    """alpha = 0 (VPT-deep) equals a re-implementation that overwrites the slots, bit for bit."""
    provp, x = ProVP(clip_visual(), num_prompts=M, alpha=0.0), images()
    assert torch.equal(provp(x), reference(clip_visual(), x, provp.prompts.detach(), alpha=0.0))


def test_no_prompts_and_disabled_prompts_run_the_frozen_model_exactly(vit):
    x = images()
    frozen = vit(x)
    assert torch.equal(ProVP(vit, num_prompts=0)(x), frozen)
    provp = ProVP(vit, num_prompts=M)
    prompted = provp(x)
    assert not torch.allclose(prompted, frozen)
    with provp.disabled():
        assert torch.equal(provp(x), frozen)
    assert torch.equal(vit(x), frozen)  # the model called on its own: its blend hooks stay inert
    assert torch.equal(provp(x), prompted)


def test_clip_scores_prompted_features_against_the_cached_text_head():
    torch.manual_seed(0)
    clip = from_open_clip("ViT-B-32", None, classnames=["cat", "dog", "ship"], model_cfg=CLIP_CFG)
    provp, x = ProVP(clip, num_prompts=M), images()
    features = provp.features(x)
    head = clip.model.head
    expected = 100.0 * F.normalize(features, dim=-1) @ head.class_embeddings.t()
    torch.testing.assert_close(provp(x), expected)
    assert provp.classifier is head and head.logit_scale == 100.0
    assert torch.equal(ProVP(clip, num_prompts=0)(x), clip(x))


def test_gradients_reach_the_prompts_only_and_the_model_stays_in_eval(vit):
    provp = ProVP(vit, num_prompts=M, alpha=0.01).train()
    assert not vit.training and all(not m.training for m in vit.modules())
    provp(images()).square().sum().backward()
    assert all(p.grad is None for p in vit.parameters())
    assert provp.prompts.grad.abs().sum(dim=(1, 2)).min() > 0  # every layer's prompts get a gradient
    assert [name for name, p in provp.named_parameters() if p.requires_grad] == ["prompts"]
    assert provp.prompts.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients(vit):
    provp, x = ProVP(vit, num_prompts=M, alpha=0.3), images()
    provp(x).square().sum().backward()
    plain, provp.prompts.grad = provp.prompts.grad, None
    vit.set_grad_checkpointing(True)
    provp(x).square().sum().backward()
    assert plain.abs().min() > 0 or plain.abs().max() > 0
    torch.testing.assert_close(provp.prompts.grad, plain, atol=1e-6, rtol=1e-5)


def test_open_clip_tokens_first_inside_the_transformer():
    """batch_first=False (tokens, batch, width) blocks: the blend acts on dimension 0 and gives the same result."""
    nld, lnd = clip_visual(), clip_visual()
    lnd.transformer.batch_first = False
    for block in lnd.transformer.resblocks:
        block.attn.batch_first = False
    a, b = ProVP(nld, num_prompts=M, alpha=0.2), ProVP(lnd, num_prompts=M, alpha=0.2)
    b.prompts.data.copy_(a.prompts.data)
    x = images()
    torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)


def test_init_bound_uses_the_real_patch_size():
    provp = ProVP(timm_vit(), num_prompts=64)
    bound = (6 / (3 * 8 * 8 + 48)) ** 0.5
    assert provp.prompts.abs().max() <= bound and provp.prompts.abs().max() > 0.9 * bound


def test_state_dict_holds_the_prompts_only_and_loads_back():
    vit = clip_visual()
    provp = ProVP(vit, num_prompts=M)
    state = provp.state_dict()
    assert list(state) == ["prompts"]
    other = ProVP(clip_visual(), num_prompts=M)
    other.load_state_dict(state)
    x = images()
    assert torch.equal(other(x), provp(x))


def test_remove_hooks_leaves_no_hook():
    vit = clip_visual()
    provp = ProVP(vit, num_prompts=M)
    assert any(block._forward_pre_hooks for block in vit.transformer.resblocks)
    provp.remove_hooks()
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in vit.modules())
    with pytest.raises(RuntimeError, match=r"hooks were removed \(remove_hooks\)"):
        provp(images())
    with provp.disabled():
        assert torch.equal(provp(images().zero_()), vit(torch.zeros(BATCH, 3, 32, 32)))


# ---- the re-formation loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.07])
def test_reformation_loss_against_float64(temperature):
    prompted, frozen = torch.randn(6, 7), torch.randn(6, 7)
    p, f = prompted.double(), frozen.double()
    cos = (p / p.norm(dim=1, keepdim=True)) @ (f / f.norm(dim=1, keepdim=True)).t() / temperature
    expected = (torch.logsumexp(cos, dim=1) - cos.diagonal()).mean()
    loss = reformation_loss(prompted, frozen, temperature)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)


def test_adapter_adds_the_weighted_loss_against_the_frozen_features_of_the_same_images():
    vit = clip_visual()
    adapter = ProVPClassifier(ProVP(vit, num_prompts=M), ref_weight=0.5, ref_temperature=0.5).train()
    x = images()
    logits = adapter(x)
    expected = 0.5 * reformation_loss(adapter.provp.features(x), vit(x), 0.5)
    torch.testing.assert_close(adapter.auxiliary_loss(), expected)
    torch.testing.assert_close(logits, adapter.provp(x))
    adapter.auxiliary_loss().backward()
    assert adapter.provp.prompts.grad.abs().max() > 0 and all(p.grad is None for p in vit.parameters())
    adapter.eval()
    adapter(x)
    assert adapter.auxiliary_loss() is None  # evaluation computes no frozen pass


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_prompts=-1), "num_prompts must be an integer >= 0, got -1"),
    (dict(num_prompts=2.0), "num_prompts must be an integer >= 0, got 2.0"),
    (dict(alpha=1.5), r"alpha must be a number in \[0, 1\] .*got 1.5"),
    (dict(deep="yes"), "deep must be True or False, got 'yes'"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProVP(clip_visual(), **kwargs)


def test_unsupported_models_are_refused():
    import torchvision

    with pytest.raises(TypeError, match="ProVP supports open_clip.*got torchvision.models.resnet.ResNet"):
        ProVP(torchvision.models.resnet18())


def test_loss_arguments_are_checked():
    with pytest.raises(ValueError, match=re.escape("must both be (B, D) of the same shape, got (3, 4) and (3, 5)")):
        reformation_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        reformation_loss(torch.randn(3, 4), torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="ref_weight must be >= 0, got -1"):
        ProVPClassifier(ProVP(clip_visual(), num_prompts=1), ref_weight=-1)


@pytest.mark.parametrize("family", ["open_clip", "timm"])
def test_compiled_classifier_is_one_graph_and_matches_eager(family):
    """fullgraph=True over the prompted forward, the frozen (prompts disabled, no_grad) forward and the
    re-formation loss: no graph break; aot_eager runs the traced graph, so the logits, the loss kept on the module
    and the prompt gradient match eager to float32 rounding."""
    classifier = ProVPClassifier(ProVP(VITS[family](), num_prompts=M)).train()
    compiled = torch.compile(classifier, fullgraph=True, backend="aot_eager")
    x = images()
    results = []
    for model in (compiled, classifier):
        logits = model(x)
        loss = logits.square().sum() + classifier.auxiliary_loss()
        results.append((logits, classifier.auxiliary_loss(), *torch.autograd.grad(loss, classifier.provp.prompts)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert results[1][1] > 0 and results[1][2].abs().sum() > 0
