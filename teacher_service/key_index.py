"""The cache's row index and spill space: numpy tables in unlinked temporary files, mapped into memory.

A namespace's index has one entry per row it serves, so it grows with the cache. Kept in the process's own memory it
would bound the cache by RAM; kept in a file mapping, its pages belong to the kernel's page cache, which keeps them
hot while memory allows and drops them (they are written back, never lost) when it does not. A table up to
`resident_bytes` (`cache_index_memory_bytes`) simply stays mapped. Past it, `KeyIndex.settle` hands the pages back
to the page cache once batches may have mapped that much, so the process's resident set stays flat however many rows
the cache holds; the price is a minor page fault per slot read after that (1.4 ms a 512-key lookup over 1M keys with a
1 MiB bound, 0.1 ms resident: `python scripts/key_index_cost.py`). Calls are split into pieces of keys that map at most
that much, so the bound holds within one call (a large request, start-up's build) too.

The files are unlinked at once: nothing is left behind after a crash, and nothing on disk is ever read back as an
index. Each start builds its index again from the store's verified keys.
"""

from __future__ import annotations

import contextlib
import mmap
import tempfile
from pathlib import Path

import numpy as np

from shared.hashing import KEY_BYTES

RESIDENT_BYTES = 256 << 20  # the most of an index's table kept resident (`cache_index_memory_bytes`)
_TOUCH_BYTES = 16 * mmap.PAGESIZE  # what one slot read may map: Linux maps a file page's cached neighbours too
_EMPTY, _DEAD = np.uint64(0), np.uint64(2**64 - 1)  # a slot's row column: no key / a key whose row was dropped


class FileBacked:
    """A zeroed numpy array in an unlinked temporary file under `folder` (the system's temp folder when None)."""

    def __init__(self, shape: tuple[int, ...], dtype, folder: Path | None = None):
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        with tempfile.TemporaryFile(dir=folder) as f:  # the mapping keeps the file alive; closing it unlinks nothing
            f.truncate(nbytes)
            self._map = mmap.mmap(f.fileno(), nbytes)
        self.array = np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def release(self) -> None:
        """Drop the pages from this process (a shared file mapping: their contents stay in the file)."""
        self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.array = None
        with contextlib.suppress(BufferError):  # a view of the array is still alive: the mapping goes when it does
            self._map.close()


