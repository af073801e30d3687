"""Content hashes: cache keys for input rows and versions for weight files.

A row's key covers its dtype, shape and bytes (Triton's response cache does the
same), so a uint8 image and its float copy are different keys, and two augmented
views of one image never collide on a sample id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch is optional here: a client hashes numpy rows without it (shared.client)
if TYPE_CHECKING:
    import torch

# 128-bit keys: collisions are out of reach for any cache size
KEY_BYTES = 16
VERSION_CHARS = 16


def row_keys(x: torch.Tensor | np.ndarray) -> list[bytes]:
    """One key per row of a (B, ...) tensor or array, as sent on the wire: the same key for a tensor and its numpy
    twin."""
    rows = np.ascontiguousarray(x if isinstance(x, np.ndarray) else x.detach().cpu().numpy())
    # blake2b(prefix + row), from one hash of the prefix copied for each row (cheaper than a new blake2b object per
    # row), each row read where it lies rather than joined to the prefix first
    prefixed = hashlib.blake2b(f"{rows.dtype.str}|{rows.shape[1:]}|".encode(), digest_size=KEY_BYTES)
    return [_digest(prefixed.copy(), row) for row in rows]


def _digest(hashed, row: np.ndarray) -> bytes:
    hashed.update(row)
    return hashed.digest()


def file_version(path: Path) -> str:
    """Hash of a weights file: any change to it moves its cache namespace."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:VERSION_CHARS]
