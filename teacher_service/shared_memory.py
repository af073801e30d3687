"""The registered system shared-memory regions, as the Open Inference Protocol's shared-memory extension defines them.

A client (tritonclient.utils.shared_memory) creates a POSIX segment (shm_open: the file /dev/shm/<key>), registers a
region of it by name (key, offset, byte_size), then names that region in an infer request's inputs and outputs
instead of sending their bytes. `SharedMemoryRegions` is the table of those regions: it checks each registration, maps
only the registered range, hands out views of it one use at a time, and drops the regions whose client is gone.

Invariants, each for a reason:
- A key is one file name in the shm folder, never a path, opened without following a symlink, and only a regular file
  owned by this process's effective user is mapped: a client can make the service read or write only memory it could
  have opened itself. A segment of another user, which a root service or a lax file mode would let the service open,
  is refused (403).
- No two regions share a byte of one segment (same device and inode): two names aliasing the same bytes would let one
  client read or write what another's region holds.
- The regions together stay within `max_regions` and `max_bytes`, a quota on what the service holds for its clients.
- A mapping is unmapped only when no use of it is in flight: unregistering (or a sweep) takes the name away at once,
  and a use already begun keeps valid memory to the end of its block.
- Every refusal is a `ServiceError` and leaves the table as it was.

What no check can prevent: a process of the service's user that shrinks its segment under a registered range makes an
access past the file's end fault (SIGBUS). `use` checks the segment's size each time, so a shrink between requests is
a refusal; a shrink during a copy is as fatal as anything else a process of the service's user can do to it, such as
signal it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from teacher_service.errors import ServiceError

log = logging.getLogger("akd.service")

NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
KEY = re.compile(r"/?([A-Za-z0-9._-]{1,255})")
NAME_RULE = "1 to 128 characters of [A-Za-z0-9._-]"
KEY_RULE = "an optional '/' then 1 to 255 characters of [A-Za-z0-9._-], not '.' or '..' (one file name, never a path)"
SEGMENT = f"a segment that user {os.geteuid()} (the service's) created and may read and write: a regular file it owns"
PROC = Path("/proc")
# A file's identity in /proc/<pid>/maps: (major, minor) of its device, and its inode
Inode = tuple[int, int, int]
# How a failed open of a key is refused, by errno: (status, code); any other errno is 400 region_key_unusable
OPEN_REFUSALS = {
    errno.ENOENT: (400, "region_key_not_found"),
    # a symlink, refused by O_NOFOLLOW
    errno.ELOOP: (400, "region_key_not_a_segment"),
    errno.EISDIR: (400, "region_key_not_a_segment"),
    errno.EACCES: (403, "region_key_forbidden"),
    errno.EPERM: (403, "region_key_forbidden"),
    # the service's own shortage, not the client's doing
    errno.EMFILE: (503, "region_open_failed"),
    errno.ENFILE: (503, "region_open_failed"),
    errno.ENOMEM: (503, "region_open_failed"),
}


def _shown(value: object) -> str:
    """A hostile value as an error message may quote it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refused(status: int, code: str, what: str, expected: str, received: str) -> ServiceError:
    """A refusal whose message says what was expected of `what` and what came."""
    return ServiceError(status, code, f"{what}: expected {expected}, received {received}", expected, received)


def _not_found(status: int, name: object) -> ServiceError:
    return _refused(status, "region_not_found", "shared-memory region", "a registered region's name", _shown(name))


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _refused(400, "bad_region_name", "shared-memory region name", NAME_RULE, _shown(name))


def _file_name(key: object) -> str:
    """The segment's file name in the shm folder: the key without its leading "/" (as shm_open reads it)."""
    match = KEY.fullmatch(key) if isinstance(key, str) else None
    if match is None or match[1] in (".", ".."):
        raise _refused(400, "bad_region_key", "shared-memory key", KEY_RULE, _shown(key))
    return match[1]


def _check_int(what: str, value: object, least: int) -> None:
    # bool is an int to Python, never to JSON
    if type(value) is not int or value < least:
        raise _refused(400, "bad_region_range", what, f"an integer >= {least}", _shown(value))


