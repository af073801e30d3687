"""The cache's store-wide settings, one frozen value that `LogitCache`, `claim_slot` and every namespace share.

Light on purpose (no numpy, no zarr): the service's config takes its defaults from here, and importing it must not
load the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# rows a chunk holds (`[server.cache] chunk_rows`)
CHUNK_ROWS = 1024
# decoded chunks kept for hits, per namespace (`memory_bytes`), whatever the store holds
MEMORY_BYTES = 256 << 20
# the most of a namespace's key index kept resident (`index_memory_bytes`)
RESIDENT_BYTES = 256 << 20
WHEN_FULL = ("evict", "stop")


@dataclass(frozen=True)
class CacheSettings:
    """How one store is kept ([server.cache]). `max_bytes` bounds the rows of every namespace together; past it,
    `when_full` says whether the least recently used chunks are evicted or inserts stop. `durable` fsyncs a local
    folder's writes before committing them (other stores rely on their own durability)."""

    max_bytes: int
    chunk_rows: int = CHUNK_ROWS
    durable: bool = False
    memory_bytes: int = MEMORY_BYTES
    when_full: Literal["evict", "stop"] = "stop"
    index_memory_bytes: int = RESIDENT_BYTES

    def __post_init__(self) -> None:
        if self.when_full not in WHEN_FULL:
            raise ValueError(f"when_full is {self.when_full!r}, not one of {', '.join(WHEN_FULL)}")

    @property
    def evict(self) -> bool:
        return self.when_full == "evict"
