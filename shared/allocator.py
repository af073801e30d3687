"""Keep freed memory in the process, so a forward pass does not fault its activations in again every time.

glibc's malloc hands blocks above its mmap threshold (128 KiB, raised as such blocks are freed, up to 32 MiB) to
the kernel as separate mappings, and gives them back when they are freed; it also trims the top of its heap. A CPU
forward pass allocates its activations afresh each call (PreActResNet-18 at batch 128 has tensors of 33.5 MB), so
every call page-faults them in again: a large share of the forward's time, and more or less of it depending on each
process's history, so that the same forward runs at different speeds in different processes (the service, a
benchmark). The figures, and the command that measures them, are in docs/design/trainer.md.

`keep_freed_memory` asks malloc to serve every allocation from its heap and never to trim it: a process then holds
what its largest step needed, as PyTorch's CUDA caching allocator does on a GPU, and reuses it. Every thread shares
that one heap (one arena): a thread's own arena grows in heaps of at most 64 MiB, and anything larger (PreActResNet-18
at batch 512 has tensors of 134 MB) would be mapped afresh each call, so the service's inference thread, which runs
its forward pass, would keep faulting where the main thread does not. Every `akd` command and
`python -m teacher_service` call it at start-up. `AKD_MALLOC=system` leaves the C library's defaults. Elsewhere than
glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "AKD_MALLOC"
CHOICES = ("keep", "system")
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes an int: free memory past 2 GiB at the heap's top is still given back
_NEVER_TRIM = 2**31 - 1


def malloc_choice() -> str:
    """`AKD_MALLOC`: "keep" (the default) or "system"; anything else is an error naming both."""
    value = os.environ.get(ENV, "keep").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}; got {os.environ[ENV]!r}")
    return value


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep what is freed (see the module docstring); True if it now does."""
    if malloc_choice() == "system":
        return False
    try:
        libc = ctypes.CDLL(None)
        # glibc only: its mallopt takes these parameters
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])


def keep_freed_memory_at_start(prog: str) -> int:
    """`keep_freed_memory` as a command's first step: its exit status, 0, or 2 with `AKD_MALLOC`'s error printed."""
    try:
        keep_freed_memory()
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0