def _check_end(what: str, offset: int, byte_size: int, size: int) -> None:
    """offset + byte_size must stay within `size`, the bytes of `what`."""
    if offset + byte_size > size:
        got = f"offset {offset} + byte_size {byte_size} = {offset + byte_size}"
        raise _refused(400, "bad_region_range", f"the end of the range in {what}", f"at most {size}", got)


def _open_segment(folder: Path, key: str, file_name: str) -> int:
    """The segment's fd, read-write; never through a symlink, and never blocking (a FIFO put under the key)."""
    try:
        return os.open(folder / file_name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        status, code = OPEN_REFUSALS.get(exc.errno, (400, "region_key_unusable"))
        raise _refused(status, code, f"shared-memory key {key!r}", SEGMENT, exc.strerror or str(exc)) from None


def check_segment(info: os.stat_result, key: str) -> None:
    """A segment is a regular file owned by this process's effective user; else refused, whatever its mode allows.

    The owner check is what keeps a client to memory it could open itself: a service running as root, or a segment
    with a lax mode, would otherwise let any client read or write another user's memory through the service.
    """
    what = f"shared-memory key {key!r}"
    if not stat.S_ISREG(info.st_mode):
        raise _refused(400, "region_key_not_a_segment", what, SEGMENT, f"a file of mode {info.st_mode:#o}")
    if info.st_uid != os.geteuid():
        raise _refused(403, "region_key_forbidden", what, SEGMENT, f"a segment of user {info.st_uid}")


def _map(fd: int, offset: int, byte_size: int) -> tuple[mmap.mmap, int]:
    """The registered range mapped shared and writable, from the page holding its first byte; and where it starts."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        return mmap.mmap(fd, offset + byte_size - start, access=mmap.ACCESS_WRITE, offset=start), offset - start
    except OSError as exc:
        raise ServiceError(503, "region_map_failed", f"mapping the shared-memory region failed: {exc}") from None


@dataclass(eq=False)
class _Region:
    """A registered region and its mapping. `users` and `live` change under the table's lock only."""

    name: str
    key: str
    offset: int
    byte_size: int
    inode: Inode
    fd: int
    mapped: mmap.mmap
    # where the region's first byte lies in `mapped`, which begins at a page boundary
    start: int
    # another process mapped the segment at registration: the region goes once none does (its client died)
    watched: bool
    users: int = 0
    live: bool = True
    closed: bool = False

    def overlaps(self, inode: Inode, offset: int, byte_size: int) -> bool:
        return inode == self.inode and offset < self.offset + self.byte_size and self.offset < offset + byte_size

    @property
    def span(self) -> str:
        return f"bytes [{self.offset}, {self.offset + self.byte_size})"

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def close(self) -> None:
        """Unmapped and its fd closed, once. A view a caller kept past its use keeps the mapping alive instead: it is
        unmapped when that view is collected (the mmap's own reference), never pulled from under it."""
        if self.closed:
            return
        self.closed = True
        os.close(self.fd)
        try:
            self.mapped.close()
        except BufferError:
            log.warning(
                "shared-memory region %r (key %r): a view outlived its use; unmapped when it goes", self.name, self.key
            )


class RegionUse:
    """One use of a region: `buffer`, a writable memoryview of the bytes asked for, valid inside the `with` block
    only (it is released at its end); `live`, False once the region was unregistered or dropped.

    A writer checks `live` after writing its answer: False means the client took the region away first, and may
    never read these bytes (the memory itself stayed valid all along)."""

    __slots__ = ("_region", "buffer")

    def __init__(self, region: _Region, buffer: memoryview):
        self._region, self.buffer = region, buffer

    @property
    def live(self) -> bool:
        return self._region.live


def _release(view: memoryview, region: _Region) -> None:
    try:
        view.release()
    except BufferError:
        log.warning("shared-memory region %r: a view of it was kept past its use", region.name)


def _check_unshrunk(region: _Region) -> None:
    """The segment still holds the registered range: an access past a file's end would fault (SIGBUS), not fail."""
    size, end = os.fstat(region.fd).st_size, region.offset + region.byte_size
    if size < end:
        what = f"segment {region.key!r} of region {region.name!r}"
        raise _refused(400, "region_segment_shrunk", what, f"at least {end} bytes", f"{size} bytes")


def _unlinked(region: _Region) -> bool:
    return os.fstat(region.fd).st_nlink == 0


def _inode(info: os.stat_result) -> Inode:
    return os.major(info.st_dev), os.minor(info.st_dev), info.st_ino


def _inodes_in(maps: bytes, wanted: set[Inode]) -> set[Inode]:
    """Which of `wanted` a maps file's lines ("addr perms offset major:minor inode path") name; odd lines skipped."""
    found = set()
    for line in maps.splitlines():
        fields = line.split(None, 5)
        try:
            major, minor = fields[3].split(b":")
            inode = (int(major, 16), int(minor, 16), int(fields[4]))
        except (IndexError, ValueError):
            continue
        if inode in wanted:
            found.add(inode)
    return found


def mapped_elsewhere(wanted: set[Inode], proc: Path = PROC) -> set[Inode]:
    """Which of `wanted` some process other than this one maps, read from every /proc/<pid>/maps.

    Newest pids first (a client is most often younger than the service), stopping once all are found; a file is
    parsed only where an inode's text appears in it. A process that ends mid-scan, or whose maps this one may not read,
    counts as mapping nothing. Processes in another pid namespace (a client in another container) are not seen.
    """
    if not wanted:
        return set()
    own, found = str(os.getpid()), set()
    tokens = [b" %d " % inode[2] for inode in wanted]
    try:
        pids = sorted((name for name in os.listdir(proc) if name.isdigit() and name != own), key=int, reverse=True)
    except OSError:
        return found
    for pid in pids:
        try:
            maps = (proc / pid / "maps").read_bytes()
        except OSError:
            continue
        if any(token in maps for token in tokens):
            found |= _inodes_in(maps, wanted)
            if found >= wanted:
                break
    return found


class SharedMemoryRegions:
    """The table of registered regions, safe to call from the event loop and worker threads alike (one lock).

    Dropping the regions of a client that died (`sweep`): at registration, /proc is scanned for another process that
    maps the segment; where one did, the region is dropped once none does. Where none was visible (a client in
    another pid namespace, e.g. another container), the region stays until it is unregistered or its segment unlinked.
    """

    def __init__(self, max_regions: int, max_bytes: int, shm_dir: Path = Path("/dev/shm")):
        self.max_regions, self.max_bytes, self.shm_dir = max_regions, max_bytes, Path(shm_dir)
        self._lock = threading.Lock()
        self._table: dict[str, _Region] = {}

    @property
    def count(self) -> int:
        return len(self._table)

    @property
    def registered_bytes(self) -> int:
        with self._lock:
            return sum(region.byte_size for region in self._table.values())

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Maps `byte_size` bytes at `offset` of segment `key` under `name`, or refuses (nothing held then).

        Reads /proc once (`mapped_elsewhere`, stopping at the first other process that maps the segment): a few ms."""
        _check_name(name)
        file_name = _file_name(key)
        _check_int("offset", offset, 0)
        _check_int("byte_size", byte_size, 1)
        with self._lock:
            self._refuse_taken(name)
        fd = _open_segment(self.shm_dir, key, file_name)
        try:
            info = os.fstat(fd)
            check_segment(info, key)
            _check_end(f"segment {key!r}", offset, byte_size, info.st_size)
            mapped, start = _map(fd, offset, byte_size)
        except BaseException:
            os.close(fd)
            raise
        inode = _inode(info)
        region = _Region(name, key, offset, byte_size, inode, fd, mapped, start, bool(mapped_elsewhere({inode})))
        try:
            with self._lock:
                self._admit(region)
        except BaseException:
            region.close()
            raise

    def _refuse_taken(self, name: str) -> None:
        if name in self._table:
            raise _refused(400, "region_exists", "region name", "a name no registered region has", f"{name!r}, taken")

    def _admit(self, region: _Region) -> None:
        """Into the table, under the lock, or refused: its name taken, its bytes another's, past a bound."""
        self._refuse_taken(region.name)
        for other in self._table.values():
            if other.overlaps(region.inode, region.offset, region.byte_size):
                theirs = f"bytes [{other.offset}, {other.offset + other.byte_size}), region {other.name!r}'s"
                raise _refused(400, "region_overlaps", f"range of {region.key!r}", f"none of {theirs}", region.span)
        # 429, as a quota: a bound on what the service holds for its clients, which unregistering frees
        if len(self._table) >= self.max_regions:
            count = f"{len(self._table) + 1}"
            raise _refused(429, "too_many_regions", "registered regions", f"at most {self.max_regions}", count)
        held = sum(other.byte_size for other in self._table.values())
        if held + region.byte_size > self.max_bytes:
            bound = f"at most {self.max_bytes - held} bytes more ({held} of {self.max_bytes} are registered)"
            raise _refused(429, "regions_too_large", "byte_size", bound, str(region.byte_size))
        self._table[region.name] = region

    def unregister(self, name: str | None = None) -> None:
        """Takes `name` (None: every region) away at once; its mapping goes when its last use in flight ends.
        An unknown name is no error, as Triton has it: unregistering is idempotent."""
        with self._lock:
            regions = list(self._table.values()) if name is None else [self._table.get(name)]
            idle = self._remove([region for region in regions if region is not None])
        for region in idle:
            region.close()

    def _remove(self, regions: list[_Region]) -> list[_Region]:
        """Out of the table, under the lock: no use can begin; those with no use in flight, to close now."""
        for region in regions:
            del self._table[region.name]
            region.live = False
        return [region for region in regions if region.users == 0]

    def status(self, name: str | None = None) -> list[dict]:
        """[{"name", "key", "offset", "byte_size"}], by name, as Triton answers; an unknown name is a 404."""
        with self._lock:
            if name is None:
                return [self._table[known].status() for known in sorted(self._table)]
            if name not in self._table:
                raise _not_found(404, name)
            return [self._table[name].status()]

    @contextlib.contextmanager
    def use(self, name: str, offset: int, byte_size: int) -> Iterator[RegionUse]:
        """Bytes [offset, offset + byte_size) of region `name` (offset counted from the region's own), as a RegionUse
        valid inside the block; byte_size may be 0. The memory stays mapped until the block ends, whatever happens."""
        region = self._acquire(name, offset, byte_size)
        try:
            _check_unshrunk(region)
            whole = memoryview(region.mapped)
            view = whole[region.start + offset : region.start + offset + byte_size]
            try:
                yield RegionUse(region, view)
            finally:
                _release(view, region)
                whole.release()
        finally:
            self._let_go(region)

    def _acquire(self, name: str, offset: int, byte_size: int) -> _Region:
        _check_int("shared_memory_offset", offset, 0)
        _check_int("shared_memory_byte_size", byte_size, 0)
        with self._lock:
            region = self._table.get(name)
            if region is None:
                raise _not_found(400, name)
            _check_end(f"region {name!r}", offset, byte_size, region.byte_size)
            region.users += 1
            return region

    def _let_go(self, region: _Region) -> None:
        with self._lock:
            region.users -= 1
            last = region.users == 0 and not region.live
        if last:
            region.close()

    def sweep(self) -> list[str]:
        """Drops the regions whose segment was unlinked, and the watched ones no other process maps any more (their
        client died without unregistering); returns their names. The /proc scan runs outside the lock."""
        with self._lock:
            unlinked = [region for region in self._table.values() if _unlinked(region)]
            watched = [region for region in self._table.values() if region.watched and region not in unlinked]
        mapped = mapped_elsewhere({region.inode for region in watched})
        orphans = [region for region in watched if region.inode not in mapped]
        return self._drop(unlinked, "its segment was unlinked") + self._drop(orphans, "no other process maps it now")

    def _drop(self, regions: list[_Region], why: str) -> list[str]:
        with self._lock:
            # unregistered (and perhaps registered anew) since the sweep looked: not this sweep's to drop
            current = [region for region in regions if self._table.get(region.name) is region]
            idle = self._remove(current)
        for region in current:
            log.info("dropped shared-memory region %r (key %r): %s", region.name, region.key, why)
        for region in idle:
            region.close()
        return [region.name for region in current]

    def close(self) -> None:
        """Every region unregistered (service shutdown); each unmapped now, or when its use in flight ends."""
        self.unregister()
