"""Real-format image loaders: small files written in each dataset's on-disk format are read
back exactly; the restricted unpickler refuses code; the synthetic source has the right
shapes and is learnable."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from tangle_kernels.data import DataError
from tangle_kernels.data.safe_pickle import UnsafePickleError, safe_load, safe_loads
from tangle_kernels.data.vision import (
    ImageData,
    ImageFolderData,
    SyntheticImages,
    detect_format,
    load_cifar,
    load_fashion_mnist,
    open_image_data,
    read_cifar_binary,
    read_idx,
)


def _images(rng, n, c=3, h=32, w=32):
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


# ------------------------------------------------------------------- file writers
def write_cifar10_bin(folder, rng, n=4):
    truth = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        x, y = _images(rng, n), rng.integers(0, 10, size=n, dtype=np.uint8)
        rec = np.concatenate([y[:, None], x.reshape(n, -1)], axis=1)
        (folder / name).write_bytes(rec.tobytes())
        truth[name] = (x, y.astype(np.int64))
    return truth


def write_cifar100_bin(folder, rng, n=5):
    truth = {}
    for name in ("train.bin", "test.bin"):
        x = _images(rng, n)
        coarse = rng.integers(0, 20, size=n, dtype=np.uint8)
        fine = rng.integers(0, 100, size=n, dtype=np.uint8)
        rec = np.concatenate([coarse[:, None], fine[:, None], x.reshape(n, -1)], axis=1)
        (folder / name).write_bytes(rec.tobytes())
        truth[name] = (x, coarse.astype(np.int64), fine.astype(np.int64))
    return truth


def _py2_array_pickle_ops(a: np.ndarray) -> bytes:
    """Opcodes of a numpy uint8 array as Python 2's cPickle wrote them for CIFAR:
    numpy.core.multiarray._reconstruct + BUILD with a py2 ``str`` payload."""
    payload = a.tobytes()
    n, m = a.shape
    ops = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
    ops += b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", m) + b"\x86"
    ops += b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    ops += b"\x89T" + struct.pack("<I", len(payload)) + payload + b"tb"
    return ops


def _py2_str(s: str) -> bytes:
    b = s.encode()
    return b"U" + bytes([len(b)]) + b


def write_cifar_py2(path, x, labels, label_keys=("labels",)):
    """A CIFAR python batch as Python 2 pickled it (protocol 2, py2 str keys)."""
    ops = b"\x80\x02}(" + _py2_str("data") + _py2_array_pickle_ops(x.reshape(len(x), -1))
    for key, lab in zip(label_keys, labels):
        ops += _py2_str(key) + b"](" + b"".join(b"K" + bytes([int(v)]) for v in lab) + b"e"
    ops += _py2_str("batch_label") + _py2_str("training batch 1 of 5") + b"u."
    path.write_bytes(ops)


def write_cifar_py3(path, x, labels, label_keys=("labels",), protocol=4):
    """A CIFAR python batch as numpy 2 / Python 3 pickle it today (bytes keys)."""
    d = {b"data": x.reshape(len(x), -1), b"batch_label": b"testing batch 1 of 1",
         b"filenames": [b"a.png"] * len(x)}
    for key, lab in zip(label_keys, labels):
        d[key.encode()] = [int(v) for v in lab]
    path.write_bytes(pickle.dumps(d, protocol=protocol))


def write_idx(path, arr: np.ndarray, gz: bool):
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


# ------------------------------------------------------------------------- tests
def test_cifar10_binary_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    truth = write_cifar10_bin(tmp_path, rng)
    x, y = read_cifar_binary(str(tmp_path / "test_batch.bin"))
    np.testing.assert_array_equal(x, truth["test_batch.bin"][0])
    np.testing.assert_array_equal(y, truth["test_batch.bin"][1])
    assert detect_format(str(tmp_path)) == ("cifar10-bin", str(tmp_path))
    (tx, ty), (vx, vy), n = load_cifar(str(tmp_path), "cifar10-bin")
    assert n == 10 and tx.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(tx[4:8], truth["data_batch_2.bin"][0])
    np.testing.assert_array_equal(ty[16:], truth["data_batch_5.bin"][1])
    # the parent folder is searched too (cifar-10-batches-bin/ inside the given path)
    data = open_image_data(str(tmp_path.parent), val="test")
    assert isinstance(data, ImageData) and data.split_size("val") == 4
    xb, yb = data.batch("train", 6, torch.Generator().manual_seed(0))
    assert xb.shape == (6, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    # normalisation uses the train statistics
    raw = torch.as_tensor(tx).double() / 255
    mean = raw.mean(dim=(0, 2, 3))
    assert torch.allclose(data.mean.view(-1).double(), mean, atol=1e-6)


def test_cifar_binary_bad_size(tmp_path):
    p = tmp_path / "test_batch.bin"
    p.write_bytes(b"\x00" * 3072)
    with pytest.raises(DataError, match="multiple of the record size 3073"):
        read_cifar_binary(str(p))


def test_cifar100_binary_labels(tmp_path):
    rng = np.random.default_rng(2)
    truth = write_cifar100_bin(tmp_path, rng)
    assert detect_format(str(tmp_path))[0] == "cifar100-bin"
    (tx, ty), (vx, vy), n = load_cifar(str(tmp_path), "cifar100-bin")
    assert n == 100
    np.testing.assert_array_equal(tx, truth["train.bin"][0])
    np.testing.assert_array_equal(ty, truth["train.bin"][2])
    (_, cy), _, n = load_cifar(str(tmp_path), "cifar100-bin", label_mode="coarse")
    assert n == 20
    np.testing.assert_array_equal(cy, truth["train.bin"][1])


@pytest.mark.parametrize("style", ["py2", "py3-p2", "py3-p5"])
def test_cifar10_python_round_trip(tmp_path, style):
    rng = np.random.default_rng(3)
    truth = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _images(rng, 3), rng.integers(0, 10, size=3)
        if style == "py2":
            write_cifar_py2(tmp_path / name, x, [y])
        else:
            write_cifar_py3(tmp_path / name, x, [y], protocol=int(style[-1]))
        truth[name] = (x, y)
    assert detect_format(str(tmp_path))[0] == "cifar10-py"
    (tx, ty), (vx, vy), n = load_cifar(str(tmp_path), "cifar10-py")
    np.testing.assert_array_equal(vx, truth["test_batch"][0])
    np.testing.assert_array_equal(vy, truth["test_batch"][1])
    np.testing.assert_array_equal(tx[3:6], truth["data_batch_2"][0])


def test_cifar100_python(tmp_path):
    rng = np.random.default_rng(4)
    truth = {}
    for name in ("train", "test"):
        x = _images(rng, 4)
        fine, coarse = rng.integers(0, 100, 4), rng.integers(0, 20, 4)
        write_cifar_py2(tmp_path / name, x, [fine, coarse], ("fine_labels", "coarse_labels"))
        truth[name] = (x, fine, coarse)
    (tx, ty), _, n = load_cifar(str(tmp_path), "cifar100-py")
    assert n == 100
    np.testing.assert_array_equal(tx, truth["train"][0])
    np.testing.assert_array_equal(ty, truth["train"][1])
    (_, cy), _, _ = load_cifar(str(tmp_path), "cifar100-py", label_mode="coarse")
    np.testing.assert_array_equal(cy, truth["train"][2])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path):
    blob = pickle.dumps({b"data": _Evil()})
    with pytest.raises(UnsafePickleError, match="refusing to load the global"):
        safe_loads(blob, arrays=True)
    # a CIFAR batch file carrying code is refused by the loader with a DataError
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(blob)
    with pytest.raises(DataError, match="posix.system|nt.system"):
        load_cifar(str(tmp_path), "cifar10-py")
    # object arrays and ndarray subclasses are refused too
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)), arrays=True)
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(np.ma.masked_array([1, 2])), arrays=True)
    # numpy scalars are not admitted by the array reader, arrays not by the scalar reader
    with pytest.raises(UnsafePickleError, match="scalar"):
        safe_loads(pickle.dumps(np.float64(1.0)), arrays=True)
    with pytest.raises(UnsafePickleError, match="_reconstruct|_frombuffer"):
        safe_loads(pickle.dumps(np.zeros(2)), scalars=True)
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps({"a": [1, (2, 3)], "b": {4}, "c": b"xy"}, protocol=2))
    assert safe_load(p) == {"a": [1, (2, 3)], "b": {4}, "c": b"xy"}


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(5)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    truth = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y, gz)
        truth[prefix] = (x, y)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(str(raw / f"t10k-images-idx3-ubyte{suffix}")),
                                  truth["t10k"][0])
    assert detect_format(str(tmp_path)) == ("idx", str(raw))
    (tx, ty), (vx, vy), n = load_fashion_mnist(str(raw))
    assert tx.shape == (6, 1, 28, 28) and n == 10
    np.testing.assert_array_equal(tx[:, 0], truth["train"][0])
    np.testing.assert_array_equal(vy, truth["t10k"][1])
    data = open_image_data(str(tmp_path), dataset="fashion-mnist", val="half")
    assert data.split_size("train") == 3 and data.split_size("val") == 3
    assert data.image_shape == (1, 28, 28)


def test_idx_bad_header(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match=r"\[10\] x 1 bytes"):
        read_idx(str(p))
    p.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(str(p))


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow not installed")
    rng = np.random.default_rng(6)
    truth = {}
    for split in ("train", "val"):
        for ci, cls in enumerate(("cat", "dog", "emu")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for k in range(2):
                a = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{k}.png")
                truth[str(d / f"{k}.png")] = (a, ci)
    assert detect_format(str(tmp_path))[0] == "folder"
    data = open_image_data(str(tmp_path), dataset="imagenet", val="test", image_size=8)
    assert isinstance(data, ImageFolderData) and data.num_classes == 3
    assert data.split_size("train") == 6 and data.split_size("val") == 6
    x, y = data.batch("val", 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1, 2}
    # decode of one file: shorter side 12 -> 8 (16 -> 11), centre crop 8x8, same as PIL does
    path, (a, ci) = next(iter(truth.items()))
    img = Image.fromarray(a).resize((11, 8), Image.BILINEAR).crop((1, 0, 9, 8))
    np.testing.assert_array_equal(data.load(path).permute(1, 2, 0).numpy(), np.asarray(img))
    half = open_image_data(str(tmp_path), dataset="imagenet", image_size=8)
    assert half.split_size("train") + half.split_size("val") == 6


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("no PIL")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="needs Pillow, which is not installed"):
        ImageFolderData(str(tmp_path))


def test_detect_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_image_data(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset recognised"):
        open_image_data(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="dataset="):
        open_image_data("synthetic", dataset="mnist-9")


def test_synthetic_shapes_and_learnable():
    d = open_image_data("synthetic", dataset="fashion-mnist",
                        synthetic={"n_train": 256, "n_val": 64, "num_classes": 4})
    assert isinstance(d, SyntheticImages) and d.image_shape == (1, 28, 28)
    x, y = d.batch("train", 8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 1, 28, 28) and y.max() < 4
    # nearest class mean of the train split classifies the val split well (learnable)
    tx, ty = d.tensors("train")
    vx, vy = d.tensors("val")
    means = torch.stack([tx[ty == c].float().mean(0) for c in range(4)])
    pred = torch.cdist(vx.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == vy).float().mean() > 0.9
    # deterministic in the generator
    a = d.batch("val", 5, torch.Generator().manual_seed(3))
    b = d.batch("val", 5, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_augment_crop_flip():
    d = SyntheticImages((3, 8, 8), 3, n_train=4, n_val=4)
    d.augment = True
    x, _ = d.batch("train", 64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 3, 8, 8)
    # every augmented image is a shifted / flipped window of its (padded) source
    from tangle_kernels.data.vision import _augment

    # (an all-distinct source, so each window identifies its shift and flip)
    n = 400
    src = (torch.arange(1 * 4 * 4, dtype=torch.float32).view(1, 1, 4, 4) + 1).expand(n, 1, 4, 4)
    out = _augment(src.contiguous(), torch.Generator().manual_seed(1))
    pad = torch.nn.functional.pad(src[0, 0], (2, 2, 2, 2))
    wins = {(i, j, f): (pad[i:i + 4, j:j + 4].flip(1) if f else pad[i:i + 4, j:j + 4])
            for i in range(5) for j in range(5) for f in (False, True)}
    seen = []
    for b in range(n):
        hit = [k for k, w in wins.items() if torch.equal(out[b, 0], w)]
        assert hit, b
        seen.append(hit[0])
    # it augments: not the identity; every shift and both flips occur, about uniformly
    # (25 shifts x 2 flips, 400 draws: 8 expected per window)
    assert sum(k == (2, 2, False) for k in seen) < n // 10
    assert {k[:2] for k in seen} == {(i, j) for i in range(5) for j in range(5)}
    flips = sum(k[2] for k in seen)
    assert 0.35 * n < flips < 0.65 * n, flips
    # the training batches are augmented (differ from the same draw without augmentation),
    # the validation batches are not
    d.augment = False
    plain, _ = d.batch("train", 64, torch.Generator().manual_seed(0))
    assert not torch.equal(plain, x)
    d.augment = True
    v_aug, _ = d.batch("val", 16, torch.Generator().manual_seed(0))
    d.augment = False
    v_plain, _ = d.batch("val", 16, torch.Generator().manual_seed(0))
    assert torch.equal(v_aug, v_plain)
