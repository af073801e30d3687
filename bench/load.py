"""Closed-loop load: N trainer-like clients, each with its own connection, each sending its next request as soon as
its last one is answered.

The clients are a load generator, as wrk is: each request's bytes, head and body, are built before the clock starts
and written as they are, and each answer is framed by httptools' response parser (the C parser uvicorn runs on).
On a machine the server shares with its clients, the clients' CPU comes out of the server's; a client that costs a
small fraction of what a general HTTP client (httpx) does per request leaves that CPU to the server, so the server is
what is measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

import httptools


@dataclass
class Request:
    """What one client sends, again and again."""

    path: str
    content: bytes
    rows: int
    params: dict | None = None
    headers: dict | None = None

    def raw(self, host: str) -> bytes:
        """The whole POST as it goes on the wire: HTTP/1.1, kept alive, the body's length declared."""
        target = self.path + (f"?{urlencode(self.params)}" if self.params else "")
        fields = {"host": host, "content-type": "application/octet-stream"}
        fields |= {name.lower(): value for name, value in (self.headers or {}).items()}
        fields["content-length"] = str(len(self.content))
        head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        return f"POST {target} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + self.content


@dataclass
class LoadResult:
    rows: int
    seconds: float
    latencies_s: list[float]
    # CPU the server's processes spent meanwhile
    server_cpu_s: float | None = None
    # CPU this process (all the clients) spent meanwhile
    client_cpu_s: float | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


class _Connection(asyncio.Protocol):
    """One keep-alive connection with one request in flight at a time; `post` resolves to (status, body)."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future | None = None
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def post(self, raw: bytes) -> asyncio.Future:
        self._body, self._answer = [], asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return self._answer

    def close(self) -> None:
        self._transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"an answer that is not HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"the server closed the connection: {exc or 'no error given'}"))

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    # httptools' callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result((self._parser.get_status_code(), b"".join(self._body)))


async def _client_loop(connection: _Connection, request: Request, raw: bytes, count: int, latencies: list[float]):
    for _ in range(count):
        started = time.perf_counter()
        status, body = await connection.post(raw)
        latencies.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"POST {request.path} answered {status}: {body[:300].decode(errors='replace')}")


async def _run(url: str, requests: list[Request], count: int, server_cpu: Callable[[], float | None]) -> LoadResult:
    address, loop = urlsplit(url), asyncio.get_running_loop()
    raws = [r.raw(address.netloc) for r in requests]
    connections: list[_Connection] = []
    try:
        for _ in requests:
            _, connection = await loop.create_connection(_Connection, address.hostname, address.port)
            connections.append(connection)
        clients = list(zip(connections, requests, raws))
        # one untimed request each: connections open before the clock starts
        await asyncio.gather(*(_client_loop(c, r, raw, 1, []) for c, r, raw in clients))
        latencies: list[float] = []
        server_before, client_before = server_cpu(), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(_client_loop(c, r, raw, count, latencies) for c, r, raw in clients))
        seconds = time.perf_counter() - started
        server_after, client_after = server_cpu(), time.process_time()
    finally:
        for connection in connections:
            connection.close()
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
