"""How the cache stores a member's logits: the bytes of a row against how exactly a hit gives them back.

- `float32`: as computed, bit for bit.
- `float16`: each logit rounded to float16, at half the bytes.
- `top<k>` (`store = "topk"`, `topk = k`): the k largest logits (float16) and their classes, and the log-sum-exp of
  all the others; a hit gives the k logits back and spreads the others' mass evenly over their classes. The
  partition function is kept, so at temperature 1 each top-k class's probability is what float16 gives, and the
  others share their exact total. The error is at most that total mass; docs/configuration.md has it measured on real
  teachers.
  A row is `2k + 1` uint16 fields whatever the number of classes: 46 bytes with its key and checksum for k = 5.

A format only encodes and decodes: the cache checks, stores and serves the encoded rows like any other, and the
service always forms the ensemble from the decoded member rows, so temperature and weights can change freely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# classes travel as uint16
TOPK_MAX_CLASSES = 1 << 16


@dataclass(frozen=True)
class RowFormat:
    name: str
    dtype: np.dtype

    def width(self, num_classes: int) -> int:
        return num_classes

    def encode(self, logits: np.ndarray) -> np.ndarray:
        # past float16's range: inf, which `storable` keeps out of the store
        with np.errstate(over="ignore"):
            return logits.astype(self.dtype)

    def decode(self, stored: np.ndarray, num_classes: int) -> np.ndarray:
        return stored.astype(np.float32)

    def check(self, num_classes: int) -> None:
        """ValueError when this format cannot hold rows of `num_classes`."""


@dataclass(frozen=True)
class TopK(RowFormat):
    k: int = 5

    def width(self, num_classes: int) -> int:
        return 2 * self.k + 1

    def encode(self, logits: np.ndarray) -> np.ndarray:
        n, num_classes = logits.shape
        z = logits.astype(np.float64)
        top = np.argpartition(-z, self.k - 1, axis=1)[:, : self.k]
        values = np.take_along_axis(z, top, axis=1)
        rest = z.copy()
        np.put_along_axis(rest, top, -np.inf, axis=1)
        peak = rest.max(axis=1, keepdims=True)
        rest_lse = peak[:, 0] + np.log(np.exp(rest - peak).sum(axis=1))
        stored = np.empty((n, self.width(num_classes)), np.uint16)
        # past float16's range: inf, which `storable` keeps out of the store
        with np.errstate(over="ignore"):
            stored[:, : self.k] = values.astype(np.float16).view(np.uint16)
            stored[:, 2 * self.k] = rest_lse.astype(np.float16).view(np.uint16)
        stored[:, self.k : 2 * self.k] = top
        return stored

    def decode(self, stored: np.ndarray, num_classes: int) -> np.ndarray:
        values = np.ascontiguousarray(stored[:, : self.k]).view(np.float16).astype(np.float32)
        classes = stored[:, self.k : 2 * self.k].astype(np.int64)
        rest_lse = np.ascontiguousarray(stored[:, 2 * self.k :]).view(np.float16).astype(np.float32)
        logits = np.repeat(rest_lse - np.float32(np.log(num_classes - self.k)), num_classes, axis=1)
        np.put_along_axis(logits, classes, values, axis=1)
        return logits

    def check(self, num_classes: int) -> None:
        if not self.k < num_classes <= TOPK_MAX_CLASSES:
            raise ValueError(
                f"top-{self.k} rows need more than {self.k} and at most {TOPK_MAX_CLASSES} classes, got {num_classes}"
            )


FLOAT32 = RowFormat("float32", np.dtype(np.float32))
FLOAT16 = RowFormat("float16", np.dtype(np.float16))
_TOPK = re.compile(r"top([1-9][0-9]{0,4})")


def namespace_name(version: str, store: str = "float32") -> str:
    """A member version's namespace for a row format: rows of one format never mix with another's."""
    return version if store == "float32" else f"{version}.{store}"


def row_format(name: str) -> RowFormat:
    """The format a name (`float32`, `float16`, `top<k>`) stands for; ValueError for any other."""
    if name in (FLOAT32.name, FLOAT16.name):
        return FLOAT32 if name == FLOAT32.name else FLOAT16
    match = _TOPK.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"row format {name!r} is not float32, float16 or top<k> (k from 1)")
    return TopK(name, np.dtype(np.uint16), int(match.group(1)))


def storable(fmt: RowFormat, encoded: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows whose encoding holds finite numbers (a logit past float16's range does not): only those are stored."""
    return np.isfinite(fmt.decode(encoded, num_classes)).all(axis=1)
