"""PGN as published: ResNet-10 generator, N(0, 0.02^2) token library, softmax mixing through vpfast.ops.token_mix."""

from collections import OrderedDict
from pathlib import Path

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
    """docs/methods.md, PGN: 1,032,304 = library 196,608 + head 528,384 + trunk 307,312 (M 16, N 256, d 768)."""
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


def test_generator_sees_the_image_resized_like_the_released_code():
    """Released: torchvision 0.13's ``resize(images, 224)`` on tensors, bilinear without antialiasing."""
    tf = pytest.importorskip("torchvision.transforms.functional")
    pgn = small_pgn(input_size=40)
    for shape, resized_shape in (((2, 3, 32, 48), (2, 3, 40, 60)), ((2, 3, 90, 60), (2, 3, 60, 40))):
        images = torch.randn(*shape)
        resized = pgn.resize(images)
        assert resized.shape == resized_shape
        torch.testing.assert_close(resized, tf.resize(images, 40, antialias=False), atol=1e-5, rtol=1e-5)
    assert (resized - tf.resize(images, 40, antialias=True)).abs().max() > 1e-2  # shrinking: antialiasing shows
    assert pgn.resize(torch.randn(2, 3, 40, 40)).shape == (2, 3, 40, 40)
    assert PGN().resize(torch.randn(2, 3, 32, 48)).shape == (2, 3, 224, 336)  # published: 224, a no-op on CLIP's


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


# --------------------------------------------------------------------------- released checkpoints

RELEASED_VARIANTS = {"clip": (256, 768), "dino": (128, 384), "vit": (128, 768)}  # library size N, token width d


def released_state_dict(library_size: int, dim: int, num_prompts: int = 16, seed: int = 0) -> dict:
    """A state dict in the format of jochemloedeman/PGN's ``pretrained_pgns/*.pt`` (their ``TLPGN``), random values.

    Key names and shapes as released: ``tl_vectors`` (N, d); ``model.input_net`` = conv 3x3/2 (no bias), BN;
    ``model.blocks.i.net`` = conv, BN, ReLU, conv, BN; ``model.blocks.i.downsample`` (groups 1-3, with bias);
    ``model.output_net.2`` = Linear(128, M N).
    """
    g = torch.Generator().manual_seed(seed)
    state = {"tl_vectors": torch.randn(library_size, dim, generator=g) * 0.02}

    def conv(prefix, c_out, c_in, k, bias=False):
        state[prefix + ".weight"] = torch.randn(c_out, c_in, k, k, generator=g) * (2 / (c_out * k * k)) ** 0.5
        if bias:
            state[prefix + ".bias"] = torch.randn(c_out, generator=g) * 0.1

    def bn(prefix, c):
        state[prefix + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[prefix + ".bias"] = 0.1 * torch.randn(c, generator=g)
        state[prefix + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[prefix + ".running_var"] = 0.5 + torch.rand(c, generator=g)
        state[prefix + ".num_batches_tracked"] = torch.tensor(1000)

    conv("model.input_net.0", 16, 3, 3)
    bn("model.input_net.1", 16)
    c_in = 16
    for i, c in enumerate((16, 32, 64, 128)):
        conv(f"model.blocks.{i}.net.0", c, c_in, 3)
        bn(f"model.blocks.{i}.net.1", c)
        conv(f"model.blocks.{i}.net.3", c, c, 3)
        bn(f"model.blocks.{i}.net.4", c)
        if i:
            conv(f"model.blocks.{i}.downsample", c, c_in, 1, bias=True)
        c_in = c
    state["model.output_net.2.weight"] = torch.randn(num_prompts * library_size, 128, generator=g) * 0.05
    state["model.output_net.2.bias"] = torch.randn(num_prompts * library_size, generator=g) * 0.05
    return state


def released_forward(state: dict, images: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """The released TLPGN's eval forward, written with functional ops straight from the state dict, in float64."""
    s = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    F = nn.functional

    def bn(x, prefix):
        return F.batch_norm(x, s[prefix + ".running_mean"], s[prefix + ".running_var"], s[prefix + ".weight"],
                            s[prefix + ".bias"], training=False, eps=1e-5)

    x = images.double()
    short, long = min(x.shape[-2:]), max(x.shape[-2:])
    if short != 224:
        size = (224, int(224 * long / short)) if x.shape[-2] <= x.shape[-1] else (int(224 * long / short), 224)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    x = F.max_pool2d(F.relu(bn(F.conv2d(x, s["model.input_net.0.weight"], stride=2, padding=1),
                               "model.input_net.1")), 3, stride=2, padding=1)
    for i in range(4):
        stride = 1 if i == 0 else 2
        z = F.relu(bn(F.conv2d(x, s[f"model.blocks.{i}.net.0.weight"], stride=stride, padding=1),
                      f"model.blocks.{i}.net.1"))
        z = bn(F.conv2d(z, s[f"model.blocks.{i}.net.3.weight"], padding=1), f"model.blocks.{i}.net.4")
        if i:
            x = F.conv2d(x, s[f"model.blocks.{i}.downsample.weight"], s[f"model.blocks.{i}.downsample.bias"], stride=2)
        x = F.relu(z + x)
    logits = F.linear(x.mean((2, 3)), s["model.output_net.2.weight"], s["model.output_net.2.bias"])
    weights = torch.softmax(logits.reshape(len(logits), num_prompts, -1), -1)
    return torch.einsum("bom,mv->bov", weights, s["tl_vectors"])


@pytest.mark.parametrize("variant", list(RELEASED_VARIANTS))
def test_from_released_loads_the_published_format(variant, tmp_path):
    library_size, dim = RELEASED_VARIANTS[variant]
    state = released_state_dict(library_size, dim)
    assert len(state) == 63  # as the published files
    path = tmp_path / f"pgn_{variant}.pt"
    torch.save(OrderedDict(state), path)  # the published files are torch.save'd OrderedDicts
    pgn = PGN.from_released(path).eval()
    assert (pgn.num_prompts, pgn.library_size, pgn.dim, pgn.input_size) == (16, library_size, dim, 224)
    assert count(pgn) == {"clip": 1_032_304, "dino": 620_656, "vit": 669_808}[variant]  # the published sizes
    images = torch.randn(2, 3, 240, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = pgn(images)
    assert got.shape == (2, 16, dim)
    expected = released_forward(state, images, 16)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_from_released_refuses_other_files(tmp_path):
    state = released_state_dict(32, 48, num_prompts=4)
    torch.save({k: v for k, v in state.items() if "blocks.3" not in k}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"does not match PGN's ResNet-10: unexpected keys \[\], missing keys "
                                         r"\['trunk.7.body.0.weight'"):
        PGN.from_released(tmp_path / "short.pt")
    torch.save({"state_dict": state}, tmp_path / "lightning.pt")
    with pytest.raises(ValueError, match=r"not a released PGN checkpoint: expected the keys 'tl_vectors'"):
        PGN.from_released(tmp_path / "lightning.pt")
    torch.save({**state, "model.output_net.2.weight": torch.zeros(130, 128)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"head's 130 outputs are not a multiple of the library size 32"):
        PGN.from_released(tmp_path / "odd.pt")
    torch.save(Path("not a tensor"), tmp_path / "code.pt")  # an arbitrary object: never unpickled
    with pytest.raises(ValueError, match=r"not a plain state dict of tensors \(weights_only=True refused it\)"):
        PGN.from_released(tmp_path / "code.pt")
