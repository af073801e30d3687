"""Replica slots: the replicas of one config (a scaled compose service) share its cache folder, each a store of its own.

They cannot each be given a cache dir, and must not share one store (one writer per store): each claims a
`replica-<i>` folder with the same kernel lock a single store takes (folder_lock), so the rule stands, and a replica
restarted after a crash takes a free folder back, rows and all.
"""

from __future__ import annotations

import logging
from pathlib import Path

from teacher_service.cache.folder_lock import StoreLocked
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.store import LogitCache

log = logging.getLogger("akd.cache")


def claim_slot(parent: Path, slots: int, settings: CacheSettings) -> LogitCache:
    """The cache of the first `replica-<i>` folder under `parent` (i < `slots`) that no running replica holds;
    StoreLocked when every one is held."""
    for slot in range(slots):
        try:
            cache = LogitCache(Path(parent) / f"replica-{slot}", settings)
        except StoreLocked:
            continue
        log.info("cache: this replica claimed %s (slot %d of %d)", cache.store, slot, slots)
        return cache
    raise StoreLocked(
        f"all {slots} cache folders replica-0..replica-{slots - 1} in {parent} are held by running replicas: "
        f"raise [server.cache] slots to at least the number of replicas"
    )
