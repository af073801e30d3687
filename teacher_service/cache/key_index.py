"""The cache's row index and spill space: numpy tables in unlinked temporary files, mapped into memory.

A namespace's index has one entry per row it serves, so it grows with the cache. Kept in the process's own memory it
would bound the cache by RAM; kept in a file mapping, its pages belong to the kernel's page cache, which keeps them
hot while memory allows and drops them (they are written back, never lost) when it does not. A table up to
`resident_bytes` (`cache.index_memory_bytes`) simply stays mapped. Past it, lookups read the slots they need with
`pread` instead of through the mapping (a few slots a key, from the page cache: nothing is mapped, so nothing needs
handing back), and writes, which go through the mapping, are followed by `KeyIndex.settle`, which hands the pages back
to the page cache once batches may have mapped that much, so the process's resident set stays flat however many rows
the cache holds (`python scripts/key_index_cost.py` gives the cost of each way). Calls are split into pieces of keys
that map at most that much, so the bound holds within one call (a large request, start-up's build) too.

The files are unlinked at once: nothing is left behind after a crash, and nothing on disk is ever read back as an
index. Each start builds its index again from the store's verified keys.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from shared.hashing import KEY_BYTES
from teacher_service.cache.settings import RESIDENT_BYTES

# what one slot read may map: Linux maps a file page's cached neighbours too
_TOUCH_BYTES = 16 * mmap.PAGESIZE
# a slot: key's first 8 bytes, its last 8, row + 1, the row's checksum
_COLUMNS = 4
_SLOT_BYTES = _COLUMNS * 8
# slots one read brings in: in a table at most half full, a lookup rarely probes past them
_PROBE_SLOTS = 4
# then this many more, for the probes that went past those
_LONG_PROBE_SLOTS = 60
# a slot's row column: no key / a key whose row was dropped
_EMPTY, _DEAD = np.uint64(0), np.uint64(2**64 - 1)


class FileBacked:
    """A zeroed numpy array in an unlinked temporary file under `folder` (the system's temp folder when None)."""

    def __init__(self, shape: tuple[int, ...], dtype, folder: Path | None = None):
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        # unlinked already: the mapping and `fd` keep it alive
        with tempfile.TemporaryFile(dir=folder) as f:
            f.truncate(nbytes)
            self._map = mmap.mmap(f.fileno(), nbytes)
            # for reads that map nothing (a shared mapping and pread see the same pages)
            self.fd = os.dup(f.fileno())
        self.array = np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def release(self) -> None:
        """Drop the pages from this process (a shared file mapping: their contents stay in the file)."""
        self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.array = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # a view of the array is still alive: the mapping goes when it does
        with contextlib.suppress(BufferError):
            self._map.close()


class KeyIndex:
    """Row positions by whole 16-byte key: an open-addressing table with linear probing, at most half full.

    Each slot is (key's first 8 bytes, key's last 8 bytes, row + 1, the row's checksum): 32 bytes, so 64 to 128 bytes
    a row, in a file-backed table (see the module docstring). The checksum is the one the cache verified or computed
    when it indexed the row, so a row read back alone can be checked without reading its stored checksum too. Keys
    are blake2b output, uniformly spread, so the first 8 bytes pick the slot. The newest row of a key wins, as
    `cache=refresh` appends a key again. `drop` marks a key's slot dead (a row that failed its checks): it misses
    until the key is added again.
    """

    def __init__(self, capacity: int = 1024, folder: Path | None = None, resident_bytes: int = RESIDENT_BYTES):
        self._folder, self.resident_bytes = folder, resident_bytes
        self._file = FileBacked((_capacity(capacity), _COLUMNS), np.uint64, folder)
        # occupied slots, dead ones included
        self.count = 0
        # slots read or written since the pages were last handed back
        self._touched = 0
        # keys a call handles between settles
        self._piece = max(256, resident_bytes // _TOUCH_BYTES)

    @property
    def capacity(self) -> int:
        return len(self._file.array)

    @property
    def nbytes(self) -> int:
        return self._file.array.nbytes

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The row of each (N, 16) uint8 key, -1 where none is held."""
        return self.locate(keys)[0]

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The row of each (N, 16) uint8 key, -1 where none is held, and the checksum it was indexed with."""
        # a piece at a time, settling between: the bound holds within a call too
        if len(keys) > self._piece:
            parts = [self.locate(keys[i : i + self._piece]) for i in range(0, len(keys), self._piece)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        lo, hi = _halves(keys)
        if self.nbytes > self.resident_bytes:
            slots, entries = self._read_slots(lo, hi)
            held = slots >= 0
            entries = entries[held]
        else:
            slots = self._slots_of(lo, hi)
            held = slots >= 0
            entries = self._file.array[slots[held], 2:]
        found, checks = np.full(len(keys), -1, np.int64), np.zeros(len(keys), np.uint64)
        live = entries[:, 0] != _DEAD
        at = np.flatnonzero(held)[live]
        found[at] = (entries[live, 0] - np.uint64(1)).astype(np.int64)
        checks[at] = entries[live, 1]
        self.settle()
        return found, checks

    def drop(self, keys: np.ndarray) -> None:
        slots = self._slots_of(*_halves(keys))
        self._file.array[slots[slots >= 0], 2] = _DEAD

    def add(self, keys: np.ndarray, rows: np.ndarray, checks: np.ndarray | None = None) -> None:
        """Point each key at its row (and its checksum: 0 where none is given); for a key given twice, the later."""
        if not len(keys):
            return
        checks = np.zeros(len(keys), np.uint64) if checks is None else np.asarray(checks, np.uint64)
        # in order, so the later row of a key still wins
        if len(keys) > self._piece:
            for i in range(0, len(keys), self._piece):
                self.add(keys[i : i + self._piece], np.asarray(rows)[i : i + self._piece], checks[i : i + self._piece])
            return
        whole = np.ascontiguousarray(keys, np.uint8).reshape(len(keys), KEY_BYTES).view(f"V{KEY_BYTES}").ravel()
        # each distinct key's last occurrence
        newest = len(whole) - 1 - np.unique(whole[::-1], return_index=True)[1]
        lo, hi = _halves(keys[newest])
        values = np.asarray(rows)[newest].astype(np.uint64) + np.uint64(1)
        sums = checks[newest]
        # rebuilt, dropped keys left out: sized by the live ones
        if 2 * (self.count + len(lo)) > self.capacity:
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
            table[s[same], 3] = sums[todo[same]]
            empty = np.flatnonzero(~occupied)
            # one key per empty slot this round
            claim = empty[np.unique(s[empty], return_index=True)[1]]
            claimed = todo[claim]
            table[s[claim]] = np.stack([lo[claimed], hi[claimed], values[claimed], sums[claimed]], axis=1)
            self.count += len(claim)
            placed = same.copy()
            placed[claim] = True
            # the slot holds another key: probe on
            moving = ~placed & occupied
            slots[todo[moving]] = (s[moving] + 1) & mask
            # the rest: the next slot, or the same empty one claimed by another this round
            todo = todo[~placed]
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
        """The slot holding each key, -1 where none does. Probes are read a window at a time, all keys at once: the
        first `_PROBE_SLOTS` slots (in a table at most half full, most probes end there), then `_LONG_PROBE_SLOTS`
        more for the few that go on, then slot by slot for any longer still."""
        mask = self.capacity - 1
        first = (lo & np.uint64(mask)).astype(np.int64)
        found, ended = self._window(lo, hi, first, _PROBE_SLOTS)
        rest = np.flatnonzero(~ended)
        if len(rest):
            start = (first[rest] + _PROBE_SLOTS) & mask
            found[rest], ended[rest] = self._window(lo[rest], hi[rest], start, _LONG_PROBE_SLOTS)
            longer = rest[~ended[rest]]
            if len(longer):
                found[longer] = self._probe(
                    lo[longer], hi[longer], (first[longer] + _PROBE_SLOTS + _LONG_PROBE_SLOTS) & mask
                )
        return found

    def _window(self, lo: np.ndarray, hi: np.ndarray, start: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Each key's slot among the `width` slots from `start` (-1 where not there), and whether its probe ended
        there (at its key, or at an empty slot)."""
        window = (start[:, None] + np.arange(width)) & (self.capacity - 1)
        self._touched += window.size
        ended, step, hit = _probe_ends(self._file.array[window], lo, hi)
        return np.where(hit, window[np.arange(len(lo)), step], -1), ended

    def _probe(self, lo: np.ndarray, hi: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The slot holding each key, -1 where none does, probing on from `slots`, one slot a round."""
        table = self._file.array
        mask = self.capacity - 1
        found = np.full(len(lo), -1, np.int64)
        todo = np.arange(len(lo))
        while todo.size:
            self._touched += len(todo)
            s = slots[todo]
            entry = table[s]
            occupied = entry[:, 2] != _EMPTY
            same = occupied & (entry[:, 0] == lo[todo]) & (entry[:, 1] == hi[todo])
            found[todo[same]] = s[same]
            # another key's slot: probe on; an empty one ends the search
            todo = todo[occupied & ~same]
            slots[todo] = (slots[todo] + 1) & mask
        return found

    def _read_slots(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like `_slots_of`, with each slot's (row, checksum) columns, read with one `pread` of `_PROBE_SLOTS` slots a
        key instead of through the mapping. Keys whose probe runs past those slots (or the table's end) take
        `_slots_of`."""
        first = (lo & np.uint64(self.capacity - 1)).astype(np.int64)
        found, rows = np.full(len(lo), -1, np.int64), np.zeros((len(lo), 2), np.uint64)
        near = first <= self.capacity - _PROBE_SLOTS
        at = np.flatnonzero(near)
        span, fd = _PROBE_SLOTS * _SLOT_BYTES, self._file.fd
        data = b"".join([os.pread(fd, span, s * _SLOT_BYTES) for s in first[at].tolist()])
        entries = np.frombuffer(data, np.uint64).reshape(len(at), _PROBE_SLOTS, _COLUMNS)
        ended, step, hit = _probe_ends(entries, lo[at], hi[at])
        found[at[hit]] = first[at[hit]] + step[hit]
        rows[at[hit]] = entries[np.flatnonzero(hit), step[hit], 2:]
        rest = np.concatenate([np.flatnonzero(~near), at[~ended]])
        if len(rest):
            found[rest] = self._slots_of(lo[rest], hi[rest])
            rows[rest[found[rest] >= 0]] = self._file.array[found[rest][found[rest] >= 0], 2:]
        return found, rows

    def _grow(self, at_least: int) -> None:
        old = self._file
        live = old.array[(old.array[:, 2] != _EMPTY) & (old.array[:, 2] != _DEAD)]
        self._file = FileBacked((_capacity(at_least), _COLUMNS), np.uint64, self._folder)
        self.count = 0
        keys = np.ascontiguousarray(live[:, :2]).view(np.uint8).reshape(len(live), KEY_BYTES)
        self.add(keys, (live[:, 2] - np.uint64(1)).astype(np.int64), live[:, 3])
        del live
        old.close()


def _capacity(at_least: int) -> int:
    return 1 << max(10, int(at_least - 1).bit_length())


def _probe_ends(entries: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each key's run of slots (N, W, columns): whether its probe ends in the run (at its key or at an empty
    slot), the step where it does, and whether that slot holds the key."""
    empty = entries[:, :, 2] == _EMPTY
    same = ~empty & (entries[:, :, 0] == lo[:, None]) & (entries[:, :, 1] == hi[:, None])
    ends = same | empty
    ended, step = ends.any(axis=1), ends.argmax(axis=1)
    return ended, step, ended & same[np.arange(len(lo)), step]


def _halves(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 16) uint8 keys -> their first and last 8 bytes as two (N,) uint64."""
    halves = np.ascontiguousarray(keys, np.uint8).reshape(len(keys), KEY_BYTES).view("<u8")
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)
