"""One member version's namespace: its key index, its chunked append log, and its rows not yet on the store.

Crash safety rests on three rules: one writer thread per store; rows are buffered and written as whole chunks (each
chunk write replaces one object atomically, as zarr's LocalStore and object stores do); and `committed_rows`, the only
thing that makes rows visible, is written after their data. A `kill -9` therefore loses at most the buffered rows,
which are recomputable. A write that fails marks the namespace broken (nothing more is committed there); one that
fails for lack of space (ENOSPC, EDQUOT) also marks the size budget full: rows are still served, no longer stored,
until a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zarr.core.sync import sync

from shared.hashing import KEY_BYTES
from teacher_service.cache.budget import CacheBudget, out_of_space
from teacher_service.cache.durable import sync_attributes, sync_chunk, sync_commit
from teacher_service.cache.key_index import KeyIndex
from teacher_service.cache.layout import COMMITTED, EVICTED, chunk_ranges
from teacher_service.cache.reads import Batch, ChunkReader
from teacher_service.cache.row_formats import storable
from teacher_service.cache.rows import Rows, key_array, row_bytes, row_checks
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.verify import Damage, Header

log = logging.getLogger("akd.cache")

# a chunk's last use when it cannot be evicted (evicted already, or not committed)
NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class StoreShared:
    """What every namespace of one store shares: its settings, its one writer thread, its size budget, the clock of
    chunk uses (one clock, so that eviction compares chunks across namespaces), the record of damage by version, and
    the store's folder where writes are fsynced (`durable` on a local folder; None otherwise)."""

    settings: CacheSettings
    writer: ThreadPoolExecutor
    budget: CacheBudget
    tick: Callable[[], int]
    damage: dict[str, Damage]
    durable_root: Path | None = None

    def durable_folder(self, version: str) -> Path | None:
        return self.durable_root / version if self.durable_root is not None else None


