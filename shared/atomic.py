"""Files that readers see whole or not at all, whatever kills the writer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write; renamed over `path` when the block ends without error.

    A rename within one folder is atomic, so a reader (or a resume after kill -9) finds the old
    file or the new one, never half of one; a failed write leaves no temp file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
