"""Rows read straight from a local namespace's chunk files, a few bytes each, instead of whole chunks through zarr.

A random hit wants one row of its chunk; zarr reads and decodes the whole chunk for it, and zarr's own sharding
(inner chunks read by byte range) costs more still on a local folder, while one `pread` a row costs a small fraction
of either (`python scripts/chunk_read_cost.py`; its figures are in docs/design/teacher-service.md). The cache writes
its chunks raw (zarr's bytes codec alone, little-endian, C order), so row r of chunk c is bytes [r * row, (r + 1) *
row) of that chunk's file, which zarr's chunk key encoding names.

This reader only ever *finds bytes*; it decides nothing. A row it cannot read (a file missing or short, an array
with another codec, a store that is not a local folder) is left to zarr's read, whose outcome then decides, and
every row it reads is checked by the cache against its checksum before it is served. Whole chunks are never
rewritten once committed (the log is append-only; eviction deletes, never reuses), so an open file stays right until
`forget`.
"""

from __future__ import annotations

import itertools
import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.storage import LocalStore

# open chunk files a namespace keeps (fewer where the process may open fewer: a quarter of its limit)
MAX_OPEN = 4096


def max_open_files() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_OPEN if soft == resource.RLIM_INFINITY else max(3, min(MAX_OPEN, soft // 4))


@dataclass(frozen=True)
class _RawArray:
    """Where an array's chunks live and how a row is laid out in one."""

    folder: Path
    array: zarr.Array
    # little-endian, whatever the host's byte order
    dtype: np.dtype
    # a row's shape
    tail: tuple[int, ...]
    row_bytes: int

    def path(self, chunk: int) -> Path:
        coords = (chunk,) + (0,) * len(self.tail)
        return self.folder / self.array.metadata.encode_chunk_key(coords)


def _raw(array: zarr.Array) -> _RawArray | None:
    """The array's layout, if its chunks are plain bytes in a local folder; else None (zarr reads it)."""
    store = array.store
    serializer = array.serializer
    if (
        not isinstance(store, LocalStore)
        or array.metadata.zarr_format != 3
        or array.compressors
        or array.filters
        or array.order != "C"
        or not isinstance(serializer, BytesCodec)
        or (serializer.endian is not None and serializer.endian.value != "little")
    ):
        return None
    dtype = np.dtype(array.dtype).newbyteorder("<")
    tail = tuple(array.chunks[1:])
    return _RawArray(
        Path(store.root) / array.path, array, dtype, tail, int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
    )


class ChunkFiles:
    """Byte-range reads of rows from a namespace's arrays, each array's chunk files kept open (a bounded number, the
    least recently used closed first). Used by the thread that owns the cache only."""

    def __init__(self, arrays: dict[str, _RawArray], max_open: int):
        self._arrays = arrays
        self._max_open = max_open
        # (array name, chunk) -> descriptor, least recently used first
        self._open: dict[tuple[str, int], int] = {}

    @classmethod
    def of(cls, arrays: Mapping[str, zarr.Array], max_open: int | None = None) -> ChunkFiles | None:
        """A reader for these arrays (a namespace's, by name), or None if any of them is not raw and local."""
        raw = {name: _raw(a) for name, a in arrays.items()}
        if any(r is None for r in raw.values()):
            return None
        return cls(raw, max_open_files() if max_open is None else max_open)

    def rows(
        self, chunks: np.ndarray, offsets: np.ndarray, names: Sequence[str]
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Row `offsets[i]` of chunk `chunks[i]` of each array named, in that order, and which rows were read whole
        (the others hold zeros: left to zarr). One `pread` a row and array: the per-row work is kept to that call."""
        every, inverse = np.unique(chunks, return_inverse=True)
        read = np.ones(len(chunks), bool)
        values = [np.zeros((len(chunks), *self._arrays[name].tail), self._arrays[name].dtype) for name in names]
        # no more files at once than may stay open
        for first in range(0, len(every), self._max_open):
            rows = np.flatnonzero((inverse >= first) & (inverse < first + self._max_open))
            for name, into in zip(names, values):
                read[rows] &= self._read_rows(
                    name, every[first : first + self._max_open], inverse[rows] - first, offsets[rows], into, rows
                )
        return values, read

    def _read_rows(
        self,
        name: str,
        chunks: np.ndarray,
        chunk_of: np.ndarray,
        offsets: np.ndarray,
        into: np.ndarray,
        rows: np.ndarray,
    ) -> np.ndarray:
        """Row `offsets[i]` of chunk `chunks[chunk_of[i]]` of one array (at most `max_open` chunks), written to
        `into[rows[i]]`; which were read whole (the others are left as they were)."""
        raw = self._arrays[name]
        size = raw.row_bytes
        fds = np.array([self._fd(name, chunk) for chunk in chunks.tolist()], np.int64)[chunk_of]
        read = fds >= 0
        at = np.flatnonzero(read)
        parts = _pread_all(fds[at].tolist(), size, (offsets[at] * size).tolist())
        data = b"".join(parts)
        # a file shorter than the row (a part is never longer)
        if len(data) != len(at) * size:
            whole = np.fromiter(map(len, parts), np.int64, len(parts)) == size
            read[at[~whole]] = False
            at, data = at[whole], b"".join(p for p in parts if len(p) == size)
        into[rows[at]] = self._values(raw, data)
        return read

    def chunk(self, chunk: int, chunk_rows: int) -> dict[str, np.ndarray] | None:
        """A whole chunk of every array, by name, or None where one cannot be read whole (zarr then reads it)."""
        values = {}
        for name, raw in self._arrays.items():
            size = chunk_rows * raw.row_bytes
            data = self._pread(name, chunk, size, 0)
            if len(data) != size:
                return None
            values[name] = self._values(raw, data)
        return values

    def forget(self, chunk: int) -> None:
        """Close a chunk's files (it is being evicted: its files are about to go)."""
        for name in self._arrays:
            fd = self._open.pop((name, chunk), None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    @staticmethod
    def _values(raw: _RawArray, data: bytes) -> np.ndarray:
        return np.frombuffer(data, raw.dtype).reshape((-1, *raw.tail)).astype(raw.dtype.newbyteorder("="), copy=False)

    def _fd(self, name: str, chunk: int) -> int:
        """The chunk file's descriptor, opened if need be; -1 if it cannot be opened. Past the bound the least
        recently used file is closed: never one of the last `max_open` asked for, which a read may still hold."""
        fd = self._open.pop((name, chunk), None)
        if fd is None:
            try:
                fd = os.open(self._arrays[name].path(chunk), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return -1
            if len(self._open) >= self._max_open:
                os.close(self._open.pop(next(iter(self._open))))
        # the most recently used last
        self._open[(name, chunk)] = fd
        return fd

    def _pread(self, name: str, chunk: int, size: int, offset: int) -> bytes:
        """Up to `size` bytes; fewer (or none) where the file is short, missing or unreadable."""
        fd = self._fd(name, chunk)
        return b"" if fd < 0 else _pread_or_nothing(fd, size, offset)


def _pread_all(fds: list[int], size: int, offsets: list[int]) -> list[bytes]:
    """`size` bytes at each (fd, offset); fewer (or none) where a file is short or a read fails."""
    try:
        return list(map(os.pread, fds, itertools.repeat(size, len(fds)), offsets))
    except OSError:
        # one read failed (EIO, say): read one by one, the failed ones left empty
        return [_pread_or_nothing(fd, size, offset) for fd, offset in zip(fds, offsets)]


def _pread_or_nothing(fd: int, size: int, offset: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError:
        return b""
