"""Image data for the vision search spaces: real loaders that read a path the user gives
(never a download) and a synthetic source with the right shapes.

Formats read (the folder layout the datasets ship with; the folder itself or its parent):

=====================  ==========================================================
CIFAR-10, binary       ``data_batch_{1..5}.bin``, ``test_batch.bin``; records of
                       1 label byte + 3072 pixel bytes (R, G, B planes of 32x32)
CIFAR-100, binary      ``train.bin``, ``test.bin``; records of 1 coarse + 1 fine
                       label byte + 3072 pixel bytes
CIFAR-10/100, python   ``data_batch_{1..5}``/``test_batch`` or ``train``/``test``:
                       pickled dicts read by a restricted unpickler that admits only
                       plain containers, bytes and numpy arrays
                       (:mod:`tangle_kernels.data.safe_pickle`)
Fashion-MNIST / MNIST  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
                       ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, raw or
                       ``.gz``
ImageNet-style folder  ``ROOT/train/<class>/<image>`` (and ``ROOT/val/<class>/...``),
                       or ``ROOT/<class>/<image>``; decoded with Pillow (required for
                       this format only), resized (shorter side) and centre-cropped
=====================  ==========================================================

torchvision is not needed (if installed, nothing here uses it: the readers are a few
lines of numpy each and keep the package light).

Every source is a :class:`~tangle_kernels.spaces.base.DataSource`: ``batch(split,
batch_size, generator, device)`` returns ``(images [B, C, H, W] float32 normalised,
labels [B] int64)`` for split ``"train"`` or ``"val"``. The ``"val"`` split (the
architecture split of the bilevel search) is the second half of the training set
(``val="half"``, the DARTS protocol; the default) or the dataset's test set
(``val="test"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import DataError
from .image_files import (  # noqa: F401  (re-exported: the public readers and loaders)
    IMAGENET_MEAN,
    IMAGENET_STD,
    _IMAGE_EXTS,
    detect_format,
    load_cifar,
    load_fashion_mnist,
    read_cifar_binary,
    read_cifar_python,
    read_idx,
)

__all__ = [
    "ImageData",
    "ImageFolderData",
    "SyntheticImages",
    "DATASETS",
    "read_cifar_binary",
    "read_cifar_python",
    "read_idx",
    "load_cifar",
    "load_fashion_mnist",
    "open_image_data",
    "detect_format",
]

#: shapes and class counts of the datasets (used by the synthetic source too)
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {"shape": (3, 32, 32), "num_classes": 10},
    "cifar100": {"shape": (3, 32, 32), "num_classes": 100},
    "fashion-mnist": {"shape": (1, 28, 28), "num_classes": 10},
    "imagenet": {"shape": (3, 224, 224), "num_classes": 1000},
}

# ------------------------------------------------------------------------ sources
class ImageData:
    """In-memory labelled images with a ``train`` and a ``val`` split (a DataSource).

    Args:
        train, val: ``(images uint8 [N, C, H, W], labels int [N])`` numpy arrays or tensors.
        num_classes: number of classes.
        name: shown in logs.
        mean, std: per-channel statistics in [0, 1] units (default: those of ``train``).
        augment: random crop (padding 4 for images >= 32 px, else 2) and horizontal flip
            on the ``train`` split, drawn from the batch generator.
    """

    def __init__(self, train, val, num_classes: int, *, name: str = "images",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: bool = False):
        self.name = name
        self.num_classes = int(num_classes)
        self.augment = bool(augment)
        self._x, self._y = {}, {}
        for split, (x, y) in (("train", train), ("val", val)):
            x = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
            y = torch.as_tensor(np.asarray(y, dtype=np.int64) if not torch.is_tensor(y) else y).long()
            if x.dim() != 4:
                raise DataError(f"{name}: {split} images must be [N, C, H, W], got {list(x.shape)}")
            if len(x) == 0:
                raise DataError(f"{name}: the {split} split is empty")
            if len(y) != len(x):
                raise DataError(f"{name}: {split} has {len(x)} images but {len(y)} labels")
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise DataError(f"{name}: {split} labels outside [0, {self.num_classes})")
            self._x[split], self._y[split] = x, y
        if self._x["train"].shape[1:] != self._x["val"].shape[1:]:
            raise DataError(f"{name}: train and val image shapes differ")
        self.image_shape = tuple(self._x["train"].shape[1:])
        scale = 255.0 if self._x["train"].dtype == torch.uint8 else 1.0
        self._scale = scale
        if mean is None or std is None:
            xt = self._x["train"][: 10_000].double() / scale
            m = xt.mean(dim=(0, 2, 3))
            s = xt.std(dim=(0, 2, 3)).clamp_min(1e-3)
            mean = m.tolist() if mean is None else mean
            std = s.tolist() if std is None else std
        c = self.image_shape[0]
        if len(mean) != c or len(std) != c:
            raise DataError(f"{name}: mean/std need {c} values")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)

    def split_size(self, split: str) -> int:
        return len(self._y[self._split(split)])

    def _split(self, split: str) -> str:
        if split not in self._x:
            raise KeyError(f"{self.name}: no split {split!r} (splits: train, val)")
        return split

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw ``(images, labels)`` of ``split`` (images as stored, uint8 for real data)."""
        s = self._split(split)
        return self._x[s], self._y[s]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Stored images -> float32 ``(x / 255 - mean) / std``."""
        return (x.float() / self._scale - self.mean) / self.std

    def batch(self, split: str, batch_size: int, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        s = self._split(split)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        idx = torch.randint(len(self._y[s]), (batch_size,), generator=generator)
        x = self.normalize(self._x[s][idx])
        if self.augment and s == "train":
            x = _augment(x, generator)
        return x.to(device), self._y[s][idx].to(device)

    def iter_batches(self, split: str, batch_size: int, device="cpu"):
        """All examples of ``split`` in order, in batches (for a full evaluation)."""
        s = self._split(split)
        for i in range(0, len(self._y[s]), batch_size):
            yield (self.normalize(self._x[s][i:i + batch_size]).to(device),
                   self._y[s][i:i + batch_size].to(device))

    def __repr__(self) -> str:
        return (f"ImageData({self.name}, shape={self.image_shape}, classes={self.num_classes}, "
                f"train={self.split_size('train')}, val={self.split_size('val')})")


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding (4 px, 2 below 32 px) and random horizontal flip."""
    B, C, H, W = x.shape
    pad = 4 if min(H, W) >= 32 else 2
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(2 * pad + 1, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(H)[None, :])  # [B, H]
    cols = (dx[:, None] + torch.arange(W)[None, :])  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


