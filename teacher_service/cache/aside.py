"""Start-up: what damage or a crash left on the store is set aside, so the service always starts.

A namespace whose metadata fails its checks is set aside at start-up and rebuilt empty when served; one with rows
that fail is set aside when loaded and rebuilt from the rows that verified (spilled to temporary files first, so that
salvaging a large namespace needs no memory of its size). A root whose `zarr.json` is unreadable has that file set
aside; its namespaces are judged one by one. "Set aside" means renamed into `<folder>/.damaged/<name>-<time>` for a
local folder (kept until deleted; not counted against `max_bytes`), and deleted on any other store, which cannot keep
a copy. Each case is logged as a warning naming the namespace, the chunks/rows and where it went, and counted in
`damage` (`akd_cache_damaged_rows_total`, `akd_cache_damaged_namespaces_total`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, StoreLike

from shared.hashing import KEY_BYTES
from teacher_service.cache.key_index import FileBacked
from teacher_service.cache.layout import DAMAGED_DIR
from teacher_service.cache.verify import (
    Damage,
    Header,
    NamespaceDamaged,
    inspect_namespace,
    list_namespaces,
    verified_blocks,
)

log = logging.getLogger("akd.cache")


class SetAside:
    """Where one store's damaged parts go, and the record of what each namespace lost (`damage`, by version)."""

    def __init__(self, store: StoreLike, folder: Path | None, damage: dict[str, Damage]):
        self.store, self.folder, self.damage = store, folder, damage
        self.root: zarr.Group | None = None

    def open_root(self) -> zarr.Group:
        """The store's root group; if its `zarr.json` is unreadable, that file is set aside first (a RuntimeError
        where the store is neither a local folder nor a store that can delete it)."""
        try:
            self.root = zarr.open_group(self.store, mode="a")
            return self.root
        except Exception as exc:  # noqa: BLE001  (whatever the file holds makes zarr fail its own way)
            reason = f"{type(exc).__name__}: {exc}"
            if self.folder is not None and (self.folder / "zarr.json").is_file():
                aside = self._path("root")
                aside.mkdir(parents=True)
                os.replace(self.folder / "zarr.json", aside / "zarr.json")
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
        self.root = zarr.open_group(self.store, mode="a")
        return self.root

    def inspect_namespaces(self) -> tuple[dict[str, Header], set[str]]:
        """Every namespace whose metadata passes; the rest are set aside. Entries without zarr.json are not ours: left
        alone."""
        names, foreign = list_namespaces(self.root)
        headers = {}
        for name in names:
            try:
                headers[name] = inspect_namespace(self.root, name)
            except NamespaceDamaged as exc:
                self.namespace(name, str(exc), exc.rows, "it is rebuilt empty when served")
        return headers, set(foreign)

    def namespace(self, version: str, reason: str, rows: int, then: str) -> str:
        """Move a namespace out of the store (or delete it where the store cannot keep a copy); record and log it."""
        if self.folder is not None:
            aside = self._path(version)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.folder / version, aside)
            where = f"set aside to {aside} (kept for inspection; delete it when done)"
        else:
            sync(self.root.store.delete_dir(version))
            where = "deleted (this store cannot keep a copy aside)"
        damage = self.damage.setdefault(version, Damage())
        damage.rows += rows
        damage.namespaces += 1
        damage.places.append(where)
        log.warning("cache namespace %s: %s; %s; %s", version, reason, where, then)
        return where

    def _path(self, name: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.folder / DAMAGED_DIR / f"{name}-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.folder / DAMAGED_DIR / f"{name}-{stamp}-{n}"
        return aside


def spill_verified(version: str, header: Header, good: int, folder: Path | None) -> list[FileBacked]:
    """A damaged namespace's sound rows (`good` of them), copied into temporary files under `folder` (the system's
    temp folder when None) before it is set aside, for a store that cannot keep a copy deletes it."""
    spill = [
        FileBacked((good, KEY_BYTES), np.uint8, folder),
        FileBacked((good, header.arrays.logits.shape[1]), header.fmt.dtype, folder),
    ]
    at = 0
    for block in verified_blocks(version, header):
        kept = np.flatnonzero(block.good)
        spill[0].array[at : at + len(kept)] = block.rows.keys[kept]
        spill[1].array[at : at + len(kept)] = block.rows.logits[kept]
        at += len(kept)
    return spill


def remove_torn_writes(folder: Path) -> None:
    """zarr's local store writes `<key>.<uuid>.partial` then renames it; a kill -9 can leave one behind."""
    for leftover in folder.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
