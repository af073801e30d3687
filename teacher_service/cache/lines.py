"""The chunks of one namespace held in memory to serve hits, bounded by `memory_bytes` whatever the store holds."""

from __future__ import annotations

import numpy as np

from shared.hashing import KEY_BYTES
from teacher_service.cache.layout import CHECK_BYTES
from teacher_service.cache.rows import Rows


class ChunkLines:
    """Chunks read back from the store, held to serve hits: a direct-mapped table, chunk c in line c % `lines`, as many
    lines as `max_bytes` holds (at least one). One numpy gather serves every row already held, however many chunks a
    batch touches; only chunks not held cost a step each (a read from the store). The arrays are allocated zeroed, so
    lines never filled take no memory."""

    def __init__(self, max_bytes: int, chunk_rows: int, width: int, dtype: np.dtype):
        # bytes held per row: its key, stored logits, checksum and `checked` flag
        row = KEY_BYTES + width * dtype.itemsize + CHECK_BYTES + 1
        self.chunk_rows = chunk_rows
        self.lines = max(1, max_bytes // (chunk_rows * row))
        self.rows = Rows.empty(self.lines * chunk_rows, width, dtype)
        # verified against its checksum since read back
        self.checked = np.zeros(self.lines * chunk_rows, bool)
        # the chunk each line holds
        self.tag = np.full(self.lines, -1, np.int64)
        # chunks read from the store
        self.reads = 0

    def holds(self, chunks: np.ndarray) -> np.ndarray:
        return self.tag[chunks % self.lines] == chunks

    def free(self, chunks: np.ndarray) -> np.ndarray:
        """Whether each chunk's line holds nothing yet."""
        return self.tag[chunks % self.lines] < 0

    def slots(self, chunks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return (chunks % self.lines) * self.chunk_rows + offsets

    def put(self, chunk: int, rows: Rows, checked: bool) -> None:
        line = chunk % self.lines
        held = slice(line * self.chunk_rows, (line + 1) * self.chunk_rows)
        self.rows.put(held, rows)
        self.checked[held] = checked
        self.tag[line] = chunk

    def get(self, chunk: int) -> Rows | None:
        line = chunk % self.lines
        return (
            self.rows.select(slice(line * self.chunk_rows, (line + 1) * self.chunk_rows))
            if self.tag[line] == chunk
            else None
        )

    def drop(self, chunk: int) -> None:
        if self.tag[chunk % self.lines] == chunk:
            self.tag[chunk % self.lines] = -1