class SyntheticImages(ImageData):
    """Learnable synthetic images of a given shape (``--data synthetic``): every class has
    a fixed random smooth template; an image is its class template plus Gaussian noise,
    quantised to uint8. A classifier can learn it, so a search lowers the loss.

    Args:
        shape: ``(C, H, W)``; num_classes; n_train, n_val: split sizes; noise: the noise
        standard deviation in [0, 1] pixel units; seed: the data seed.
    """

    def __init__(self, shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
                 n_train: int = 512, n_val: int = 256, noise: float = 0.25, seed: int = 0,
                 name: str | None = None):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"synthetic images: shape {shape} must be (C, H, W) positive")
        if num_classes < 2:
            raise DataError(f"synthetic images: num_classes={num_classes} must be >= 2")
        g = torch.Generator().manual_seed(seed)
        C, H, W = shape
        coarse = torch.rand(num_classes, C, max(2, H // 4), max(2, W // 4), generator=g)
        templates = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear",
                                                    align_corners=False)

        def make(n):
            y = torch.randint(num_classes, (n,), generator=g)
            x = templates[y] + noise * torch.randn(n, C, H, W, generator=g)
            return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

        super().__init__(make(n_train), make(n_val), num_classes,
                         name=name or f"synthetic(images {C}x{H}x{W}, {num_classes} classes)")


class ImageFolderData:
    """An ImageNet-style class folder, decoded lazily with Pillow (a DataSource).

    Layout: ``root/train/<class>/<image>`` and optionally ``root/val/<class>/<image>``
    (used when ``val="test"``), or ``root/<class>/<image>``. Classes are the sorted
    sub-folder names of the training folder. Images are converted to RGB (or L when
    ``channels=1``), resized so the shorter side is ``image_size`` and centre-cropped to
    ``image_size x image_size``; normalised with the ImageNet statistics.
    """

    def __init__(self, root: str, *, image_size: int = 224, val: str = "half",
                 channels: int = 3, seed: int = 0, limit: int | None = None):
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise DataError(
                "reading an ImageNet-style image folder needs Pillow, which is not installed: "
                "pip install pillow"
            ) from None
        if val not in ("half", "test"):
            raise DataError(f"val={val!r}: expected 'half' or 'test'")
        if channels not in (1, 3):
            raise DataError(f"channels={channels}: expected 1 or 3")
        root = os.fspath(root)
        train_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        self.classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if not self.classes:
            raise DataError(f"{train_dir}: no class sub-folders")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.image_size = int(image_size)
        self.channels = channels
        self.image_shape = (channels, self.image_size, self.image_size)
        self.name = f"folder:{root}"
        files = self._list(train_dir)
        if not files:
            raise DataError(f"{train_dir}: no image files ({', '.join(_IMAGE_EXTS)})")
        if val == "test":
            vdir = next((os.path.join(root, d) for d in ("val", "test")
                         if os.path.isdir(os.path.join(root, d))), None)
            if vdir is None:
                raise DataError(f"{root}: val='test' needs a val/ (or test/) folder")
            vfiles = self._list(vdir)
            if not vfiles:
                raise DataError(f"{vdir}: no image files")
            splits = {"train": files, "val": vfiles}
        else:
            if len(files) < 2:
                raise DataError(f"{train_dir}: needs at least 2 images to split in halves")
            g = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(files), generator=g).tolist()
            half = len(files) // 2
            splits = {"train": [files[i] for i in perm[:half]],
                      "val": [files[i] for i in perm[half:]]}
        if limit is not None:
            splits = {k: v[:limit] for k, v in splits.items()}
        self._files = splits
        c = channels
        mean = IMAGENET_MEAN if c == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if c == 3 else (sum(IMAGENET_STD) / 3,)
        self.mean = torch.tensor(mean).view(1, c, 1, 1)
        self.std = torch.tensor(std).view(1, c, 1, 1)

    def _list(self, folder: str) -> list[tuple[str, int]]:
        out = []
        for cls in sorted(os.listdir(folder)):
            d = os.path.join(folder, cls)
            if not os.path.isdir(d):
                continue
            if cls not in self.class_to_idx:
                raise DataError(f"{d}: class {cls!r} is not among the training classes")
            for f in sorted(os.listdir(d)):
                if f.lower().endswith(_IMAGE_EXTS):
                    out.append((os.path.join(d, f), self.class_to_idx[cls]))
        return out

    def split_size(self, split: str) -> int:
        if split not in self._files:
            raise KeyError(f"{self.name}: no split {split!r} (splits: train, val)")
        return len(self._files[split])

    def load(self, path: str) -> torch.Tensor:
        """One image as uint8 ``[C, image_size, image_size]``."""
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                w, h = im.size
                s = self.image_size / min(w, h)
                nw, nh = max(self.image_size, round(w * s)), max(self.image_size, round(h * s))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot decode image {path}: {e}") from None
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a.copy()).permute(2, 0, 1)

    def batch(self, split: str, batch_size: int, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        n = self.split_size(split)
        idx = torch.randint(n, (batch_size,), generator=generator).tolist()
        files = self._files[split]
        x = torch.stack([self.load(files[i][0]) for i in idx]).float() / 255.0
        y = torch.tensor([files[i][1] for i in idx], dtype=torch.int64)
        return ((x - self.mean) / self.std).to(device), y.to(device)


def _half_split(train, seed: int):
    x, y = train
    g = np.random.default_rng(seed)
    perm = g.permutation(len(y))
    half = len(y) // 2
    if half == 0:
        raise DataError("the training set has fewer than 2 examples; cannot split it in halves")
    return (x[perm[:half]], y[perm[:half]]), (x[perm[half:]], y[perm[half:]])


def open_image_data(source: str | os.PathLike | None, *, dataset: str = "cifar10",
                    val: str = "half", image_size: int | None = None, augment: bool = False,
                    label_mode: str = "fine", limit: int | None = None, seed: int = 0,
                    synthetic: dict | None = None):
    """The data source for ``--data``: ``"synthetic"`` (or None) gives
    :class:`SyntheticImages` with ``dataset``'s shape (``synthetic`` overrides its
    keyword arguments: shape, num_classes, n_train, ...); a path is read by
    :func:`detect_format` and the matching loader.

    ``val``: ``"half"`` (second half of the training set, shuffled with ``seed``) or
    ``"test"`` (the dataset's test set). ``limit`` keeps the first ``limit`` examples of
    each split. ``image_size`` only applies to ImageNet-style folders.
    """
    if dataset not in DATASETS:
        raise DataError(f"dataset={dataset!r}: expected one of {sorted(DATASETS)}")
    if val not in ("half", "test"):
        raise DataError(f"val={val!r}: expected 'half' or 'test'")
    if source is None or source == "synthetic":
        kw = {"shape": DATASETS[dataset]["shape"], "num_classes": DATASETS[dataset]["num_classes"],
              "seed": seed}
        kw.update(synthetic or {})
        return SyntheticImages(**kw)
    fmt, root = detect_format(os.fspath(source))
    if fmt == "folder":
        return ImageFolderData(root, image_size=image_size or DATASETS[dataset]["shape"][1],
                               val=val, seed=seed, limit=limit,
                               channels=DATASETS[dataset]["shape"][0])
    if fmt == "idx":
        train, test, n = load_fashion_mnist(root)
    else:
        train, test, n = load_cifar(root, fmt, label_mode=label_mode)
    if val == "half":
        train, test = _half_split(train, seed)
    if limit is not None:
        train = (train[0][:limit], train[1][:limit])
        test = (test[0][:limit], test[1][:limit])
    return ImageData(train, test, n, name=f"{fmt}:{root}", augment=augment)
