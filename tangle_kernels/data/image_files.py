"""Image dataset files: readers of the CIFAR (binary and python) and IDX (Fashion-MNIST)
formats, format detection of a folder, and loaders returning numpy arrays. The data
sources built on them are in :mod:`tangle_kernels.data.vision`."""

from __future__ import annotations

import gzip
import os
import struct
from typing import Any

import numpy as np

from . import DataError

_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR10_BIN_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
_CIFAR10_PY_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
#: ImageNet channel statistics (for folder data, whose statistics are not computed)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- readers
def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_cifar_binary(path: str, *, label_bytes: int = 1, label_index: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR binary file: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``.

    Each record is ``label_bytes`` label bytes (CIFAR-10: 1; CIFAR-100: 2, coarse then
    fine) followed by 3072 pixel bytes; ``label_index`` picks the label byte.
    """
    raw = _read_bytes(path)
    rec = label_bytes + _CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % rec:
        raise DataError(
            f"{path}: size {len(raw)} bytes is not a positive multiple of the record size "
            f"{rec} (= {label_bytes} label byte(s) + 3072 pixels); not a CIFAR-"
            f"{10 if label_bytes == 1 else 100} binary file"
        )
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, rec)
    labels = a[:, label_index].astype(np.int64)
    images = a[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _key(d: dict, *names: str) -> Any:
    for n in names:
        for k in (n, n.encode()):
            if k in d:
                return d[k]
    return None


def read_cifar_python(path: str, *, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python-version batch (a pickled dict with ``data`` [N, 3072] uint8 and
    ``labels``/``fine_labels``/``coarse_labels``), read through the restricted unpickler.
    ``label_key``: ``"labels"`` (CIFAR-10), ``"fine_labels"`` or ``"coarse_labels"``."""
    from .safe_pickle import UnsafePickleError, safe_load

    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        d = safe_load(path, arrays=True)
    except UnsafePickleError as e:
        raise DataError(str(e)) from None
    except Exception as e:  # truncated or not a pickle
        raise DataError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    data = _key(d, "data")
    labels = _key(d, label_key)
    if data is None or labels is None:
        keys = [k.decode() if isinstance(k, bytes) else k for k in d]
        raise DataError(f"{path}: expected keys 'data' and {label_key!r}, found {keys}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DataError(
            f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}"
        )
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).copy(), labels


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST / Fashion-MNIST format), raw or gzip: magic ``0 0 type ndim``,
    ``ndim`` big-endian int32 sizes, then the data big-endian."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}i", raw[4:head])
    dt = np.dtype(_IDX_DTYPES[raw[2]])
    n = int(np.prod(dims)) if dims else 1
    if len(raw) - head != n * dt.itemsize:
        raise DataError(
            f"{path}: idx header says {list(dims)} x {dt.itemsize} bytes = {n * dt.itemsize} "
            f"bytes of data, the file has {len(raw) - head}"
        )
    return np.frombuffer(raw, dtype=dt, offset=head).reshape(dims).astype(dt.newbyteorder("="))


# ---------------------------------------------------------------------- detection
def _find(root: str, name: str) -> str | None:
    for cand in (name, name + ".gz"):
        p = os.path.join(root, cand)
        if os.path.isfile(p):
            return p
    return None


def _is_class_folder(root: str) -> bool:
    try:
        subs = [e for e in os.scandir(root) if e.is_dir()]
    except OSError:
        return False
    return bool(subs)


def _detect_here(root: str) -> str | None:
    if all(os.path.isfile(os.path.join(root, f)) for f in _CIFAR10_BIN_TRAIN + ["test_batch.bin"]):
        return "cifar10-bin"
    if os.path.isfile(os.path.join(root, "train.bin")) and os.path.isfile(os.path.join(root, "test.bin")):
        return "cifar100-bin"
    if all(os.path.isfile(os.path.join(root, f)) for f in _CIFAR10_PY_TRAIN + ["test_batch"]):
        return "cifar10-py"
    if os.path.isfile(os.path.join(root, "train")) and os.path.isfile(os.path.join(root, "test")):
        return "cifar100-py"
    if all(_find(root, f) for f in _IDX_FILES.values()):
        return "idx"
    if os.path.isdir(os.path.join(root, "train")) and _is_class_folder(os.path.join(root, "train")):
        return "folder"
    return None


