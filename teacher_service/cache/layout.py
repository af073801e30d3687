"""What the cache writes on its store (any zarr store; a local folder by default), and the names it writes::

    <root>/                      attrs: format
      <member version>/          attrs: format, committed_rows, num_classes, dtype (row format), evicted_chunks
        keys    (N, 16) uint8    blake2b-128 of each input row (shared.hashing.row_keys)
        logits  (N, K) float32   that member's raw logits for the row; (N, W) in another row format's namespace,
                                 `<version>.float16` or `<version>.top<k>` (row_formats)
        checks  (N,)   uint64    blake2b-64 of (format, namespace, key, stored row) per row
      .damaged/                  (local folders) namespaces and root metadata set aside, kept for inspection

Rows form an append-only log. `committed_rows` is the only thing that makes rows visible, and is written after their
data. `evicted_chunks` lists whole chunks evicted (their files deleted after the record): not rows, not damage.
"""

from __future__ import annotations

from dataclasses import dataclass

import zarr

FORMAT = "akd-logit-cache/2"
COMMITTED = "committed_rows"
# [[first, stop), ...] chunk ranges evicted: not rows, not damage; their files are deleted
EVICTED = "evicted_chunks"
CHECK_BYTES = 8
DAMAGED_DIR = ".damaged"
# chunks stored as plain bytes, so a row can be read alone (chunk_files); none compress
RAW = {"compressors": None}


@dataclass
class Arrays:
    """One namespace's group and its three arrays, which share their chunking."""

    group: zarr.Group
    keys: zarr.Array
    logits: zarr.Array
    checks: zarr.Array

    def all(self) -> tuple[tuple[str, zarr.Array], ...]:
        return ("keys", self.keys), ("logits", self.logits), ("checks", self.checks)


def chunk_ranges(chunks: set[int]) -> list[list[int]]:
    """{0, 1, 2, 7} -> [[0, 3], [7, 8]]: a namespace's evicted chunks as its attributes keep them."""
    ranges: list[list[int]] = []
    for c in sorted(chunks):
        if ranges and ranges[-1][1] == c:
            ranges[-1][1] = c + 1
        else:
            ranges.append([c, c + 1])
    return ranges
