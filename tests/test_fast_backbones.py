"""The fast frozen backbone: bf16 weights cast once, float32 logits, torch.compile without graph breaks.

Per family, bf16 agrees with fp32 eager within stated tolerances (relative L2 error of the logits and
of the input gradient, random weights); compiled (backend "aot_eager" on the CPU) agrees with eager
exactly, across changing batch sizes.
"""

import pytest
import torch
from torch import nn

from vpfast.backbones import FrozenClassifier, ZeroShotHead, cast_frozen, from_open_clip, from_timm, from_torchvision

pytestmark = pytest.mark.cpu

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# family -> (builder, input side, tolerance on logits, tolerance on the input gradient): relative L2 errors
# of bf16 against fp32 eager. Seen here: logits 0.5-1.5 %; input gradients 1-2 % for ViTs, 15 % (ResNet-18)
# and 41 % (EfficientNet-Lite0) for deep CNNs with random weights, the same as bf16 autocast on fp32 weights,
# which the test also checks (at most twice its error): the loss is bf16's, not the cast's.
FAMILIES = {
    "open_clip-vit": (lambda **kw: from_open_clip("ViT-B-32", None, classnames=["a", "b", "c"], model_cfg=TINY_CLIP,
                                                  **kw), 64, 0.03, 0.05),
    "timm-vit": (lambda **kw: from_timm("vit_tiny_patch16_224", num_classes=10, **kw), 224, 0.03, 0.05),
    "timm-efficientnet": (lambda **kw: from_timm("tf_efficientnet_lite0", **kw), 64, 0.05, 0.6),
    "torchvision-resnet": (lambda **kw: from_torchvision("resnet18", **kw), 64, 0.05, 0.25),
}


def _build(family: str, **kwargs) -> FrozenClassifier:
    pytest.importorskip("open_clip" if family.startswith("open_clip") else family.split("-")[0])
    torch.manual_seed(0)
    return FAMILIES[family][0](**kwargs)


def _logits_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.square().sum(), x)
    return logits, grad


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()).norm() / b.float().norm()).detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_weights_match_fp32_within_tolerance(family):
    _, side, logit_tol, grad_tol = FAMILIES[family]
    x = torch.randn(3, 3, side, side)
    reference = _logits_and_grad(_build(family), x)
    fast = _build(family, precision="bf16")
    logits, grad = _logits_and_grad(fast, x)
    assert logits.dtype == torch.float32 and grad.dtype == torch.float32
    assert _relative(logits, reference[0]) < logit_tol
    grad_error = _relative(grad, reference[1])
    assert 0 < grad_error < grad_tol  # > 0: the bf16 path really ran
    autocast_grad = _logits_and_grad(_build(family, autocast_dtype=torch.bfloat16), x)[1]
    assert grad_error <= 2 * _relative(autocast_grad, reference[1]) + 1e-3
    for module in fast.model.modules():
        kept = isinstance(module, ZeroShotHead)
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                assert tensor.dtype == (torch.float32 if kept else torch.bfloat16)
    assert all(not p.requires_grad and p.grad is None for p in fast.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_forward_has_no_graph_break_and_matches_eager(family):
    side = FAMILIES[family][1]
    eager = _build(family)
    compiled = _build(family, compile="aot_eager")
    assert torch._dynamo.explain(eager._logits)(torch.randn(2, 3, side, side)).graph_break_count == 0
    for batch in (3, 2, 5):  # the batch size changes: recompiled, never wrong
        x = torch.randn(batch, 3, side, side)
        for got, want in zip(_logits_and_grad(compiled, x), _logits_and_grad(eager, x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "_logits_fn" not in dict(compiled.named_modules()) and compiled.state_dict().keys() == \
        eager.state_dict().keys()


def test_bf16_open_clip_compiled_runs_under_a_train_mode_parent():
    compiled = _build("open_clip-vit", precision="bf16", compile="aot_eager")
    nn.Sequential(compiled).train()
    logits, grad = _logits_and_grad(compiled, torch.randn(2, 3, 64, 64))
    assert logits.dtype == torch.float32 and not compiled.model.training and grad.abs().sum() > 0


def test_cast_frozen_skips_float32_modules_and_integer_buffers():
    head = ZeroShotHead(torch.randn(3, 4), 100.0)
    model = nn.Sequential(nn.Linear(2, 4), head)
    model[0].register_buffer("count", torch.zeros(2, dtype=torch.long))
    cast_frozen(model, torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].count.dtype == torch.long
    assert head.class_embeddings.dtype == torch.float32


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(precision="fp16"), r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"),
    (dict(compile=1), "compile must be a bool or a torch.compile backend name, got 1"),
    (dict(precision="bf16", autocast_dtype=torch.float16), "precision='bf16' runs under bfloat16 autocast"),
])
def test_bad_precision_or_compile_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrozenClassifier(nn.Linear(2, 2), input_size=(2, 2), mean=(0.5,), std=(0.5,), num_classes=2, **kwargs)


def test_cnns_run_channels_last_and_vits_do_not():
    """CNNs store weights and take input channels-last (oneDNN and cuDNN's fast convolutions), with the same
    logits up to rounding; a ViT (one convolution, its patch embedding) keeps its layout; the flag is checked."""
    import timm

    from vpfast.backbones.frozen import FrozenClassifier, is_convolutional

    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            num_classes=7)
    assert is_convolutional(cnn) and not is_convolutional(vit)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = cnn(x)
    frozen = FrozenClassifier(cnn, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=7)
    assert frozen.channels_last
    assert cnn.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), expected, rtol=1e-4, atol=1e-5)
    assert not FrozenClassifier(vit, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                                num_classes=7).channels_last
    with pytest.raises(ValueError, match="channels_last must be True, False or None"):
        FrozenClassifier(vit, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=7,
                         channels_last="yes")


def _tiny_vit_classifier(compile: bool | str) -> FrozenClassifier:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=10)
    return FrozenClassifier(vit, input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10,
                            compile=compile)


@pytest.mark.parametrize("wrapper", ["PromptedViT", "ProVP", "ProTuning"])
def test_prompting_wrappers_keep_the_backbones_compile(wrapper):
    """A backbone built with ``compile`` stays compiled under each prompting wrapper: the prompts' hooks are traced
    into its graph (one graph per input signature, not one per call) and the outputs and trained gradients equal
    the eager wrapper's (aot_eager runs the traced graph)."""
    from torch._dynamo.utils import counters

    from vpfast.prompt_tokens import PromptedViT
    from vpfast.protuning import ProTuning
    from vpfast.provp import ProVP

    def build(compile):
        model = _tiny_vit_classifier(compile)
        if wrapper == "PromptedViT":
            pv = PromptedViT(model)
            prompts = torch.randn(2, 3, 48, requires_grad=True)
            return (lambda x: pv(x, prompts)), [prompts]
        module = ProVP(model, num_prompts=3) if wrapper == "ProVP" else ProTuning(model, vit_stages=2)
        for param in module.parameters():
            if param.requires_grad:
                nn.init.normal_(param, std=0.1)  # Pro-tuning's zero-initialized scales would hide the blocks
        return module, [p for p in module.parameters() if p.requires_grad]

    torch._dynamo.reset()
    counters.clear()
    (compiled, trained), (eager, eager_trained) = build("aot_eager"), build(False)
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32)
        got, want = compiled(x), eager(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(got.square().sum(), trained),
                        torch.autograd.grad(want.square().sum(), eager_trained), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