def detect_format(path: str) -> tuple[str, str]:
    """``(format, folder)`` of the data at ``path`` (the dataset folder or its parent):
    one of ``cifar10-bin``, ``cifar100-bin``, ``cifar10-py``, ``cifar100-py``, ``idx``,
    ``folder`` (ImageNet-style); :class:`DataError` when none matches."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data path not found: {path}")
    if not os.path.isdir(path):
        raise DataError(
            f"data path {path} is a file; give the dataset folder (CIFAR batches, idx files "
            f"or an ImageNet-style class folder)"
        )
    fmt = _detect_here(path)
    if fmt:
        return fmt, path
    subs = sorted(e.path for e in os.scandir(path) if e.is_dir())
    for sub in subs:  # cifar-10-batches-bin/, cifar-100-python/, FashionMNIST/raw/, ...
        for cand in (sub, os.path.join(sub, "raw")):
            if os.path.isdir(cand):
                fmt = _detect_here(cand)
                if fmt:
                    return fmt, cand
    if subs and all(_has_images(s) for s in subs):
        return "folder", path
    raise DataError(
        f"{path}: no dataset recognised. Expected CIFAR-10 binary (data_batch_1.bin .. "
        f"data_batch_5.bin, test_batch.bin), CIFAR-100 binary (train.bin, test.bin), the "
        f"CIFAR python version (data_batch_1..5 + test_batch, or train + test), Fashion-MNIST "
        f"idx files (train-images-idx3-ubyte[.gz], ...), or an ImageNet-style folder "
        f"(train/<class>/<image>)"
    )


def _has_images(folder: str) -> bool:
    try:
        return any(e.is_file() and e.name.lower().endswith(_IMAGE_EXTS) for e in os.scandir(folder))
    except OSError:
        return False


# ------------------------------------------------------------------------ loaders
def load_cifar(root: str, fmt: str, *, label_mode: str = "fine"
               ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], int]:
    """``((train_x, train_y), (test_x, test_y), num_classes)`` of a CIFAR folder in format
    ``fmt`` (see :func:`detect_format`); ``label_mode`` picks CIFAR-100's fine (100) or
    coarse (20) labels."""
    if label_mode not in ("fine", "coarse"):
        raise DataError(f"label_mode={label_mode!r}: expected 'fine' or 'coarse'")

    def cat(parts):
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    j = os.path.join
    if fmt == "cifar10-bin":
        train = cat([read_cifar_binary(j(root, f)) for f in _CIFAR10_BIN_TRAIN])
        test = read_cifar_binary(j(root, "test_batch.bin"))
        n = 10
    elif fmt == "cifar100-bin":
        li = 1 if label_mode == "fine" else 0
        train = read_cifar_binary(j(root, "train.bin"), label_bytes=2, label_index=li)
        test = read_cifar_binary(j(root, "test.bin"), label_bytes=2, label_index=li)
        n = 100 if label_mode == "fine" else 20
    elif fmt == "cifar10-py":
        train = cat([read_cifar_python(j(root, f)) for f in _CIFAR10_PY_TRAIN])
        test = read_cifar_python(j(root, "test_batch"))
        n = 10
    elif fmt == "cifar100-py":
        key = f"{label_mode}_labels"
        train = read_cifar_python(j(root, "train"), label_key=key)
        test = read_cifar_python(j(root, "test"), label_key=key)
        n = 100 if label_mode == "fine" else 20
    else:
        raise DataError(f"load_cifar: unknown format {fmt!r}")
    for split, (_, y) in (("train", train), ("test", test)):
        if len(y) and (y.min() < 0 or y.max() >= n):
            raise DataError(f"{root}: {split} labels outside [0, {n}) (found {y.min()}..{y.max()})")
    return train, test, n


def load_fashion_mnist(root: str) -> tuple[tuple[np.ndarray, np.ndarray],
                                           tuple[np.ndarray, np.ndarray], int]:
    """``((train_x [N,1,28,28] uint8, train_y), (test_x, test_y), num_classes)`` from the
    four idx files in ``root`` (raw or ``.gz``)."""
    arrays = {}
    for k, name in _IDX_FILES.items():
        p = _find(root, name)
        if p is None:
            raise DataError(f"{root}: missing {name} (or {name}.gz)")
        arrays[k] = read_idx(p)
    out = []
    for s in ("train", "test"):
        x, y = arrays[f"{s}_x"], arrays[f"{s}_y"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{root}: {s} images must be uint8 [N, H, W], got {x.dtype} {list(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{root}: {len(x)} {s} images but labels of shape {list(y.shape)}")
        out.append((x[:, None].copy(), y.astype(np.int64)))
    n = int(max(out[0][1].max(initial=0), out[1][1].max(initial=0))) + 1
    return out[0], out[1], max(n, 10)
