"""PGN as published: ResNet-10 generator, N(0, 0.02^2) token library, softmax mixing through vpfast.ops.token_mix."""

import pytest
import torch
from torch import nn

from vpfast.ops.token_mix import token_mix_reference
from vpfast.pgn import PGN
from vpfast.prompt_tokens import PromptedViT

pytestmark = pytest.mark.cpu

BATCH = 4


def small_pgn(**kwargs) -> PGN:
    torch.manual_seed(0)
    return PGN(**{"num_prompts": 5, "library_size": 12, "dim": 48, "input_size": None, **kwargs})


def tiny_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                                            num_heads=2, num_classes=10)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_the_published_checkpoints():
    """METHODS.md section 4: 1,032,304 = library 196,608 + head 528,384 + trunk 307,312 (M 16, N 256, d 768)."""
    pgn = PGN()
    assert (pgn.num_prompts, pgn.library_size, pgn.dim, pgn.generator, pgn.input_size) == (16, 256, 768,
                                                                                          "resnet10", 224)
    assert (pgn.library.numel(), count(pgn.head), count(pgn.trunk)) == (196_608, 528_384, 307_312)
    assert count(pgn) == 1_032_304


def test_resnet10_layout_and_init():
    pgn = small_pgn()
    convs = [m for m in pgn.trunk.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (3, 16, 3, 2),
        (16, 16, 3, 1), (16, 16, 3, 1),
        (16, 32, 3, 2), (32, 32, 3, 1), (16, 32, 1, 2),
        (32, 64, 3, 2), (64, 64, 3, 1), (32, 64, 1, 2),
        (64, 128, 3, 2), (128, 128, 3, 1), (64, 128, 1, 2),
    ]
    assert [c.bias is not None for c in convs] == [False] * 3 + [False, False, True] * 3  # shortcuts: bias, no BN
    assert any(isinstance(m, nn.MaxPool2d) for m in pgn.trunk)
    big = convs[-2].weight  # Kaiming normal, fan_out = 128 * 9
    assert big.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.02) and abs(big.mean()) < 1e-3
    assert pgn.library.std().item() == pytest.approx(0.02, rel=0.1)
    features = pgn.trunk(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 128) and isinstance(pgn.head, nn.Linear) and pgn.head.out_features == 5 * 12


def test_prompts_are_softmax_mixtures_of_the_library():
    pgn = small_pgn().eval()
    images = torch.randn(BATCH, 3, 32, 32)
    logits = pgn.logits(images)
    assert logits.shape == (BATCH, 5, 12)
    weights = token_mix_reference(logits, torch.eye(12))  # A @ I = the mixing weights themselves
    torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, 5))
    assert (weights > 0).all()
    prompts = pgn(images)
    assert prompts.shape == (BATCH, 5, 48)
    torch.testing.assert_close(prompts, token_mix_reference(logits, pgn.library), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(prompts, torch.softmax(logits, -1) @ pgn.library, atol=1e-6, rtol=1e-5)


def test_token_mix_options_are_passed_through():
    pgn = small_pgn(tau=0.5, gumbel=True, topk=3).eval()
    images = torch.randn(BATCH, 3, 32, 32)
    expected = token_mix_reference(pgn.logits(images), pgn.library, tau=0.5, gumbel=True, seed=7, topk=3)
    torch.testing.assert_close(pgn(images, seed=7), expected, atol=1e-6, rtol=1e-5)
    hard = small_pgn(hard=True).eval()(images)  # straight-through: each prompt is one library token
    distances = torch.cdist(hard.flatten(0, 1), small_pgn().library)
    assert distances.min(dim=-1).values.max() < 1e-6


def test_generator_sees_the_image_resized_like_torchvision():
    tf = pytest.importorskip("torchvision.transforms.functional")
    pgn = small_pgn(input_size=40)
    images = torch.randn(2, 3, 32, 48)
    resized = pgn.resize(images)
    assert resized.shape == (2, 3, 40, 60)
    torch.testing.assert_close(resized, tf.resize(images, 40, antialias=True), atol=1e-5, rtol=1e-5)
    assert pgn.resize(torch.randn(2, 3, 40, 40)).shape == (2, 3, 40, 40)
    assert PGN().resize(images).shape == (2, 3, 224, 336)  # published: 224, a no-op on CLIP's input


def test_resnet18_generator():
    pytest.importorskip("torchvision")
    pgn = small_pgn(generator="resnet18")
    assert count(pgn.trunk) == 11_176_512 and pgn.head.in_features == 512  # ResNet-18 without its fc
    assert pgn(torch.randn(2, 3, 32, 32)).shape == (2, 5, 48)


def test_end_to_end_gradients_reach_the_pgn_and_not_the_backbone():
    pgn, backbone = small_pgn(), PromptedViT(tiny_vit())
    model = nn.ModuleDict({"pgn": pgn, "backbone": backbone}).train()
    images = torch.randn(BATCH, 3, 32, 32)
    loss = nn.functional.cross_entropy(backbone(images, pgn(images)), torch.arange(BATCH))
    loss.backward()
    trainable = dict(pgn.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), [
        name for name, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert pgn.training and not any(m.training for m in backbone.vit.modules())
    assert [p for p in model.parameters() if p.requires_grad] == list(pgn.parameters())


def test_prompt_width_must_match_the_backbone():
    pgn, backbone = small_pgn(dim=32), PromptedViT(tiny_vit())
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"d = 48 \(the model's token width\).*\(2, 5, 32\)"):
        backbone(images, pgn(images))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"generator": "resnet50"}, "generator must be one of"), ({"num_prompts": 0}, "num_prompts"),
     ({"library_size": 2.5}, "library_size"), ({"input_size": 0}, "input_size"),
     ({"activation": "relu"}, "activation")],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_pgn(**kwargs)(torch.randn(2, 3, 32, 32))


def test_images_must_be_rgb_batches():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got shape \(3, 32, 32\)"):
        small_pgn()(torch.randn(3, 32, 32))


@pytest.mark.parametrize("input_size", [None, 16])
def test_compiles_without_graph_breaks_under_dynamic_shapes(input_size):
    pgn = small_pgn(input_size=input_size, gumbel=True, tau=0.5)
    compiled = torch.compile(pgn, fullgraph=True, dynamic=True, backend="aot_eager")  # the capture, no codegen
    for batch, height, width in ((2, 32, 32), (3, 24, 40)):
        images = torch.randn(batch, 3, height, width)
        torch.testing.assert_close(compiled(images, seed=3), pgn(images, seed=3), atol=1e-5, rtol=1e-5)
