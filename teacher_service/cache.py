"""A crash-safe, self-verifying zarr v3 cache of member logits, keyed by input-row content hashes.

Layout (any zarr store; a local folder by default)::

    <root>/                      attrs: format
      <member version>/          attrs: format, committed_rows, num_classes, dtype (row format), evicted_chunks
        keys    (N, 16) uint8    blake2b-128 of each input row (shared.hashing.row_keys)
        logits  (N, K) float32   that member's raw logits for the row; (N, W) in another row format's namespace,
                                 `<version>.float16` or `<version>.top<k>` (row_formats)
        checks  (N,)   uint64    blake2b-64 of (format, namespace, key, stored row) per row
      .damaged/                  (local folders) namespaces and root metadata set aside, kept for inspection

Rows form an append-only log: the key index maps a key to its newest row.
Crash safety rests on three rules: one writer thread; rows are buffered and
written as whole chunks (each chunk write replaces one object atomically, as
zarr's LocalStore and object stores do); and `committed_rows`, the only thing
that makes rows visible, is written after their data. A `kill -9` therefore loses
at most the buffered rows, which are recomputable.

Nothing on the store is trusted: the cache is recomputable, so damage costs
recomputation, never a wrong answer and never a service that cannot start.

- Every row carries a checksum over its key, its logits and its namespace's name,
  so a flipped bit, a chunk read back as zeros (deleted), chunks swapped within or
  between namespaces, or a chunk that no longer decompresses all fail. Rows are
  verified when a namespace is loaded, and again, with their key, whenever they
  are read back from the store: a row read alone is checked each time it is read
  (against the checksum its key index holds), a row of a chunk read whole the
  first time it is served from that chunk's line. A chunk damaged while the
  service runs costs its rows a recomputation too (`MemberCache.get`).
- A namespace whose structure fails its checks (unreadable `zarr.json`, a missing
  or odd array, `committed_rows` not an integer in [0, rows the arrays hold], an
  older format without checksums) is set aside at start-up and rebuilt empty when
  served. A namespace with rows that fail is set aside when loaded and rebuilt
  from the rows that verified, written again chunk by chunk before serving starts;
  the failed rows are recomputed on their next request. A root whose `zarr.json`
  is unreadable has that file set aside; its namespaces are judged one by one.
  "Set aside" means renamed into `<folder>/.damaged/<name>-<time>` for a local
  folder (kept until you delete it; not counted against `max_bytes`), and deleted
  on any other store, which cannot keep a copy. Each case is logged as a warning
  naming the namespace, the chunks/rows and where it went, and counted in
  `damage` (`akd_cache_damaged_rows`, `akd_cache_damaged_namespaces`).
- With `durable`, a local folder's chunk files (and their folders, and the
  arrays' metadata after a resize) are fsynced before `committed_rows` is
  written, and the attributes file after: a power loss then loses at most the
  buffered rows too. Without it, a power loss may leave torn or empty chunk
  files, which the checks above catch. Other stores rely on their own durability.
- A write that fails for lack of space (ENOSPC, EDQUOT) marks the size budget
  full: rows are still served, no longer stored, until a restart.

Size: past `max_bytes`, the least recently used whole chunks of the served
namespaces are evicted (`evict`): recorded in `evicted_chunks` first, their
files deleted after, so a crash in between leaves files nothing reads. Without
`evict`, inserts stop instead.

Memory does not grow with the store: the key index lives in a file-backed table
(key_index), and hits are read back from the store through a bounded table of
chunks (`ChunkLines`, `memory_bytes` per namespace). Chunks are written raw (no
compressor: hashes and checksums do not compress, logits little), so where a chunk's line
is taken and a batch wants few of its rows, each row is read alone by byte range
from a local folder's chunk files (chunk_files) instead of reading the chunk whole;
namespaces written compressed by earlier versions are still read whole through zarr.
Only the chunk being filled and the chunks not yet committed are held otherwise.

All reads and inserts happen on the inference thread; the writer thread is the
only one that writes the store after start-up, and the inference thread reads
committed chunks only.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, StoreLike

from shared.hashing import KEY_BYTES
from teacher_service.cache_location import cache_location
from teacher_service.chunk_files import ChunkFiles
from teacher_service.folder_lock import StoreLocked, lock_folder
from teacher_service.key_index import RESIDENT_BYTES, FileBacked, KeyIndex
from teacher_service.row_formats import FLOAT32, RowFormat, row_format, storable

log = logging.getLogger("akd.cache")

FORMAT = "akd-logit-cache/2"
COMMITTED = "committed_rows"
EVICTED = "evicted_chunks"  # [[first, stop), ...] chunk ranges evicted: not rows, not damage; their files are deleted
NEVER = np.iinfo(np.int64).max  # a chunk's last use when it cannot be evicted (evicted already, or not committed)
CHECK_BYTES = 8
DAMAGED_DIR = ".damaged"
RAW = {"compressors": None}  # chunks stored as plain bytes, so a row can be read alone (chunk_files); none compress
READ_BLOCK_CHUNKS = 64  # chunks read at once when verifying; a block that fails is read again chunk by chunk
MEMORY_BYTES = 256 << 20  # decoded chunks kept for hits, per namespace (`cache_memory_bytes`), whatever the store holds
ROW_READ_ARRAYS = ("logits",)  # what a row read alone reads: its logits only, for its key index holds its checksum
WHOLE_CHUNK_SHARE = 16  # a chunk of which a batch asks for 1/16 of the rows or more is read whole, not row by row


def namespace_name(version: str, store: str = "float32") -> str:
    """A member version's namespace for a row format (row_formats): rows of one format never mix with another's."""
    return version if store == "float32" else f"{version}.{store}"


def row_bytes(num_classes: int, fmt: RowFormat = FLOAT32) -> int:
    return fmt.width(num_classes) * fmt.dtype.itemsize + KEY_BYTES + CHECK_BYTES


def row_checks(version: str, keys: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """One blake2b-64 per row over (format, namespace, key bytes, stored logits bytes, little-endian).

    The key ties the logits to their input and the namespace ties them to their member
    version, so a row moved anywhere else (swapped or copied chunks) fails like a damaged one.
    """
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


class CacheBudget:
    """The size bound, shared by every namespace: past it, `evict` makes room (the least recently used chunks of the
    served namespaces go), or, without it or when nothing more can go, inserts stop."""

    def __init__(self, max_bytes: int, used_bytes: int = 0, evict: Callable[[int], int] | None = None):
        self.max_bytes = max_bytes
        self.used_bytes = used_bytes
        self.evict = evict  # bytes wanted -> bytes freed
        self.full = False
        self.out_of_space = False

    def grant(self, rows: int, bytes_per_row: int) -> int:
        """How many of `rows` fit, after evicting where allowed; records them as used."""
        if self.out_of_space:
            return 0
        fit = min(rows, max(0, (self.max_bytes - self.used_bytes) // bytes_per_row))
        if fit < rows and self.evict is not None:
            self.evict((rows - fit) * bytes_per_row)
            fit = min(rows, max(0, (self.max_bytes - self.used_bytes) // bytes_per_row))
        self.used_bytes += fit * bytes_per_row
        if fit < rows and not self.full:
            self.full = True
            log.warning(
                "cache is full (%d of %d bytes): new rows are served but no longer stored",
                self.used_bytes,
                self.max_bytes,
            )
        return fit

    def release(self, nbytes: int) -> None:
        self.used_bytes = max(0, self.used_bytes - nbytes)

    def disk_full(self, store: str) -> None:
        """A write failed for lack of space: the store cannot take more, whatever the bound says."""
        if not self.out_of_space:
            self.out_of_space = self.full = True
            log.warning(
                "cache store %s is out of disk space: new rows are served but no longer stored until a restart", store
            )


def _out_of_space(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception, its causes, contexts or groups (zarr may wrap the OSError)."""
    seen, pending = set(), [exc]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        pending += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Arrays:
    group: zarr.Group
    keys: zarr.Array
    logits: zarr.Array
    checks: zarr.Array

    def all(self) -> tuple[tuple[str, zarr.Array], ...]:
        return ("keys", self.keys), ("logits", self.logits), ("checks", self.checks)


