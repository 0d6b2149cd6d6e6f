"""vpfast train --method provp|vpt, and the few-shot and base-to-novel protocols."""

from __future__ import annotations

import pytest
import torch

from test_train import tiny
from vpfast.train import checkpoint, data
from vpfast.train.config import TrainConfig
from vpfast.train.loop import evaluate_checkpoint, load_datasets, train

pytestmark = pytest.mark.cpu


def labelled(counts: list[int]) -> data.TensorImages:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    order = torch.randperm(len(labels))
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    return data.TensorImages(images, labels[order], [f"c{k}" for k in range(len(counts))])


def test_few_shot_keeps_k_seeded_images_per_class():
    dataset = labelled([7, 5, 9])
    picked = data.few_shot(dataset, 4, seed=1)
    assert torch.bincount(picked.labels).tolist() == [4, 4, 4]
    again, other = data.few_shot(dataset, 4, seed=1), data.few_shot(dataset, 4, seed=2)
    assert torch.equal(again.images, picked.images) and not torch.equal(other.images, picked.images)
    assert torch.equal(dataset.labels[picked.images[:, 0, 0, 0].long()], picked.labels)  # images keep their labels
    with pytest.raises(ValueError, match="class 'c1' has 5, --shots is 6"):
        data.few_shot(dataset, 6, seed=0)


def test_few_shot_and_class_range_on_a_loaded_dataset():
    """Datasets that are not in memory (here a Subset, as validation_split makes): labels read, not decoded."""
    dataset = labelled([3, 4, 5, 6])
    subset = torch.utils.data.Subset(dataset, list(range(2, 18)))
    subset.classes = dataset.classes
    novel = data.class_range(subset, data.num_base_classes(4))
    assert novel.classes == ["c2", "c3"] and len(novel) == int((dataset.labels[2:18] >= 2).sum())
    assert all(int(novel[i][1]) == int(novel.targets[i]) in (0, 1) for i in range(len(novel)))
    shots = data.few_shot(novel, 2, seed=0)
    assert sorted(int(shots[i][1]) for i in range(len(shots))) == [0, 0, 1, 1]
    assert data.num_base_classes(10) == 5 and data.num_base_classes(5) == 3


def test_base_to_novel_and_shots_shape_the_splits(tmp_path):
    cfg = tiny(tmp_path, base_to_novel=True, shots=3, train_limit=None, test_limit=None).resolved()
    train_set, val_set, test_set, classes = load_datasets(cfg, 32)
    assert len(classes) == 10 and train_set.classes == classes[:5]
    assert torch.bincount(train_set.labels).tolist() == [3] * 5
    assert val_set.labels.max() < 5 and len(val_set) > 0
    assert set(test_set.labels.tolist()) == set(range(10))


def test_provp_trains_its_prompts_and_resumes_exactly(tmp_path):
    cfg = dict(method="provp", num_prompts=2, diversity=0.0)
    straight = train(tiny(tmp_path / "a", **cfg), progress=False)
    train(tiny(tmp_path / "b", max_steps=3, **cfg), progress=False)
    middle = checkpoint.load_tensors(tmp_path / "b" / "last")["adapter.provp.prompts"]
    resumed = train(tiny(tmp_path / "b", **cfg), resume=True, progress=False)
    a, b = (checkpoint.load_tensors(tmp_path / run / "last") for run in ("a", "b"))
    assert list(a) == ["adapter.provp.prompts"] and a["adapter.provp.prompts"].shape == (2, 2, 64)
    assert torch.equal(a["adapter.provp.prompts"], b["adapter.provp.prompts"])
    assert not torch.equal(middle, a["adapter.provp.prompts"])  # training moves the prompts
    assert straight["test_acc"] == resumed["test_acc"] and straight["trainable_params"] == 2 * 2 * 64
    config = TrainConfig.load(tmp_path / "a" / "config.json").resolved()
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert (config.alpha, config.ref_weight, config.ref_temperature, config.warmup_epochs) == (0.01, 1.0, 1.0, 1)


def test_vpt_shallow_base_to_novel_reports_base_novel_and_harmonic_mean(tmp_path):
    run = tiny(tmp_path, method="vpt", deep=False, num_prompts=3, base_to_novel=True, shots=4, test_limit=200,
               diversity=0.0)
    results = train(run, progress=False)
    base, novel = results["base_acc"], results["novel_acc"]
    assert "test_acc" not in results and 0 <= base <= 1 and 0 <= novel <= 1
    assert results["harmonic_mean"] == pytest.approx(2 * base * novel / (base + novel) if base + novel else 0.0)
    assert results["steps"] == 2 * 2  # 5 base classes x 4 shots = 20 images: 2 batches of 16 an epoch
    assert results["trainable_params"] == 3 * 64
    again = evaluate_checkpoint(tmp_path / "last", progress=False)
    assert {k: again[k] for k in ("base_acc", "novel_acc", "harmonic_mean")} == \
        {k: results[k] for k in ("base_acc", "novel_acc", "harmonic_mean")}


@pytest.mark.parametrize("changes,message", [
    (dict(method="vpt", alpha=0.5), r"--method vpt replaces its prompts .* got alpha 0.5 and ref_weight 0.0"),
    (dict(method="provp", alpha=1.5), r"alpha must be in \[0, 1\] .*got 1.5"),
    (dict(method="provp", ref_temperature=0.0), "ref_temperature must be > 0, got 0.0"),
    (dict(method="provp", ref_weight=-1.0), "ref_weight must be >= 0, got -1.0"),
    (dict(method="provp", num_prompts=0), "num_prompts must be >= 1 for --method provp, got 0"),
    (dict(shots=0), r"shots must be an integer >= 1 .*got 0"),
    (dict(base_to_novel=True, model="timm:vit_tiny_patch16_224"), "base_to_novel needs an open_clip model"),
])
def test_bad_settings_are_named(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, **changes).resolved()


def test_cli_names_the_bad_setting(capsys):
    from vpfast.cli import main

    assert main(["train", "--method", "vpt", "--alpha", "0.2"]) == 2
    assert "vpfast: error: --method vpt replaces its prompts" in capsys.readouterr().err


def test_provp_on_a_cnn_says_it_needs_a_vit(tmp_path):
    with pytest.raises(ValueError, match="--method provp needs an open_clip or timm ViT, and torchvision:resnet18"):
        train(tiny(tmp_path, method="provp", model="torchvision:resnet18", pretrained=None), progress=False)
