"""What a namespace on the store is worth, read-only: its metadata checked (`inspect_namespace`), its committed rows
read back and checked against their checksums a block at a time (`verified_blocks`).

Nothing on the store is trusted. Metadata that fails (unreadable `zarr.json`, a missing or odd array, `committed_rows`
not an integer in [0, rows the arrays hold], an older format without checksums) is NamespaceDamaged; a row fails
when its chunk does not decode or its checksum does not match. The service sets aside what fails (aside); `akd cache
verify` reports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from shared.hashing import KEY_BYTES
from teacher_service.cache.layout import COMMITTED, DAMAGED_DIR, EVICTED, FORMAT, Arrays
from teacher_service.cache.row_formats import FLOAT32, RowFormat, row_format
from teacher_service.cache.rows import Rows, row_bytes, row_checks, spans

# chunks read at once when verifying; a block that fails is read again chunk by chunk
READ_BLOCK_CHUNKS = 64


@dataclass
class Header:
    """A namespace whose metadata passed its checks (or that was just made); its rows are verified when it is loaded."""

    arrays: Arrays
    committed: int
    num_classes: int
    fmt: RowFormat = FLOAT32
    # whole chunks
    evicted: frozenset[int] = frozenset()

    @property
    def live_rows(self) -> int:
        """Committed rows not evicted."""
        return self.committed - len(self.evicted) * self.arrays.keys.chunks[0]

    @property
    def nbytes(self) -> int:
        return self.live_rows * row_bytes(self.num_classes, self.fmt)


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


def inspect_namespace(root: zarr.Group, version: str) -> Header:
    """A namespace's metadata, or NamespaceDamaged saying what is wrong with it (reads only)."""
    try:
        group = root[version]
    except Exception as exc:  # noqa: BLE001  (hostile metadata: any failure means damaged)
        raise NamespaceDamaged(f"metadata unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(group, zarr.Group):
        raise NamespaceDamaged("is an array, not a namespace group")
    attrs = dict(group.attrs)
    committed, num_classes = attrs.get(COMMITTED), attrs.get("num_classes")
    # a namespace without `dtype` (written before other row formats existed) holds float32 rows
    stored = attrs.get("dtype", "float32")
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
    return Header(
        Arrays(group, arrays["keys"], arrays["logits"], arrays["checks"]), committed, num_classes, fmt, evicted
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
    rows: Rows
    good: np.ndarray
    problems: list[str]


def verified_blocks(version: str, header: Header) -> Iterator[Block]:
    """A namespace's committed rows, a block at a time, each row checked: memory stays at one block whatever the
    namespace's size."""
    n, chunk_rows = header.committed, header.arrays.logits.chunks[0]
    block = chunk_rows * READ_BLOCK_CHUNKS
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = Rows.empty(stop - start, header.arrays.logits.shape[1], header.fmt.dtype)
        readable = np.ones(stop - start, bool)
        problems: list[str] = []

        def read(first: int, last: int, rows: Rows = rows, start: int = start) -> None:
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
                    # an evicted chunk's files, left behind by a crash mid-eviction, are no damage: nothing reads them
                    if first // chunk_rows not in header.evicted:
                        problems.append(
                            f"chunk {first // chunk_rows} (rows {first}-{last - 1}) unreadable: "
                            f"{type(exc).__name__}: {exc}"
                        )
        for chunk in header.evicted & set(range(start // chunk_rows, -(-stop // chunk_rows))):
            # gone, not damaged
            readable[chunk * chunk_rows - start : (chunk + 1) * chunk_rows - start] = False
        good = readable & (row_checks(version, rows.keys, rows.logits) == rows.checks)
        for chunk in np.unique((np.flatnonzero(readable & ~good) + start) // chunk_rows):
            where = np.arange(chunk * chunk_rows, min((chunk + 1) * chunk_rows, stop))
            problems.append(f"chunk {chunk}: rows {spans(where[~good[where - start]])} fail their checksum")
        yield Block(start, rows, good, problems)


def count_verified(version: str, header: Header) -> tuple[int, list[str]]:
    """How many committed rows verify, and what was wrong with the others (reads only)."""
    good, problems = 0, []
    for block in verified_blocks(version, header):
        good += int(block.good.sum())
        problems += block.problems
    return good, problems


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
