"""Starting a teacher service and knowing when it is ready: used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import httpx

from shared.protocol import HEALTH_PATH


def free_port() -> int:
    """A free loopback port (free when asked; bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, alive: Callable[[], bool], timeout_s: float, path: str = HEALTH_PATH) -> None:
    """Poll GET `path` (/healthz) until it answers 200; fail early if the server died, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server at {url} exited during start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"the server at {url} was not healthy after {timeout_s:.0f}s")