@dataclass
class _Header:
    """A namespace whose metadata passed its checks; its rows are verified when it is loaded."""

    arrays: _Arrays
    committed: int
    num_classes: int
    fmt: RowFormat = FLOAT32
    evicted: frozenset[int] = frozenset()  # whole chunks

    @property
    def live_rows(self) -> int:
        """Committed rows not evicted."""
        return self.committed - len(self.evicted) * self.arrays.keys.chunks[0]

    @property
    def nbytes(self) -> int:
        return self.live_rows * row_bytes(self.num_classes, self.fmt)


@dataclass
class _Rows:
    keys: np.ndarray
    logits: np.ndarray
    checks: np.ndarray

    @classmethod
    def empty(cls, n: int, width: int, dtype: np.dtype) -> _Rows:
        """`width` stored fields a row (the number of classes for float rows; see row_formats)."""
        return cls(np.zeros((n, KEY_BYTES), np.uint8), np.zeros((n, width), dtype), np.zeros(n, np.uint64))

    def select(self, which) -> _Rows:
        return _Rows(self.keys[which], self.logits[which], self.checks[which])

    def put(self, where, rows: _Rows) -> None:
        self.keys[where], self.logits[where], self.checks[where] = rows.keys, rows.logits, rows.checks


@dataclass
class Damage:
    """What one namespace lost this run: rows that failed (or were set aside unread), and where they went."""

    rows: int = 0
    namespaces: int = 0
    places: list[str] = field(default_factory=list)


class NamespaceDamaged(Exception):
    """A namespace's metadata fails its checks; `rows` is how many it held, where that can be told."""

    def __init__(self, reason: str, rows: int = 0):
        super().__init__(reason)
        self.rows = rows


