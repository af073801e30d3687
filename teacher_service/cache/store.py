"""The store root (`LogitCache`): one namespace per member version, one writer thread for all, one size budget.

Size: past `max_bytes`, the least recently used whole chunks of the served namespaces are evicted (`when_full =
"evict"`): recorded in `evicted_chunks` first, their files deleted after, so a crash in between leaves files nothing
reads. Otherwise inserts stop instead.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from zarr.storage import LocalStore, StoreLike

from shared.hashing import KEY_BYTES
from teacher_service.cache.aside import SetAside, remove_torn_writes, spill_verified
from teacher_service.cache.budget import CacheBudget
from teacher_service.cache.durable import sync_new_namespace
from teacher_service.cache.folder_lock import lock_folder
from teacher_service.cache.key_index import FileBacked, KeyIndex
from teacher_service.cache.layout import COMMITTED, FORMAT, RAW, Arrays
from teacher_service.cache.location import cache_location
from teacher_service.cache.member import MemberCache, StoreShared
from teacher_service.cache.row_formats import RowFormat, row_format
from teacher_service.cache.rows import Rows
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.verify import Damage, Header, verified_blocks

log = logging.getLogger("akd.cache")


class LogitCache:
    """The store root: one namespace per member version, one writer thread for all.

    `store` is anything zarr opens (a folder, a zarr store, a store URL). A local folder, however spelt
    (`local_folder`), is opened as that real folder and locked against a second writer. Start-up checks every
    namespace's metadata (cheap) and sets aside the ones that fail; `namespace()` verifies the rows of the namespaces
    that are served.
    """

    def __init__(self, store: StoreLike, settings: CacheSettings):
        self.settings = settings
        folder = local_folder(store)
        self.store = str(folder) if folder is not None and not isinstance(store, LocalStore) else store
        self._folder = folder
        # indexes and spills live beside the store (the system's temp folder otherwise)
        self._index_folder = folder
        self._lock = lock_folder(folder) if folder else None
        if folder:
            remove_torn_writes(folder)
        self.durable = settings.durable and folder is not None
        if settings.durable and folder is None:
            log.warning(
                "[server.cache] durable fsyncs local folders only; %s relies on its store's own durability", store
            )
        self.damage: dict[str, Damage] = {}
        self._aside = SetAside(self.store, folder, self.damage)
        self._root = self._aside.open_root()
        self._headers, self._foreign = self._aside.inspect_namespaces()
        if self._root.attrs.get("format") != FORMAT:
            self._root.attrs["format"] = FORMAT
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="akd-cache-writer")
        # Every namespace that passed its checks counts against the bound, including versions no longer served.
        self.budget = CacheBudget(
            settings.max_bytes,
            sum(h.nbytes for h in self._headers.values()),
            self._evict_oldest if settings.evict else None,
        )
        self._shared = StoreShared(
            settings,
            self._writer,
            self.budget,
            itertools.count().__next__,
            self.damage,
            folder if self.durable else None,
        )
        self._namespaces: dict[str, MemberCache] = {}
        self._namespaces_lock = threading.Lock()

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
                self._aside.namespace(version, "holds files but no namespace metadata", 0, "rebuilt empty")
                self._foreign.discard(version)
            return self._fresh(version, num_classes, fmt)
        if header.num_classes != num_classes:
            raise ValueError(f"cache namespace {version} holds {header.num_classes} classes, expected {num_classes}")
        if header.fmt != fmt:
            raise ValueError(f"cache namespace {version} holds {header.fmt.name} rows, expected {fmt.name}")
        del self._headers[version]
        index, tail, good, problems = self._index_verified(version, header)
        if good == header.live_rows:
            ns = MemberCache(version, header, tail, index, self._shared)
            log.info("cache namespace %s: %d rows restored and verified", version, ns.rows)
            return ns
        index.close()
        self.budget.release(header.nbytes)
        salvaged = spill_verified(version, header, good, self._index_folder)
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more chunks" if len(problems) > 8 else "")
        self._aside.namespace(
            version,
            f"{header.live_rows - good} of {header.live_rows} rows fail their checks ({shown})",
            header.live_rows - good,
            f"rebuilt from the {good} rows that verified; the others are recomputed when asked for",
        )
        ns = self._fresh(version, num_classes, fmt)
        self._restore(ns, salvaged)
        return ns

    def _index_verified(self, version: str, header: Header) -> tuple[KeyIndex, Rows, int, list[str]]:
        """One pass over a namespace's rows: the index of those that verify, the tail chunk's rows (held in memory
        until it fills), how many verified, and what was wrong with the others."""
        chunk_rows = header.arrays.logits.chunks[0]
        tail_start = header.committed // chunk_rows * chunk_rows
        tail = Rows.empty(chunk_rows, header.arrays.logits.shape[1], header.fmt.dtype)
        index = KeyIndex(2 * header.committed, self._index_folder, self.settings.index_memory_bytes)
        good, problems = 0, []
        for block in verified_blocks(version, header):
            kept = np.flatnonzero(block.good)
            index.add(block.rows.keys[kept], block.start + kept, block.rows.checks[kept])
            index.settle()
            good += len(kept)
            problems += block.problems
            # blocks are whole chunks: the tail lies in this one
            if block.start + len(block.good) > tail_start:
                held = slice(tail_start - block.start, len(block.good))
                tail.put(slice(0, header.committed - tail_start), block.rows.select(held))
        return index, tail, good, problems

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
        chunk, width = self.settings.chunk_rows, fmt.width(num_classes)
        arrays = Arrays(
            group,
            group.create_array("keys", shape=(0, KEY_BYTES), chunks=(chunk, KEY_BYTES), dtype="uint8", **RAW),
            group.create_array("logits", shape=(0, width), chunks=(chunk, width), dtype=fmt.dtype.name, **RAW),
            group.create_array("checks", shape=(0,), chunks=(chunk,), dtype="uint64", **RAW),
        )
        folder = self._shared.durable_folder(version)
        if folder is not None:
            sync_new_namespace(self._folder, folder, arrays)
        tail = Rows.empty(chunk, width, fmt.dtype)
        index = KeyIndex(folder=self._index_folder, resident_bytes=self.settings.index_memory_bytes)
        return MemberCache(version, Header(arrays, 0, num_classes, fmt), tail, index, self._shared)

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


def local_folder(store: StoreLike) -> Path | None:
    """The real folder a store is, however it is spelt (cache_location: a path, a `file:`/`local:` URL in any case,
    behind fsspec cache layers), so that every spelling of one folder takes its one lock; None for a store that is
    no local folder (an object store URL, a store object). ConfigError for a spelling that names neither."""
    if isinstance(store, LocalStore):
        return Path(os.path.realpath(store.root))
    if isinstance(store, (str, os.PathLike)):
        found = cache_location(os.fspath(store), Path.cwd())
        return found if isinstance(found, Path) else None
    return None
