"""`durable` on a local folder: what is fsynced, and in which order, so that a power loss loses only buffered rows.

A chunk's files, and the folder entries that name them (and after a resize the new folders and the arrays' metadata),
are fsynced before `committed_rows` is written; the attributes file and its folder after. Every fsync goes through
`fsync`, so the order can be observed.
"""

from __future__ import annotations

import os
from pathlib import Path

from teacher_service.cache.layout import Arrays


def fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_new_namespace(root: Path, folder: Path, arrays: Arrays) -> None:
    """A namespace just made: its arrays' metadata, its own, and the entries naming them up to the root's folder."""
    for name, _ in arrays.all():
        fsync(folder / name / "zarr.json")
        fsync(folder / name, directory=True)
    fsync(folder / "zarr.json")
    fsync(folder, directory=True)
    fsync(root, directory=True)


def sync_chunk(folder: Path, arrays: Arrays, chunk: int, resized: bool) -> None:
    """The chunk files and the folder entries that name them; after a resize, the new folders and shapes too."""
    for name, array in arrays.all():
        home = folder / name
        path = home / array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))
        # zarr leaves out a chunk that is all fill value (zeros): nothing to sync
        if path.exists():
            fsync(path)
        fsync(path.parent, directory=True)
        # new chunk folders: make their entries durable, up to the array's folder
        if resized:
            for parent in list(path.parents)[1:]:
                if parent == home:
                    break
                fsync(parent, directory=True)
            fsync(home / "zarr.json")
            fsync(home, directory=True)


def sync_commit(folder: Path) -> None:
    """After `committed_rows` is written: the attributes file, then its folder's entry."""
    fsync(folder / "zarr.json")
    fsync(folder, directory=True)


def sync_attributes(folder: Path) -> None:
    fsync(folder / "zarr.json")