def _checked_array(group, name: str, dtype: np.dtype, tail: tuple, committed: int, keys) -> zarr.Array:
    """One of a namespace's arrays, if its metadata is what the format says (`keys`: the keys array, checked first,
    whose chunking every other array shares); else NamespaceDamaged."""
    try:
        array = group[name]
    except Exception as exc:  # noqa: BLE001  (hostile metadata: any failure means damaged)
        raise NamespaceDamaged(f"array {name} unreadable ({type(exc).__name__}: {exc})", rows=committed) from None
    if not isinstance(array, zarr.Array) or array.dtype != dtype or array.shape[1:] != tail or array.chunks[1:] != tail:
        raise NamespaceDamaged(
            f"array {name} is not ({'N, ' + ', '.join(map(str, tail)) if tail else 'N,'}) {dtype}",
            rows=committed,
        )
    if keys is not None and array.chunks[0] != keys.chunks[0]:
        raise NamespaceDamaged(
            f"array {name} has chunks of {array.chunks[0]} rows, keys of {keys.chunks[0]}",
            rows=committed,
        )
    if array.shape[0] < committed:
        raise NamespaceDamaged(f"committed_rows is {committed}, more than the {array.shape[0]} rows of array {name}")
    return array


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ChunkLines:
    """Chunks read back from the store, held to serve hits: a direct-mapped table, chunk c in line c % `lines`, as many
    lines as `max_bytes` holds (at least one). One numpy gather serves every row already held, however many chunks a
    batch touches; only chunks not held cost a step each (a read from the store). The arrays are allocated zeroed, so
    lines never filled take no memory."""

    def __init__(self, max_bytes: int, chunk_rows: int, width: int, dtype: np.dtype):
        row = KEY_BYTES + width * dtype.itemsize + CHECK_BYTES + 1  # + its `checked` flag
        self.chunk_rows = chunk_rows
        self.lines = max(1, max_bytes // (chunk_rows * row))
        self.rows = _Rows.empty(self.lines * chunk_rows, width, dtype)
        self.checked = np.zeros(self.lines * chunk_rows, bool)  # verified against its checksum since read back
        self.tag = np.full(self.lines, -1, np.int64)  # the chunk each line holds
        self.reads = 0  # chunks read from the store

    def holds(self, chunks: np.ndarray) -> np.ndarray:
        return self.tag[chunks % self.lines] == chunks

    def free(self, chunks: np.ndarray) -> np.ndarray:
        """Whether each chunk's line holds nothing yet."""
        return self.tag[chunks % self.lines] < 0

    def slots(self, chunks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return (chunks % self.lines) * self.chunk_rows + offsets

    def put(self, chunk: int, rows: _Rows, checked: bool) -> None:
        line = chunk % self.lines
        held = slice(line * self.chunk_rows, (line + 1) * self.chunk_rows)
        self.rows.put(held, rows)
        self.checked[held] = checked
        self.tag[line] = chunk

    def get(self, chunk: int) -> _Rows | None:
        line = chunk % self.lines
        return (
            self.rows.select(slice(line * self.chunk_rows, (line + 1) * self.chunk_rows))
            if self.tag[line] == chunk
            else None
        )

    def drop(self, chunk: int) -> None:
        if self.tag[chunk % self.lines] == chunk:
            self.tag[chunk % self.lines] = -1


@dataclass
class _Batch:
    """The found rows of one `get`: where each lives, the key it must carry, the checksum it was indexed with, and what
    is served (filled in)."""

    chunk_of: np.ndarray
    offset: np.ndarray
    keys: np.ndarray
    checks: np.ndarray
    logits: np.ndarray
    good: np.ndarray


class MemberCache:
    """One member version's namespace: its key index, its chunked append log, and its rows not yet on the store.

    Rows live in three places, by chunk: the chunk being filled (`_tail`) and the chunks handed to the writer and not
    yet committed (`_pending`) are held here; every committed whole chunk is read back from the store into this
    namespace's `ChunkLines`, and each row is checked against its checksum and its key the first time it is served
    from a chunk read back, so a chunk damaged after start-up is never served either: its rows are dropped from the
    index (recomputed on their next request) and counted as damaged.
    """

    def __init__(
        self,
        version: str,
        fmt: RowFormat,
        num_classes: int,
        arrays: _Arrays,
        committed: int,
        tail: _Rows,
        index: KeyIndex,
        memory_bytes: int,
        writer: ThreadPoolExecutor,
        budget: CacheBudget,
        damage: Damage,
        tick: Callable[[], int],
        evicted: frozenset[int] = frozenset(),
        folder: Path | None = None,
    ):
        self.version, self.fmt, self.num_classes = version, fmt, num_classes
        self._arrays, self._writer, self._budget = arrays, writer, budget
        self._folder = folder  # set when durable: fsync the namespace's files in this folder
        self.chunk_rows = arrays.logits.chunks[0]
        self._lines = ChunkLines(memory_bytes, self.chunk_rows, arrays.logits.shape[1], fmt.dtype)
        self._files = ChunkFiles.of(dict(arrays.all()))  # None: whole chunks through zarr only
        self.row_reads = 0  # rows read alone from their chunk files since start-up
        self.committed = committed
        self.broken = False  # set after a failed write: nothing more is committed here
        self.write_errors = 0
        self.damage = damage
        self.rows = committed  # rows held: committed or buffered
        self._whole_chunks = committed // self.chunk_rows  # chunks never to be rewritten
        self._submitted = committed  # rows handed to the writer so far
        self._tail = tail  # the chunk being filled, `chunk_rows` long: rows [_whole_chunks * chunk_rows, rows)
        self._pending: dict[int, tuple[_Rows, Future]] = {}  # whole chunks handed to the writer, not yet committed
        self._unreadable: set[int] = set()  # committed chunks that failed to decode since start-up
        self._index = index
        self._tick = tick
        self._evicted = set(evicted)
        self._evicted_attr = _chunk_ranges(self._evicted)  # what the writer records; replaced whole, never mutated
        self.evicted_rows = 0  # this run
        whole = self._whole_chunks  # a chunk's last use: start-up counts the oldest chunks least recently used
        self._used = np.full(max(16, 2 * whole), NEVER, np.int64)
        self._used[:whole] = np.arange(whole) - whole
        self._used[list(self._evicted)] = NEVER

    def lookup(self, keys: list[bytes]) -> np.ndarray:
        """Row positions of the keys, -1 where absent (the index only: nothing is read)."""
        if not keys:
            return np.zeros(0, np.int64)
        positions = self._index.find(_key_array(keys))
        self._index.settle()
        return positions

    def get(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Which keys are held, and their logits as float32 (found rows x K), each row checked before it is served."""
        wanted = _key_array(keys)
        positions, indexed = self._index.locate(wanted) if keys else (np.zeros(0, np.int64), np.zeros(0, np.uint64))
        found = positions >= 0
        at = np.flatnonzero(found)
        logits = np.empty((len(at), self.num_classes), np.float32)
        good = np.ones(len(at), bool)
        self._retire_written()
        chunk_of = positions[at] // self.chunk_rows
        offset = positions[at] - chunk_of * self.chunk_rows
        batch = _Batch(chunk_of, offset, wanted[at], indexed[at], logits, good)
        here = (chunk_of == self._whole_chunks) | np.isin(chunk_of, list(self._pending))  # not on the store yet
        in_lines = ~here & self._lines.holds(chunk_of)
        self._serve_from_lines(np.flatnonzero(in_lines), batch)
        self._serve_read_back(np.flatnonzero(~here & ~in_lines), batch)
        for chunk in np.unique(chunk_of[here]):
            group = np.flatnonzero(chunk_of == chunk)
            rows = self._tail if chunk == self._whole_chunks else self._pending[chunk][0]
            self._deliver(batch, group, rows.logits[offset[group]], rows.keys[offset[group]] == batch.keys[group])
        used = chunk_of[chunk_of < self._whole_chunks]
        self._used[used] = self._tick()
        if not good.all():
            lost = at[~good]
            self._index.drop(wanted[lost])
            self.damage.rows += len(lost)
            found[lost] = False
        self._index.settle()
        return found, logits[good]

    def _deliver(self, batch: _Batch, which: np.ndarray, stored: np.ndarray, sound: np.ndarray) -> None:
        """Rows `which` of the batch: their stored values served where `sound` (a row's keys match, or its checks
        pass, row by row), the others marked not good and logged (unless their chunk failed to decode: that was
        logged when it was read). Only sound rows are decoded: a damaged top-k row may name nonexistent classes."""
        if sound.ndim == 2:  # keys compared field by field
            sound = sound.all(axis=1)
        batch.good[which] = sound
        batch.logits[which[sound]] = self.fmt.decode(stored[sound], self.num_classes)
        failed = which[~sound]
        failed = failed[~np.isin(batch.chunk_of[failed], list(self._unreadable))]
        if len(failed):
            log.warning(
                "cache namespace %s: %d row(s) read back from the store fail their checks (chunks %s); not served, "
                "recomputed when asked for",
                self.version,
                len(failed),
                _ranges(np.unique(batch.chunk_of[failed])),
            )

    def _serve_from_lines(self, which: np.ndarray, batch: _Batch) -> None:
        """Rows `which` from the chunk lines, in one gather: each checked against its key, and against its checksum
        the first time it is served since its chunk was read back."""
        if not len(which):
            return
        lines = self._lines
        slots = lines.slots(batch.chunk_of[which], batch.offset[which])
        sound = (lines.rows.keys[slots] == batch.keys[which]).all(axis=1)  # a chunk moved within the namespace
        unchecked = np.unique(slots[~lines.checked[slots]])
        if len(unchecked):
            rows = lines.rows
            ok = row_checks(self.version, rows.keys[unchecked], rows.logits[unchecked]) == rows.checks[unchecked]
            lines.checked[unchecked[ok]] = True
        self._deliver(batch, which, lines.rows.logits[slots], sound & lines.checked[slots])

    def _serve_read_back(self, which: np.ndarray, batch: _Batch) -> None:
        """Rows `which` from the store. Where the chunk files can be read by byte range (chunk_files), a row whose
        chunk has no line free, and few rows asked for, is read alone; other chunks are read whole into their lines,
        up to an eighth of the bound at once (one read per array, which zarr spreads over the chunks)."""
        if self._files is not None and len(which):
            every, counts = np.unique(batch.chunk_of[which], return_counts=True)
            whole = every[(counts >= self.chunk_rows // WHOLE_CHUNK_SHARE) | self._lines.free(every)]
            alone = ~np.isin(batch.chunk_of[which], whole)
            which = np.concatenate([which[~alone], self._serve_rows(which[alone], batch)])
        every = np.unique(batch.chunk_of[which])
        step = max(1, min(self._lines.lines // 8, READ_BLOCK_CHUNKS))
        for first in range(0, len(every), step):
            chunks = every[first : first + step]
            self._serve_chunks(chunks, which[np.isin(batch.chunk_of[which], chunks)], batch)

    def _serve_rows(self, which: np.ndarray, batch: _Batch) -> np.ndarray:
        """Rows `which` read alone from their chunk files, each checked; returns the rows that could not be read
        (zarr reads their chunks, and its read decides). Only the stored logits are read: the checksum is taken over
        the key asked for and compared with the one the index holds for it (verified or computed when the row was
        indexed), so a row stored for another key fails just as a damaged one does."""
        if not len(which):
            return which
        (stored,), read = self._files.rows(batch.chunk_of[which], batch.offset[which], ROW_READ_ARRAYS)
        self.row_reads += int(read.sum())
        got, stored = which[read], stored[read]
        self._deliver(batch, got, stored, row_checks(self.version, batch.keys[got], stored) == batch.checks[got])
        return which[~read]

    def _serve_chunks(self, chunks: np.ndarray, which: np.ndarray, batch: _Batch) -> None:
        """Rows `which` from `chunks`, read whole now; each row checked, and the chunks then put in their lines."""
        rows, readable = self._read_chunks(chunks)
        at = np.searchsorted(chunks, batch.chunk_of[which]) * self.chunk_rows + batch.offset[which]
        sound = (rows.keys[at] == batch.keys[which]).all(axis=1) & readable[at // self.chunk_rows]
        sound[sound] = row_checks(self.version, rows.keys[at[sound]], rows.logits[at[sound]]) == rows.checks[at[sound]]
        self._deliver(batch, which, rows.logits[at], sound)
        checked = np.zeros(len(rows.keys), bool)
        checked[at[sound]] = True
        for i in np.flatnonzero(readable):
            held = slice(i * self.chunk_rows, (i + 1) * self.chunk_rows)
            self._lines.put(int(chunks[i]), rows.select(held), checked[held])

    def _read_chunks(self, chunks: np.ndarray) -> tuple[_Rows, np.ndarray]:
        """Committed chunks' rows, in order, and which chunks could be read (not evicted, and decoded): from their
        files where chunk_files can, the rest through zarr, in one read per array."""
        n = self.chunk_rows
        readable = np.array([c not in self._unreadable and c not in self._evicted for c in chunks], bool)
        rows = _Rows.empty(len(chunks) * n, self._arrays.logits.shape[1], self.fmt.dtype)
        wanted = []
        for i in np.flatnonzero(readable):
            held = self._chunk_from_files(int(chunks[i]))
            if held is None:
                wanted.append(i)
            else:
                rows.put(slice(i * n, (i + 1) * n), held)
        self._lines.reads += len(np.flatnonzero(readable))
        if not wanted:
            return rows, readable
        wanted = np.array(wanted)
        positions = (chunks[wanted, None] * n + np.arange(n)).ravel()
        try:
            where = (wanted[:, None] * n + np.arange(n)).ravel()
            rows.put(where, _Rows(**{name: array.oindex[positions] for name, array in self._arrays.all()}))
        except Exception:  # noqa: BLE001  (a chunk that fails to decode, whatever the codec raises: find which)
            self._lines.reads -= len(wanted)  # counted again one by one
            for i in wanted:  # their files were tried already
                held = self._zarr_chunk(int(chunks[i]))
                if held is None:
                    readable[i] = False
                else:
                    rows.put(slice(i * n, (i + 1) * n), held)
        return rows, readable

    def _chunk_from_files(self, chunk: int) -> _Rows | None:
        """A whole committed chunk read from its files, or None where chunk_files cannot (zarr then reads it)."""
        held = self._files.chunk(chunk, self.chunk_rows) if self._files is not None else None
        return None if held is None else _Rows(**held)

    def _rows_of(self, chunk: int) -> _Rows | None:
        """A whole chunk's rows, wherever they are (eviction wants its keys)."""
        if chunk in self._pending:
            return self._pending[chunk][0]
        held = self._lines.get(chunk)
        if held is None and chunk not in self._unreadable and chunk not in self._evicted:
            held = self._read_chunk(chunk)
        return held

    def _read_chunk(self, chunk: int) -> _Rows | None:
        """One committed chunk, from its files or else through zarr; None (and remembered) if it fails to decode."""
        held = self._chunk_from_files(chunk)
        if held is not None:
            self._lines.reads += 1
            return held
        return self._zarr_chunk(chunk)

    def _zarr_chunk(self, chunk: int) -> _Rows | None:
        """One committed chunk through zarr; None (remembered, and logged once) if it fails to decode."""
        start, stop = chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows
        self._lines.reads += 1
        try:
            return _Rows(**{name: array[start:stop] for name, array in self._arrays.all()})
        except Exception as exc:  # noqa: BLE001  (a chunk that fails to decode, whatever the codec raises)
            self._unreadable.add(chunk)
            log.warning(
                "cache namespace %s: chunk %d (rows %d-%d) unreadable (%s: %s); its rows are recomputed when asked for",
                self.version,
                chunk,
                start,
                stop - 1,
                type(exc).__name__,
                exc,
            )
            return None

    def _retire_written(self) -> None:
        """Chunks the writer has committed leave `_pending` for the chunk lines (they are likely asked for soon, and
        need no check: this process computed them). After a failed write they stay here."""
        for chunk in [c for c in self._pending if (c + 1) * self.chunk_rows <= self.committed]:
            rows, _ = self._pending.pop(chunk)
            self._lines.put(chunk, rows, checked=True)

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
        new = _Rows(_key_array(keys[:n]), np.asarray(stored[:n], self.fmt.dtype), np.zeros(n, np.uint64))
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
        self._tail = _Rows.empty(self.chunk_rows, self._arrays.logits.shape[1], self.fmt.dtype)

    def flush(self) -> Future | None:
        """Write the partial tail chunk (padded; rewritten whole once it fills)."""
        if self.rows > self._submitted:
            tail = _Rows(self._tail.keys.copy(), self._tail.logits.copy(), self._tail.checks.copy())
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
            still = self._index.find(keys) == chunk * self.chunk_rows + np.arange(len(keys))  # not since re-added
            self._index.drop(keys[still])
        self._lines.drop(chunk)
        if self._files is not None:
            self._files.forget(chunk)
        self._pending.pop(chunk, None)  # the writer writes it, then deletes it: the two run in order
        self._unreadable.discard(chunk)
        self._evicted.add(chunk)
        self._evicted_attr = _chunk_ranges(self._evicted)
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
                _fsync(self._folder / "zarr.json")
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
        return self.rows - len(self._evicted) * self.chunk_rows

    @property
    def chunk_reads(self) -> int:
        """Chunks read back from the store since start-up."""
        return self._lines.reads

    def close(self) -> None:
        self._index.close()
        if self._files is not None:
            self._files.close()

    def _submit_chunk(self, chunk: int, rows: _Rows, committed: int) -> Future:
        self._submitted = committed
        return self._writer.submit(self._write_chunk, chunk, chunk * self.chunk_rows, rows, committed)

    def _write_chunk(self, chunk: int, start: int, rows: _Rows, committed: int) -> None:
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
                self._sync_chunk(chunk, resized)
            a.group.update_attributes({COMMITTED: committed, EVICTED: self._evicted_attr})
            if self._folder is not None:
                _fsync(self._folder / "zarr.json")
                _fsync(self._folder, directory=True)
            self.committed = committed
        except Exception as exc:
            self.broken = True
            self.write_errors += 1
            if _out_of_space(exc):
                self._budget.disk_full(str(self._folder or a.group.store))
            log.exception(
                "cache namespace %s: write failed; rows past %d stay in memory only", self.version, self.committed
            )

    def _sync_chunk(self, chunk: int, resized: bool) -> None:
        """The chunk files and the folder entries that name them; after a resize, the new folders and shapes too."""
        for name, array in self._arrays.all():
            home = self._folder / name
            path = home / array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
            if path.exists():  # zarr leaves out a chunk that is all fill value (zeros): nothing to sync
                _fsync(path)
            _fsync(path.parent, directory=True)
            if resized:  # new chunk folders: make their entries durable, up to the array's folder
                for folder in list(path.parents)[1:]:
                    if folder == home:
                        break
                    _fsync(folder, directory=True)
                _fsync(home / "zarr.json")
                _fsync(home, directory=True)


def _chunk_ranges(chunks: set[int]) -> list[list[int]]:
    """{0, 1, 2, 7} -> [[0, 3], [7, 8]]: a namespace's evicted chunks as its attributes keep them."""
    ranges: list[list[int]] = []
    for c in sorted(chunks):
        if ranges and ranges[-1][1] == c:
            ranges[-1][1] = c + 1
        else:
            ranges.append([c, c + 1])
    return ranges


def _key_array(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)


def inspect_namespace(root: zarr.Group, version: str) -> _Header:
    """A namespace's metadata, or NamespaceDamaged saying what is wrong with it (reads only)."""
    try:
        group = root[version]
    except Exception as exc:  # noqa: BLE001  (hostile metadata: any failure means damaged)
        raise NamespaceDamaged(f"metadata unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(group, zarr.Group):
        raise NamespaceDamaged("is an array, not a namespace group")
    attrs = dict(group.attrs)
    committed, num_classes = attrs.get(COMMITTED), attrs.get("num_classes")
    stored = attrs.get("dtype", "float32")  # namespaces written before float16 existed say nothing: float32
    if attrs.get("format") != FORMAT:
        found = f"format {attrs['format']!r}" if "format" in attrs else "no format (akd-logit-cache/1 or older)"
        raise NamespaceDamaged(
            f"{found}, not {FORMAT}: its rows carry no checksums and cannot be verified",
            rows=committed if _count(committed) else 0,
        )
    if not _count(committed):
        raise NamespaceDamaged(f"committed_rows is {committed!r}, not a non-negative integer")
    if not _count(num_classes) or num_classes < 1:
        raise NamespaceDamaged(f"num_classes is {num_classes!r}, not a positive integer")
    try:
        fmt = row_format(stored)
        fmt.check(num_classes)
    except ValueError as exc:
        raise NamespaceDamaged(f"dtype {stored!r}: {exc}") from None
    arrays = {}
    for name, dtype, tail in (
        ("keys", np.uint8, (KEY_BYTES,)),
        ("logits", fmt.dtype, (fmt.width(num_classes),)),
        ("checks", np.uint64, ()),
    ):
        arrays[name] = _checked_array(group, name, np.dtype(dtype), tail, committed, arrays.get("keys"))
    evicted = _evicted_chunks(attrs.get(EVICTED, []), committed // arrays["keys"].chunks[0])
    return _Header(
        _Arrays(group, arrays["keys"], arrays["logits"], arrays["checks"]), committed, num_classes, fmt, evicted
    )


def _evicted_chunks(ranges, whole_chunks: int) -> frozenset[int]:
    """The evicted chunk ranges an attribute names, if they are whole committed chunks; else NamespaceDamaged."""
    chunks: set[int] = set()
    if not isinstance(ranges, list):
        raise NamespaceDamaged(f"{EVICTED} is {ranges!r}, not a list of [first, stop) chunk ranges")
    for pair in ranges:
        if not (isinstance(pair, list) and len(pair) == 2 and all(_count(c) for c in pair)) or not (
            pair[0] < pair[1] <= whole_chunks
        ):
            raise NamespaceDamaged(
                f"{EVICTED} holds {pair!r}: expected [first, stop) with first < stop <= {whole_chunks} whole chunks"
            )
        chunks.update(range(*pair))
    return frozenset(chunks)


@dataclass
class Block:
    """`READ_BLOCK_CHUNKS` chunks' committed rows as read back: `good` marks those that verified, `problems` says
    what was wrong with the others, per chunk."""

    start: int
    rows: _Rows
    good: np.ndarray
    problems: list[str]


def verified_blocks(version: str, header: _Header) -> Iterator[Block]:
    """A namespace's committed rows, a block at a time, each row checked: memory stays at one block whatever the
    namespace's size."""
    n, chunk_rows = header.committed, header.arrays.logits.chunks[0]
    block = chunk_rows * READ_BLOCK_CHUNKS
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = _Rows.empty(stop - start, header.arrays.logits.shape[1], header.fmt.dtype)
        readable = np.ones(stop - start, bool)
        problems: list[str] = []

        def read(first: int, last: int, rows: _Rows = rows, start: int = start) -> None:
            for name, array in header.arrays.all():
                getattr(rows, name)[first - start : last - start] = array[first:last]

        try:
            read(start, stop)
        except Exception:  # noqa: BLE001  (a chunk that fails to decode, whatever the codec raises; find which)
            for first in range(start, stop, chunk_rows):
                last = min(first + chunk_rows, stop)
                try:
                    read(first, last)
                except Exception as exc:  # noqa: BLE001  (recorded: that chunk's rows are damaged)
                    readable[first - start : last - start] = False
                    if (
                        first // chunk_rows not in header.evicted
                    ):  # left behind by a crash mid-eviction: nothing reads it
                        problems.append(
                            f"chunk {first // chunk_rows} (rows {first}-{last - 1}) unreadable: "
                            f"{type(exc).__name__}: {exc}"
                        )
        for chunk in header.evicted & set(range(start // chunk_rows, -(-stop // chunk_rows))):
            readable[chunk * chunk_rows - start : (chunk + 1) * chunk_rows - start] = False  # gone, not damaged
        good = readable & (row_checks(version, rows.keys, rows.logits) == rows.checks)
        for chunk in np.unique((np.flatnonzero(readable & ~good) + start) // chunk_rows):
            where = np.arange(chunk * chunk_rows, min((chunk + 1) * chunk_rows, stop))
            problems.append(f"chunk {chunk}: rows {_ranges(where[~good[where - start]])} fail their checksum")
        yield Block(start, rows, good, problems)


def count_verified(version: str, header: _Header) -> tuple[int, list[str]]:
    """How many committed rows verify, and what was wrong with the others (reads only)."""
    good, problems = 0, []
    for block in verified_blocks(version, header):
        good += int(block.good.sum())
        problems += block.problems
    return good, problems


def _local_folder(store: StoreLike) -> Path | None:
    """The real folder a store is, however it is spelt (cache_location: a path, a `file:`/`local:` URL in any case,
    behind fsspec cache layers), so that every spelling of one folder takes its one lock; None for a store that is
    no local folder (an object store URL, a store object). ConfigError for a spelling that names neither."""
    if isinstance(store, LocalStore):
        return Path(os.path.realpath(store.root))
    if isinstance(store, (str, os.PathLike)):
        found = cache_location(os.fspath(store), Path.cwd())
        return found if isinstance(found, Path) else None
    return None


def claim_slot(parent: Path, slots: int, **settings) -> LogitCache:
    """The cache of the first `replica-<i>` folder under `parent` that no running replica holds.

    Replicas of one config (a scaled compose service) cannot each be given a cache.dir, and must not share one
    (one writer per store): each claims a folder with the same kernel lock a single store takes, so the rule
    stands, and a replica restarted after a crash takes a free folder back, rows and all.
    """
    for slot in range(slots):
        try:
            cache = LogitCache(Path(parent) / f"replica-{slot}", **settings)
        except StoreLocked:
            continue
        log.info("cache: this replica claimed %s (slot %d of %d)", cache._folder, slot, slots)
        return cache
    raise StoreLocked(
        f"all {slots} cache folders replica-0..replica-{slots - 1} in {parent} are held by running replicas: "
        f"raise [server.cache] slots to at least the number of replicas"
    )


def _remove_torn_writes(folder: Path) -> None:
    """zarr's local store writes `<key>.<uuid>.partial` then renames it; a kill -9 can leave one behind."""
    for leftover in folder.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


async def _list_dir(store: Store, prefix: str) -> list[str]:
    return [name async for name in store.list_dir(prefix)]


def list_namespaces(root: zarr.Group) -> tuple[list[str], list[str]]:
    """The root's entries with namespace metadata (zarr.json), and those without (not ours: left alone)."""
    store = root.store
    names, foreign = [], []
    for name in sorted(sync(_list_dir(store, ""))):
        if name not in ("zarr.json", DAMAGED_DIR):
            (names if sync(store.exists(f"{name}/zarr.json")) else foreign).append(name)
    return names, foreign


class LogitCache:
    """The store root: one namespace per member version, one writer thread for all.

    `store` is anything zarr opens (a folder, a zarr store, a store URL). A local
    folder, however spelt (`_local_folder`), is opened as that real folder and
    locked against a second writer. Start-up checks every namespace's
    metadata (cheap) and sets aside the ones that fail; `namespace()` verifies the
    rows of the namespaces that are served.
    """

    def __init__(
        self,
        store: StoreLike,
        max_bytes: int,
        chunk_rows: int = 1024,
        durable: bool = False,
        memory_bytes: int = MEMORY_BYTES,
        evict: bool = False,
        index_memory_bytes: int = RESIDENT_BYTES,
    ):
        self.index_memory_bytes = index_memory_bytes
        folder = _local_folder(store)
        self.store = str(folder) if folder is not None and not isinstance(store, LocalStore) else store
        self.chunk_rows = chunk_rows
        self._folder = folder
        self._index_folder = folder  # indexes and spills live beside the store (the system's temp folder otherwise)
        self.memory_bytes = memory_bytes
        self._lock = lock_folder(folder) if folder else None
        if folder:
            _remove_torn_writes(folder)
        self.durable = durable and folder is not None
        if durable and folder is None:
            log.warning(
                "[server.cache] durable fsyncs local folders only; %s relies on its store's own durability", store
            )
        self.damage: dict[str, Damage] = {}
        self._root = self._open_root()
        self._headers, self._foreign = self._inspect_namespaces()
        if self._root.attrs.get("format") != FORMAT:
            self._root.attrs["format"] = FORMAT
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="akd-cache-writer")
        # Every namespace that passed its checks counts against the bound, including versions no longer served.
        self.budget = CacheBudget(
            max_bytes, sum(h.nbytes for h in self._headers.values()), self._evict_oldest if evict else None
        )
        self._tick = itertools.count().__next__  # the clock of chunk uses, shared so that eviction compares them
        self._namespaces: dict[str, MemberCache] = {}
        self._namespaces_lock = threading.Lock()

    def _open_root(self) -> zarr.Group:
        try:
            return zarr.open_group(self.store, mode="a")
        except Exception as exc:  # noqa: BLE001  (whatever the file holds makes zarr fail its own way)
            reason = f"{type(exc).__name__}: {exc}"
            if self._folder is not None and (self._folder / "zarr.json").is_file():
                aside = self._aside_path("root")
                aside.mkdir(parents=True)
                os.replace(self._folder / "zarr.json", aside / "zarr.json")
                where = str(aside / "zarr.json")
            elif isinstance(self.store, Store) or (isinstance(self.store, str) and "://" in self.store):
                store = FsspecStore.from_url(self.store, read_only=False) if isinstance(self.store, str) else self.store
                sync(store.delete("zarr.json"))
                where = "deleted (this store cannot keep a copy aside)"
            else:
                raise RuntimeError(
                    f"cache store {self.store}: its root zarr.json is unreadable ({reason}); delete it or point "
                    "[server.cache] dir elsewhere"
                ) from None
        log.warning(
            "cache store %s: root zarr.json unreadable (%s); set aside to %s; its namespaces are checked one by one",
            self.store,
            reason,
            where,
        )
        return zarr.open_group(self.store, mode="a")

    def _inspect_namespaces(self) -> tuple[dict[str, _Header], set[str]]:
        """Every namespace whose metadata passes; the rest are set aside. Entries without zarr.json are not ours: left
        alone."""
        names, foreign = list_namespaces(self._root)
        headers = {}
        for name in names:
            try:
                headers[name] = inspect_namespace(self._root, name)
            except NamespaceDamaged as exc:
                self._set_aside(name, str(exc), exc.rows, "it is rebuilt empty when served")
        return headers, set(foreign)

    def _aside_path(self, name: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self._folder / DAMAGED_DIR / f"{name}-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = self._folder / DAMAGED_DIR / f"{name}-{stamp}-{n}"
        return aside

    def _set_aside(self, version: str, reason: str, rows: int, then: str) -> str:
        """Move a namespace out of the store (or delete it where the store cannot keep a copy); record and log it."""
        if self._folder is not None:
            aside = self._aside_path(version)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._folder / version, aside)
            where = f"set aside to {aside} (kept for inspection; delete it when done)"
        else:
            sync(self._root.store.delete_dir(version))
            where = "deleted (this store cannot keep a copy aside)"
        damage = self.damage.setdefault(version, Damage())
        damage.rows += rows
        damage.namespaces += 1
        damage.places.append(where)
        log.warning("cache namespace %s: %s; %s; %s", version, reason, where, then)
        return where

    def namespace(self, version: str, num_classes: int, store: str = "float32") -> MemberCache:
        """The namespace `version` (see namespace_name), holding rows in the format `store` names (row_formats)."""
        fmt = row_format(store)
        fmt.check(num_classes)
        with self._namespaces_lock:
            if version not in self._namespaces:
                self._namespaces[version] = self._load(version, num_classes, fmt)
            return self._namespaces[version]

    def _load(self, version: str, num_classes: int, fmt: RowFormat) -> MemberCache:
        header = self._headers.get(version)
        if header is None:
            if version in self._foreign:
                self._set_aside(version, "holds files but no namespace metadata", 0, "rebuilt empty")
                self._foreign.discard(version)
            return self._fresh(version, num_classes, fmt)
        if header.num_classes != num_classes:
            raise ValueError(f"cache namespace {version} holds {header.num_classes} classes, expected {num_classes}")
        if header.fmt != fmt:
            raise ValueError(f"cache namespace {version} holds {header.fmt.name} rows, expected {fmt.name}")
        del self._headers[version]
        index, tail, good, problems = self._index_verified(version, header)
        if good == header.live_rows:
            ns = self._member(
                version, header.fmt, num_classes, header.arrays, header.committed, tail, index, header.evicted
            )
            log.info("cache namespace %s: %d rows restored and verified", version, ns.rows)
            return ns
        index.close()
        self.budget.release(header.nbytes)
        salvaged = self._spill_verified(version, header, good)
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more chunks" if len(problems) > 8 else "")
        self._set_aside(
            version,
            f"{header.live_rows - good} of {header.live_rows} rows fail their checks ({shown})",
            header.live_rows - good,
            f"rebuilt from the {good} rows that verified; the others are recomputed when asked for",
        )
        ns = self._fresh(version, num_classes, fmt)
        self._restore(ns, salvaged)
        return ns

    def _index_verified(self, version: str, header: _Header) -> tuple[KeyIndex, _Rows, int, list[str]]:
        """One pass over a namespace's rows: the index of those that verify, the tail chunk's rows (held in memory
        until it fills), how many verified, and what was wrong with the others."""
        chunk_rows = header.arrays.logits.chunks[0]
        tail_start = header.committed // chunk_rows * chunk_rows
        tail = _Rows.empty(chunk_rows, header.arrays.logits.shape[1], header.fmt.dtype)
        index = KeyIndex(2 * header.committed, self._index_folder, self.index_memory_bytes)
        good, problems = 0, []
        for block in verified_blocks(version, header):
            kept = np.flatnonzero(block.good)
            index.add(block.rows.keys[kept], block.start + kept, block.rows.checks[kept])
            index.settle()
            good += len(kept)
            problems += block.problems
            if block.start + len(block.good) > tail_start:  # blocks are whole chunks: the tail lies in this one
                held = slice(tail_start - block.start, len(block.good))
                tail.put(slice(0, header.committed - tail_start), block.rows.select(held))
        return index, tail, good, problems

    def _spill_verified(self, version: str, header: _Header, good: int) -> list[FileBacked]:
        """A damaged namespace's sound rows, copied aside into temporary files before it is set aside (a store that
        cannot keep a copy deletes it), so that salvaging a large namespace needs no memory of its size."""
        spill = [
            FileBacked((good, KEY_BYTES), np.uint8, self._index_folder),
            FileBacked((good, header.arrays.logits.shape[1]), header.fmt.dtype, self._index_folder),
        ]
        at = 0
        for block in verified_blocks(version, header):
            kept = np.flatnonzero(block.good)
            spill[0].array[at : at + len(kept)] = block.rows.keys[kept]
            spill[1].array[at : at + len(kept)] = block.rows.logits[kept]
            at += len(kept)
        return spill

    def _restore(self, ns: MemberCache, spill: list[FileBacked]) -> None:
        """Start-up only: the salvaged rows written into the rebuilt namespace, a chunk at a time, through the one
        writer, each chunk committed before the next is read."""
        keys, logits = (f.array for f in spill)
        for start in range(0, len(keys), ns.chunk_rows):
            stop = start + ns.chunk_rows
            ns.append([k.tobytes() for k in keys[start:stop]], logits[start:stop])
            ns.flush()
            self.drain()
            for f in spill:
                f.release()
        del keys, logits
        for f in spill:
            f.close()

    def _fresh(self, version: str, num_classes: int, fmt: RowFormat) -> MemberCache:
        """A new, empty namespace."""
        group = self._root.create_group(version, overwrite=True)
        group.attrs.update({"format": FORMAT, COMMITTED: 0, "num_classes": num_classes, "dtype": fmt.name})
        chunk, width = self.chunk_rows, fmt.width(num_classes)
        arrays = _Arrays(
            group,
            group.create_array("keys", shape=(0, KEY_BYTES), chunks=(chunk, KEY_BYTES), dtype="uint8", **RAW),
            group.create_array("logits", shape=(0, width), chunks=(chunk, width), dtype=fmt.dtype.name, **RAW),
            group.create_array("checks", shape=(0,), chunks=(chunk,), dtype="uint64", **RAW),
        )
        folder = self._durable_folder(version)
        if folder is not None:
            for name, _ in arrays.all():
                _fsync(folder / name / "zarr.json")
                _fsync(folder / name, directory=True)
            _fsync(folder / "zarr.json")
            _fsync(folder, directory=True)
            _fsync(self._folder, directory=True)
        tail = _Rows.empty(chunk, width, fmt.dtype)
        index = KeyIndex(folder=self._index_folder, resident_bytes=self.index_memory_bytes)
        return self._member(version, fmt, num_classes, arrays, 0, tail, index)

    def _member(
        self,
        version: str,
        fmt: RowFormat,
        num_classes: int,
        arrays: _Arrays,
        committed: int,
        tail: _Rows,
        index: KeyIndex,
        evicted: frozenset[int] = frozenset(),
    ) -> MemberCache:
        return MemberCache(
            version,
            fmt,
            num_classes,
            arrays,
            committed,
            tail,
            index,
            self.memory_bytes,
            self._writer,
            self.budget,
            self.damage.setdefault(version, Damage()),
            self._tick,
            evicted,
            self._durable_folder(version),
        )

    def _durable_folder(self, version: str) -> Path | None:
        return self._folder / version if self.durable else None

    def evict_down_to(self, max_bytes: int) -> int:
        """Evict the least recently used chunks of the loaded namespaces until the store holds at most `max_bytes`
        (or nothing more can go); returns the bytes freed. `akd cache gc --max-bytes` calls it on a stopped store."""
        return self._evict_oldest(self.budget.used_bytes - max_bytes) if self.budget.used_bytes > max_bytes else 0

    def _evict_oldest(self, wanted: int) -> int:
        """Evict the least recently used chunks of the served namespaces until `wanted` bytes are free (or nothing
        more can go); rows of versions no longer served count until `akd cache gc` drops them."""
        freed = 0
        while freed < wanted:
            oldest = [(used, chunk, ns) for ns in self.namespaces if (found := ns.oldest()) for used, chunk in [found]]
            if not oldest:
                break
            _, chunk, ns = min(oldest, key=lambda o: o[0])
            freed += ns.evict(chunk)
        return freed

    def damage_counts(self) -> dict[str, tuple[int, int]]:
        """(rows, namespaces) lost to damage this run, per member version; zeros for served versions without damage."""
        counts = {ns.version: (0, 0) for ns in self.namespaces}
        counts.update({version: (d.rows, d.namespaces) for version, d in self.damage.items()})
        return counts

    @property
    def namespaces(self) -> list[MemberCache]:
        return list(self._namespaces.values())

    def flush(self) -> None:
        """Submit every partial chunk and wait until all writes are on the store."""
        for ns in self.namespaces:
            ns.flush()
        self.drain()

    def drain(self) -> None:
        """Wait for every write submitted so far (the writer runs them in order)."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
        for ns in self.namespaces:
            ns.close()
        if self._lock is not None:
            os.close(self._lock)


def _ranges(positions: np.ndarray) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    spans, start = [], None
    for i, p in enumerate(positions):
        if start is None:
            start = p
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            spans.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ", ".join(spans)
