"""Closed-loop load: N trainer-like clients, each with its own connection, each sending its next
request as soon as its last one is answered. Bodies are built before the clock starts, so
the clients cost little and the server is what is measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass
class Request:
    """What one client sends, again and again."""

    path: str
    content: bytes
    rows: int
    params: dict | None = None
    headers: dict | None = None


@dataclass
class LoadResult:
    rows: int
    seconds: float
    latencies_s: list[float]
    server_cpu_s: float | None = None  # CPU the server's processes spent meanwhile
    client_cpu_s: float | None = None  # CPU this process (all the clients) spent meanwhile

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


async def _client_loop(client: httpx.AsyncClient, request: Request, count: int, latencies: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        response = await client.post(
            request.path, content=request.content, params=request.params, headers=request.headers
        )
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"POST {request.path} answered {response.status_code}: {response.text[:300]}")


async def _run(url: str, requests: list[Request], count: int, server_cpu: Callable[[], float | None]) -> LoadResult:
    clients = [httpx.AsyncClient(base_url=url, timeout=300) for _ in requests]
    try:
        # one untimed request each: connections open before the clock starts
        await asyncio.gather(*(_client_loop(c, r, 1, []) for c, r in zip(clients, requests)))
        latencies: list[float] = []
        server_before, client_before = server_cpu(), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(_client_loop(c, r, count, latencies) for c, r in zip(clients, requests)))
        seconds = time.perf_counter() - started
        server_after, client_after = server_cpu(), time.process_time()
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    server_spent = server_after - server_before if server_before is not None and server_after is not None else None
    return LoadResult(
        sum(r.rows for r in requests) * count, seconds, latencies, server_spent, client_after - client_before
    )


def closed_loop(
    url: str, requests: list[Request], count: int, server_cpu: Callable[[], float | None] = lambda: None
) -> LoadResult:
    """One client per entry of `requests`, each sending its request `count` times; `server_cpu` reads the server's CPU
    time."""
    return asyncio.run(_run(url, requests, count, server_cpu))
