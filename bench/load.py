"""Closed-loop load: N trainer-like clients, each with its own connection, each sending its next
request as soon as its last one is answered. Bodies are built before the clock starts, so
the clients cost little and the server is what is measured.
"""

from __future__ import annotations

import asyncio
import time
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

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


async def _client_loop(client: httpx.AsyncClient, request: Request, count: int, latencies: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        response = await client.post(request.path, content=request.content, params=request.params, headers=request.headers)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"POST {request.path} answered {response.status_code}: {response.text[:300]}")


async def _run(url: str, requests: list[Request], count: int) -> LoadResult:
    clients = [httpx.AsyncClient(base_url=url, timeout=300) for _ in requests]
    try:
        # one untimed request each: connections open before the clock starts
        await asyncio.gather(*(_client_loop(c, r, 1, []) for c, r in zip(clients, requests)))
        latencies: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(*(_client_loop(c, r, count, latencies) for c, r in zip(clients, requests)))
        seconds = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return LoadResult(sum(r.rows for r in requests) * count, seconds, latencies)


def closed_loop(url: str, requests: list[Request], count: int) -> LoadResult:
    """One client per entry of `requests`, each sending its request `count` times."""
    return asyncio.run(_run(url, requests, count))
