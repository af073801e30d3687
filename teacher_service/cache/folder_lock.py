"""One writer per local cache folder: an exclusive kernel lock (flock) on the folder itself.

The lock belongs to the folder's inode, not to the path it was reached by, so every path to one folder (a symlink,
`..`, a trailing slash) meets the same lock; the kernel drops it when its holder dies, `kill -9` included, so a
crash leaves nothing to clean up. No file is made inside the zarr hierarchy. A refusal is one line naming the
folder and, where /proc/locks shows it, the process that holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

# of the holder's command line shown in a refusal: enough to tell which service it is
COMMAND_CHARS = 160


class StoreLocked(RuntimeError):
    """Another process writes to this store: two writers would lose rows."""


def lock_folder(folder: Path) -> int:
    """An exclusive flock on `folder` (made if missing); the open descriptor that holds it, for `os.close`.

    Raises StoreLocked, naming the folder and its holder, when another open of the folder holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise StoreLocked(
            f"cache store {folder} is in use by another teacher service ({holder}); give each server its own cache.dir"
        ) from None
    return fd


def lock_holder(fd: int) -> str:
    """Who holds the flock on the file open as `fd`: 'pid N: its command line', as /proc/locks and /proc/N/cmdline
    tell; a weaker phrase where they do not (another pid namespace, no /proc)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "its process is not visible here"
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 6715 fe:00:2147092 0 EOF"; a blocked waiter's line reads "1: -> FLOCK ..."
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
            return _process(fields[4])
    return "its process is not visible here"


def _process(pid: str) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    command = " ".join(arg.decode(errors="replace") for arg in argv if arg)
    # one line, whatever the arguments hold
    command = " ".join(command.split())
    return f"pid {pid}: {command[:COMMAND_CHARS]}" + ("..." if len(command) > COMMAND_CHARS else "")
