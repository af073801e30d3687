"""A namespace's rows in memory, what one costs on the store, and the checksum that lets a row be trusted.

A row's checksum covers (format, namespace, key, stored row): the key ties the row to its input and the namespace to
its member version, so a row moved anywhere else (swapped or copied chunks) fails like a damaged one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from shared.hashing import KEY_BYTES
from teacher_service.cache.layout import CHECK_BYTES, FORMAT
from teacher_service.cache.row_formats import FLOAT32, RowFormat


def row_bytes(num_classes: int, fmt: RowFormat = FLOAT32) -> int:
    return fmt.width(num_classes) * fmt.dtype.itemsize + KEY_BYTES + CHECK_BYTES


def row_checks(version: str, keys: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """One blake2b-64 per row over (format, namespace, key bytes, stored logits bytes, little-endian)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.uint64)
    rows = np.concatenate(
        [
            np.ascontiguousarray(keys, np.uint8).reshape(n, KEY_BYTES),
            np.ascontiguousarray(logits, logits.dtype.newbyteorder("<")).view(np.uint8).reshape(n, -1),
        ],
        axis=1,
    )
    seed = hashlib.blake2b(f"{FORMAT}|{version}|".encode(), digest_size=CHECK_BYTES)

    def digest(row: np.ndarray) -> bytes:
        h = seed.copy()
        h.update(row)
        return h.digest()

    return np.frombuffer(b"".join(digest(r) for r in rows), dtype="<u8").astype(np.uint64)


@dataclass
class Rows:
    """Rows as the store holds them: keys (N, 16) uint8, stored logits (N, width), checksums (N,) uint64."""

    keys: np.ndarray
    logits: np.ndarray
    checks: np.ndarray

    @classmethod
    def empty(cls, n: int, width: int, dtype: np.dtype) -> Rows:
        """`width` stored fields a row (the number of classes for float rows; see row_formats)."""
        return cls(np.zeros((n, KEY_BYTES), np.uint8), np.zeros((n, width), dtype), np.zeros(n, np.uint64))

    def select(self, which) -> Rows:
        return Rows(self.keys[which], self.logits[which], self.checks[which])

    def put(self, where, rows: Rows) -> None:
        self.keys[where], self.logits[where], self.checks[where] = rows.keys, rows.logits, rows.checks


def key_array(keys: list[bytes] | np.ndarray) -> np.ndarray:
    """Keys as the (N, KEY_BYTES) uint8 array the index reads: a list of 16-byte keys joined, an array as it is."""
    if isinstance(keys, np.ndarray):
        return keys
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)


def spans(positions: np.ndarray) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    found, start = [], None
    for i, p in enumerate(positions):
        if start is None:
            start = p
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            found.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ", ".join(found)
