"""The store's size bound, shared by every namespace, and what a write that ran out of space means for it."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

log = logging.getLogger("akd.cache")


class CacheBudget:
    """The size bound, shared by every namespace: past it, `evict` makes room (the least recently used chunks of the
    served namespaces go), or, without it or when nothing more can go, inserts stop."""

    def __init__(self, max_bytes: int, used_bytes: int = 0, evict: Callable[[int], int] | None = None):
        self.max_bytes = max_bytes
        self.used_bytes = used_bytes
        # bytes wanted -> bytes freed
        self.evict = evict
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


def out_of_space(exc: BaseException) -> bool:
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
