"""A namespace's committed chunks, read back from the store to serve hits, every row checked before it is served.

A found row in a committed chunk is served one of four ways:

- from its chunk's line (`ChunkLines`), in one gather for the batch, checked against its checksum the first time it
  is served since its chunk was read back;
- alone, by byte range from a local folder's raw chunk files (chunk_files), where its chunk has no line free and the
  batch wants few of its rows: only its logits are read, checked with the key asked for against the checksum its key
  index holds;
- with its whole chunk from those files, or through zarr (other stores, namespaces written compressed by earlier
  releases), a block of chunks at a time, into their lines.

A row that fails (or whose chunk no longer decodes) is marked not good and logged; the namespace drops it from its
index, so it is recomputed on its next request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from teacher_service.cache.chunk_files import ChunkFiles
from teacher_service.cache.layout import Arrays
from teacher_service.cache.lines import ChunkLines
from teacher_service.cache.row_formats import RowFormat
from teacher_service.cache.rows import Rows, row_checks, spans
from teacher_service.cache.verify import READ_BLOCK_CHUNKS

log = logging.getLogger("akd.cache")

# what a row read alone reads: its logits only, for its key index holds its checksum
ROW_READ_ARRAYS = ("logits",)
# a chunk of which a batch asks for 1/16 of the rows or more is read whole, not row by row
WHOLE_CHUNK_SHARE = 16


@dataclass
class Batch:
    """The found rows of one `get`: where each lives, the key it must carry, the checksum it was indexed with, and what
    is served (filled in)."""

    chunk_of: np.ndarray
    offset: np.ndarray
    keys: np.ndarray
    checks: np.ndarray
    logits: np.ndarray
    good: np.ndarray


class ChunkReader:
    """The committed chunks of one namespace as this process reads them back: their lines, their files, and which
    ones failed to decode or were evicted since start-up."""

    def __init__(
        self, version: str, fmt: RowFormat, num_classes: int, arrays: Arrays, memory_bytes: int, evicted: frozenset[int]
    ):
        self.version, self.fmt, self.num_classes = version, fmt, num_classes
        self._arrays = arrays
        self.chunk_rows = arrays.logits.chunks[0]
        self.lines = ChunkLines(memory_bytes, self.chunk_rows, arrays.logits.shape[1], fmt.dtype)
        # None: whole chunks through zarr only
        self.files = ChunkFiles.of(dict(arrays.all()))
        # rows read alone from their chunk files since start-up
        self.row_reads = 0
        # committed chunks that failed to decode since start-up
        self.unreadable: set[int] = set()
        self.evicted = set(evicted)

    def serve(self, which: np.ndarray, batch: Batch) -> None:
        """Rows `which` of the batch, all in committed chunks: from their lines where held, else read back."""
        in_lines = self.lines.holds(batch.chunk_of[which])
        self._serve_from_lines(which[in_lines], batch)
        self._serve_read_back(which[~in_lines], batch)

    def deliver(self, batch: Batch, which: np.ndarray, stored: np.ndarray, sound: np.ndarray) -> None:
        """Rows `which` of the batch: their stored values served where `sound` (a row's keys match, or its checks
        pass, row by row), the others marked not good and logged (unless their chunk failed to decode: that was
        logged when it was read). Only sound rows are decoded: a damaged top-k row may name nonexistent classes."""
        # keys compared byte by byte: a row is sound where all its bytes match
        if sound.ndim == 2:
            sound = sound.all(axis=1)
        batch.good[which] = sound
        batch.logits[which[sound]] = self.fmt.decode(stored[sound], self.num_classes)
        failed = which[~sound]
        failed = failed[~np.isin(batch.chunk_of[failed], list(self.unreadable))]
        if len(failed):
            log.warning(
                "cache namespace %s: %d row(s) read back from the store fail their checks (chunks %s); not served, "
                "recomputed when asked for",
                self.version,
                len(failed),
                spans(np.unique(batch.chunk_of[failed])),
            )

    def _serve_from_lines(self, which: np.ndarray, batch: Batch) -> None:
        """Rows `which` from the chunk lines, in one gather: each checked against its key, and against its checksum
        the first time it is served since its chunk was read back."""
        if not len(which):
            return
        lines = self.lines
        slots = lines.slots(batch.chunk_of[which], batch.offset[which])
        # a row's key must be the one asked for, or its chunk has moved within the namespace
        sound = (lines.rows.keys[slots] == batch.keys[which]).all(axis=1)
        unchecked = np.unique(slots[~lines.checked[slots]])
        if len(unchecked):
            rows = lines.rows
            ok = row_checks(self.version, rows.keys[unchecked], rows.logits[unchecked]) == rows.checks[unchecked]
            lines.checked[unchecked[ok]] = True
        self.deliver(batch, which, lines.rows.logits[slots], sound & lines.checked[slots])

    def _serve_read_back(self, which: np.ndarray, batch: Batch) -> None:
        """Rows `which` from the store. Where the chunk files can be read by byte range (chunk_files), a row whose
        chunk has no line free, and few rows asked for, is read alone; other chunks are read whole into their lines,
        up to an eighth of the bound at once (one read per array, which zarr spreads over the chunks)."""
        if self.files is not None and len(which):
            every, counts = np.unique(batch.chunk_of[which], return_counts=True)
            whole = every[(counts >= self.chunk_rows // WHOLE_CHUNK_SHARE) | self.lines.free(every)]
            alone = ~np.isin(batch.chunk_of[which], whole)
            which = np.concatenate([which[~alone], self._serve_rows(which[alone], batch)])
        every = np.unique(batch.chunk_of[which])
        step = max(1, min(self.lines.lines // 8, READ_BLOCK_CHUNKS))
        for first in range(0, len(every), step):
            chunks = every[first : first + step]
            self._serve_chunks(chunks, which[np.isin(batch.chunk_of[which], chunks)], batch)

    def _serve_rows(self, which: np.ndarray, batch: Batch) -> np.ndarray:
        """Rows `which` read alone from their chunk files, each checked; returns the rows that could not be read
        (zarr reads their chunks, and its read decides). Only the stored logits are read: the checksum is taken over
        the key asked for and compared with the one the index holds for it (verified or computed when the row was
        indexed), so a row stored for another key fails just as a damaged one does."""
        if not len(which):
            return which
        (stored,), read = self.files.rows(batch.chunk_of[which], batch.offset[which], ROW_READ_ARRAYS)
        self.row_reads += int(read.sum())
        got, stored = which[read], stored[read]
        self.deliver(batch, got, stored, row_checks(self.version, batch.keys[got], stored) == batch.checks[got])
        return which[~read]

    def _serve_chunks(self, chunks: np.ndarray, which: np.ndarray, batch: Batch) -> None:
        """Rows `which` from `chunks`, read whole now; each row checked, and the chunks then put in their lines."""
        rows, readable = self._read_chunks(chunks)
        at = np.searchsorted(chunks, batch.chunk_of[which]) * self.chunk_rows + batch.offset[which]
        sound = (rows.keys[at] == batch.keys[which]).all(axis=1) & readable[at // self.chunk_rows]
        sound[sound] = row_checks(self.version, rows.keys[at[sound]], rows.logits[at[sound]]) == rows.checks[at[sound]]
        self.deliver(batch, which, rows.logits[at], sound)
        checked = np.zeros(len(rows.keys), bool)
        checked[at[sound]] = True
        for i in np.flatnonzero(readable):
            held = slice(i * self.chunk_rows, (i + 1) * self.chunk_rows)
            self.lines.put(int(chunks[i]), rows.select(held), checked[held])

    def _read_chunks(self, chunks: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Committed chunks' rows, in order, and which chunks could be read (not evicted, and decoded): from their
        files where chunk_files can, the rest through zarr, in one read per array."""
        n = self.chunk_rows
        readable = np.array([c not in self.unreadable and c not in self.evicted for c in chunks], bool)
        rows = Rows.empty(len(chunks) * n, self._arrays.logits.shape[1], self.fmt.dtype)
        wanted = []
        for i in np.flatnonzero(readable):
            held = self._chunk_from_files(int(chunks[i]))
            if held is None:
                wanted.append(i)
            else:
                rows.put(slice(i * n, (i + 1) * n), held)
        self.lines.reads += len(np.flatnonzero(readable))
        if not wanted:
            return rows, readable
        wanted = np.array(wanted)
        positions = (chunks[wanted, None] * n + np.arange(n)).ravel()
        try:
            where = (wanted[:, None] * n + np.arange(n)).ravel()
            rows.put(where, Rows(**{name: array.oindex[positions] for name, array in self._arrays.all()}))
        except Exception:  # noqa: BLE001  (a chunk that fails to decode, whatever the codec raises: find which)
            # each is counted again as `_zarr_chunk` reads it
            self.lines.reads -= len(wanted)
            # through zarr only: their files were tried already
            for i in wanted:
                held = self._zarr_chunk(int(chunks[i]))
                if held is None:
                    readable[i] = False
                else:
                    rows.put(slice(i * n, (i + 1) * n), held)
        return rows, readable

    def _chunk_from_files(self, chunk: int) -> Rows | None:
        """A whole committed chunk read from its files, or None where chunk_files cannot (zarr then reads it)."""
        held = self.files.chunk(chunk, self.chunk_rows) if self.files is not None else None
        return None if held is None else Rows(**held)

    def _read_chunk(self, chunk: int) -> Rows | None:
        """One committed chunk, from its files or else through zarr; None (and remembered) if it fails to decode."""
        held = self._chunk_from_files(chunk)
        if held is not None:
            self.lines.reads += 1
            return held
        return self._zarr_chunk(chunk)

    def _zarr_chunk(self, chunk: int) -> Rows | None:
        """One committed chunk through zarr; None (remembered, and logged once) if it fails to decode."""
        start, stop = chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows
        self.lines.reads += 1
        try:
            return Rows(**{name: array[start:stop] for name, array in self._arrays.all()})
        except Exception as exc:  # noqa: BLE001  (a chunk that fails to decode, whatever the codec raises)
            self.unreadable.add(chunk)
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

    def held(self, chunk: int) -> Rows | None:
        """A whole committed chunk's rows, from its line or read back; None where it is evicted or unreadable."""
        held = self.lines.get(chunk)
        if held is None and chunk not in self.unreadable and chunk not in self.evicted:
            held = self._read_chunk(chunk)
        return held

    def forget(self, chunk: int) -> None:
        """An evicted chunk: out of its line and its open files, never read again."""
        self.lines.drop(chunk)
        if self.files is not None:
            self.files.forget(chunk)
        self.unreadable.discard(chunk)
        self.evicted.add(chunk)

    def close(self) -> None:
        if self.files is not None:
            self.files.close()