class MemberCache:
    """One member version's namespace.

    Rows live in three places, by chunk: the chunk being filled (`_tail`) and the chunks handed to the writer and not
    yet committed (`_pending`) are held here; every committed whole chunk is read back from the store (`ChunkReader`),
    and each row is checked against its checksum and its key before it is served, so a chunk damaged after start-up is
    never served either: its rows are dropped from the index (recomputed on their next request) and counted as damaged.
    All reads and inserts happen on the one thread that owns the cache (the package docstring); the writer thread
    alone writes the store.
    """

    def __init__(self, version: str, header: Header, tail: Rows, index: KeyIndex, shared: StoreShared):
        """`header`: the namespace as inspected (or just made); `tail`: its last, partial chunk's rows, `chunk_rows`
        long; `index`: its key index, holding every row it serves."""
        arrays, committed = header.arrays, header.committed
        self.version, self.fmt, self.num_classes = version, header.fmt, header.num_classes
        self._arrays, self._writer, self._budget = arrays, shared.writer, shared.budget
        # set when durable: fsync the namespace's files in this folder
        self._folder = shared.durable_folder(version)
        self.chunk_rows = arrays.logits.chunks[0]
        self._reader = ChunkReader(
            version, header.fmt, header.num_classes, arrays, shared.settings.memory_bytes, header.evicted
        )
        self.committed = committed
        # set after a failed write: nothing more is committed here
        self.broken = False
        self.write_errors = 0
        self.damage = shared.damage.setdefault(version, Damage())
        # rows held: committed or buffered
        self.rows = committed
        # chunks never to be rewritten
        self._whole_chunks = committed // self.chunk_rows
        # rows handed to the writer so far
        self._submitted = committed
        # the chunk being filled, `chunk_rows` long: rows [_whole_chunks * chunk_rows, rows)
        self._tail = tail
        # whole chunks handed to the writer, not yet committed
        self._pending: dict[int, tuple[Rows, Future]] = {}
        self._index = index
        self._tick = shared.tick
        # what the writer records; replaced whole, never mutated
        self._evicted_attr = chunk_ranges(self._reader.evicted)
        # rows evicted since start-up
        self.evicted_rows = 0
        # each chunk's last use (a tick of the store's clock; NEVER where it cannot be evicted): at start-up the
        # oldest chunks count as the least recently used
        whole = self._whole_chunks
        self._used = np.full(max(16, 2 * whole), NEVER, np.int64)
        self._used[:whole] = np.arange(whole) - whole
        self._used[list(self._reader.evicted)] = NEVER

    def lookup(self, keys: list[bytes]) -> np.ndarray:
        """Row positions of the keys, -1 where absent (the index only: nothing is read)."""
        if not keys:
            return np.zeros(0, np.int64)
        positions = self._index.find(key_array(keys))
        self._index.settle()
        return positions

    def get(self, keys: list[bytes] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which keys (16 bytes each, or their (N, 16) uint8 array) are held, and their logits as float32
        (found rows x K), each row checked before it is served."""
        wanted = key_array(keys)
        positions, indexed = (
            self._index.locate(wanted) if len(wanted) else (np.zeros(0, np.int64), np.zeros(0, np.uint64))
        )
        found = positions >= 0
        at = np.flatnonzero(found)
        logits = np.empty((len(at), self.num_classes), np.float32)
        good = np.ones(len(at), bool)
        self._retire_written()
        chunk_of = positions[at] // self.chunk_rows
        offset = positions[at] - chunk_of * self.chunk_rows
        batch = Batch(chunk_of, offset, wanted[at], indexed[at], logits, good)
        # rows of the tail or of a pending chunk: not on the store yet, served from memory
        here = chunk_of == self._whole_chunks
        if self._pending:
            here |= np.isin(chunk_of, list(self._pending))
        self._reader.serve(np.flatnonzero(~here), batch)
        for chunk in np.unique(chunk_of[here]):
            group = np.flatnonzero(chunk_of == chunk)
            rows = self._tail if chunk == self._whole_chunks else self._pending[chunk][0]
            sound = rows.keys[offset[group]] == batch.keys[group]
            self._reader.deliver(batch, group, rows.logits[offset[group]], sound)
        used = chunk_of[chunk_of < self._whole_chunks]
        self._used[used] = self._tick()
        if not good.all():
            lost = at[~good]
            self._index.drop(wanted[lost])
            self.damage.rows += len(lost)
            found[lost] = False
        self._index.settle()
        return found, logits[good]

    def _rows_of(self, chunk: int) -> Rows | None:
        """A whole chunk's rows, wherever they are (eviction wants its keys)."""
        if chunk in self._pending:
            return self._pending[chunk][0]
        return self._reader.held(chunk)

    def _retire_written(self) -> None:
        """Chunks the writer has committed leave `_pending` for the chunk lines (they are likely asked for soon, and
        need no check: this process computed them). After a failed write they stay here."""
        for chunk in [c for c in self._pending if (c + 1) * self.chunk_rows <= self.committed]:
            rows, _ = self._pending.pop(chunk)
            self._reader.lines.put(chunk, rows, checked=True)

    def insert(self, keys: list[bytes], logits: np.ndarray) -> int:
        """Append rows (newest wins on lookup); returns how many the size bound let in. A row the format cannot hold
        (a logit past float16's range) is not stored: it is recomputed when asked again."""
        stored = self.fmt.encode(np.asarray(logits, np.float32))
        fits = storable(self.fmt, stored, self.num_classes)
        if not fits.all():
            keys, stored = [k for k, ok in zip(keys, fits) if ok], stored[fits]
        return self.append(keys, stored)

    def append(self, keys: list[bytes], stored: np.ndarray) -> int:
        """Append rows already in this namespace's format (salvaged ones, on start-up)."""
        n = self._budget.grant(len(keys), row_bytes(self.num_classes, self.fmt)) if not self.broken else 0
        if n == 0:
            return 0
        self._retire_written()
        new = Rows(key_array(keys[:n]), np.asarray(stored[:n], self.fmt.dtype), np.zeros(n, np.uint64))
        new.checks[:] = row_checks(self.version, new.keys, new.logits)
        first = self.rows
        done = 0
        while done < n:
            offset = self.rows - self._whole_chunks * self.chunk_rows
            take = min(n - done, self.chunk_rows - offset)
            self._tail.put(slice(offset, offset + take), new.select(slice(done, done + take)))
            self.rows += take
            done += take
            if offset + take == self.chunk_rows:
                self._seal_tail()
        self._index.add(new.keys, np.arange(first, first + n), new.checks)
        self._index.settle()
        return n

    def _seal_tail(self) -> None:
        """The tail chunk is full: hand it to the writer, whole, and start the next."""
        chunk = self._whole_chunks
        future = self._submit_chunk(chunk, self._tail, committed=(chunk + 1) * self.chunk_rows)
        self._pending[chunk] = (self._tail, future)
        if chunk >= len(self._used):
            self._used = np.concatenate([self._used, np.full(len(self._used), NEVER, np.int64)])
        self._used[chunk] = self._tick()
        self._whole_chunks += 1
        self._tail = Rows.empty(self.chunk_rows, self._arrays.logits.shape[1], self.fmt.dtype)

    def flush(self) -> Future | None:
        """Write the partial tail chunk (padded; rewritten whole once it fills)."""
        if self.rows > self._submitted:
            tail = Rows(self._tail.keys.copy(), self._tail.logits.copy(), self._tail.checks.copy())
            return self._submit_chunk(self._whole_chunks, tail, committed=self.rows)
        return None

    def oldest(self) -> tuple[int, int] | None:
        """(last use, chunk) of the least recently used whole chunk (the tail is never evicted)."""
        whole = self._whole_chunks
        if not whole:
            return None
        chunk = int(np.argmin(self._used[:whole]))
        used = int(self._used[chunk])
        return None if used == NEVER else (used, chunk)

    def evict(self, chunk: int) -> int:
        """Take a committed chunk out (its rows miss from now on) and have the writer record it, then delete its
        files; returns the bytes freed."""
        held = self._rows_of(chunk)
        if held is not None:
            keys = held.keys
            # keys whose newest row is still in this chunk (not added again since)
            still = self._index.find(keys) == chunk * self.chunk_rows + np.arange(len(keys))
            self._index.drop(keys[still])
        self._reader.forget(chunk)
        # a pending chunk needs no cancelling: the writer writes it, then deletes it, in that order
        self._pending.pop(chunk, None)
        self._evicted_attr = chunk_ranges(self._reader.evicted)
        self._used[chunk] = NEVER
        self.evicted_rows += self.chunk_rows
        self._writer.submit(self._delete_chunk, chunk)
        freed = self.chunk_rows * row_bytes(self.num_classes, self.fmt)
        self._budget.release(freed)
        return freed

    def _delete_chunk(self, chunk: int) -> None:
        """Writer thread: the record first, then the files, so a file is never gone while the record still counts
        its rows (a crash in between leaves files nothing reads)."""
        a = self._arrays
        try:
            a.group.update_attributes({EVICTED: self._evicted_attr})
            if self._folder is not None:
                sync_attributes(self._folder)
            for _, array in a.all():
                coords = (chunk,) + (0,) * (array.ndim - 1)
                sync(array.store.delete(f"{array.path}/{array.metadata.encode_chunk_key(coords)}"))
        except Exception:  # noqa: BLE001  (the rows are out of the index either way; the files may stay)
            log.exception(
                "cache namespace %s: evicting chunk %d did not finish; its files may stay", self.version, chunk
            )

    @property
    def live_rows(self) -> int:
        """Rows held (committed or buffered), those evicted left out."""
        return self.rows - len(self._reader.evicted) * self.chunk_rows

    @property
    def chunk_reads(self) -> int:
        """Chunks read back from the store since start-up."""
        return self._reader.lines.reads

    @property
    def row_reads(self) -> int:
        """Rows read alone from their chunk files since start-up."""
        return self._reader.row_reads

    def close(self) -> None:
        self._index.close()
        self._reader.close()

    def _submit_chunk(self, chunk: int, rows: Rows, committed: int) -> Future:
        self._submitted = committed
        return self._writer.submit(self._write_chunk, chunk, chunk * self.chunk_rows, rows, committed)

    def _write_chunk(self, chunk: int, start: int, rows: Rows, committed: int) -> None:
        """Writer thread: data first (fsynced when durable), then the count that makes it visible."""
        if self.broken:
            return
        a = self._arrays
        try:
            stop = start + len(rows.keys)
            resized = a.logits.shape[0] < stop
            if resized:
                a.logits.resize((stop, a.logits.shape[1]))
                a.keys.resize((stop, KEY_BYTES))
                a.checks.resize((stop,))
            a.logits[start:stop] = rows.logits
            a.keys[start:stop] = rows.keys
            a.checks[start:stop] = rows.checks
            if self._folder is not None:
                sync_chunk(self._folder, a, chunk, resized)
            a.group.update_attributes({COMMITTED: committed, EVICTED: self._evicted_attr})
            if self._folder is not None:
                sync_commit(self._folder)
            self.committed = committed
        except Exception as exc:
            self.broken = True
            self.write_errors += 1
            if out_of_space(exc):
                self._budget.disk_full(str(self._folder or a.group.store))
            log.exception(
                "cache namespace %s: write failed; rows past %d stay in memory only", self.version, self.committed
            )