class KeyIndex:
    """Row positions by whole 16-byte key: an open-addressing table with linear probing, at most half full.

    Each slot is (key's first 8 bytes, key's last 8 bytes, row + 1): 24 bytes, so 48 to 96 bytes a row, in a
    file-backed table (see the module docstring). Keys are blake2b output, uniformly spread, so the first 8 bytes pick
    the slot. The newest row of a key wins, as `cache=refresh` appends a key again. `drop` marks a key's slot dead (a
    row that failed its checks): it misses until the key is added again.
    """

    def __init__(self, capacity: int = 1024, folder: Path | None = None, resident_bytes: int = RESIDENT_BYTES):
        self._folder, self.resident_bytes = folder, resident_bytes
        self._file = FileBacked((_capacity(capacity), 3), np.uint64, folder)
        self.count = 0  # occupied slots, dead ones included
        self._touched = 0  # slots read or written since the pages were last handed back
        self._piece = max(256, resident_bytes // _TOUCH_BYTES)  # keys a call handles between settles

    @property
    def capacity(self) -> int:
        return len(self._file.array)

    @property
    def nbytes(self) -> int:
        return self._file.array.nbytes

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each (N, 16) uint8 key, -1 where none is held."""
        if len(keys) > self._piece:  # a piece at a time, settling between: the bound holds within a call too
            found = [self.find(keys[i : i + self._piece]) for i in range(0, len(keys), self._piece)]
            return np.concatenate(found)
        slots = self._slots_of(*_halves(keys))
        found = np.full(len(keys), -1, np.int64)
        held = slots >= 0
        rows = self._file.array[slots[held], 2]
        live = rows != _DEAD
        found[np.flatnonzero(held)[live]] = (rows[live] - np.uint64(1)).astype(np.int64)
        self.settle()
        return found

    def drop(self, keys: np.ndarray) -> None:
        slots = self._slots_of(*_halves(keys))
        self._file.array[slots[slots >= 0], 2] = _DEAD

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Point each key at its row; for a key given twice, at the later row."""
        if not len(keys):
            return
        if len(keys) > self._piece:  # in order, so the later row of a key still wins
            for i in range(0, len(keys), self._piece):
                self.add(keys[i : i + self._piece], np.asarray(rows)[i : i + self._piece])
            return
        whole = np.ascontiguousarray(keys, np.uint8).reshape(len(keys), KEY_BYTES).view(f"V{KEY_BYTES}").ravel()
        newest = len(whole) - 1 - np.unique(whole[::-1], return_index=True)[1]  # each distinct key's last occurrence
        lo, hi = _halves(keys[newest])
        values = np.asarray(rows)[newest].astype(np.uint64) + np.uint64(1)
        if 2 * (self.count + len(lo)) > self.capacity:  # rebuilt, dropped keys left out: sized by the live ones
            table = self._file.array
            live = int(((table[:, 2] != _EMPTY) & (table[:, 2] != _DEAD)).sum())
            self._grow(2 * (live + len(lo)))
        table = self._file.array
        mask = self.capacity - 1
        slots = (lo & np.uint64(mask)).astype(np.int64)
        todo = np.arange(len(lo))
        while todo.size:
            self._touched += len(todo)
            s = slots[todo]
            entry = table[s]
            occupied = entry[:, 2] != _EMPTY
            same = occupied & (entry[:, 0] == lo[todo]) & (entry[:, 1] == hi[todo])
            table[s[same], 2] = values[todo[same]]
            empty = np.flatnonzero(~occupied)
            claim = empty[np.unique(s[empty], return_index=True)[1]]  # one key per empty slot this round
            table[s[claim]] = np.stack([lo[todo[claim]], hi[todo[claim]], values[todo[claim]]], axis=1)
            self.count += len(claim)
            placed = same.copy()
            placed[claim] = True
            moving = ~placed & occupied  # the slot holds another key: probe on
            slots[todo[moving]] = (s[moving] + 1) & mask
            todo = todo[~placed]  # the rest: the next slot, or the same empty one claimed by another this round
        self.settle()

    def settle(self) -> None:
        """After a batch: once the pages touched since the last time may pass `resident_bytes`, hand them back to the
        page cache (a call over the whole table, so it is worth making only every few batches)."""
        if self.nbytes > self.resident_bytes and self._touched * _TOUCH_BYTES >= self.resident_bytes:
            self._file.release()
            self._touched = 0

    def close(self) -> None:
        self._file.close()

    def _slots_of(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The slot holding each key, -1 where none does."""
        table = self._file.array
        mask = self.capacity - 1
        found = np.full(len(lo), -1, np.int64)
        slots = (lo & np.uint64(mask)).astype(np.int64)
        todo = np.arange(len(lo))
        while todo.size:
            self._touched += len(todo)
            s = slots[todo]
            entry = table[s]
            occupied = entry[:, 2] != _EMPTY
            same = occupied & (entry[:, 0] == lo[todo]) & (entry[:, 1] == hi[todo])
            found[todo[same]] = s[same]
            todo = todo[occupied & ~same]  # another key's slot: probe on; an empty one ends the search
            slots[todo] = (slots[todo] + 1) & mask
        return found

    def _grow(self, at_least: int) -> None:
        old = self._file
        live = old.array[(old.array[:, 2] != _EMPTY) & (old.array[:, 2] != _DEAD)]
        self._file = FileBacked((_capacity(at_least), 3), np.uint64, self._folder)
        self.count = 0
        keys = np.ascontiguousarray(live[:, :2]).view(np.uint8).reshape(len(live), KEY_BYTES)
        self.add(keys, (live[:, 2] - np.uint64(1)).astype(np.int64))
        del live
        old.close()


def _capacity(at_least: int) -> int:
    return 1 << max(10, int(at_least - 1).bit_length())


def _halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 16) uint8 keys -> their first and last 8 bytes as two (N,) uint64."""
    halves = np.ascontiguousarray(keys, np.uint8).reshape(len(keys), KEY_BYTES).view("<u8")
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)
