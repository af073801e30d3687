"""How uvicorn runs the app: timeouts, a head size bound and a connection limit, from `ServerConfig`.

`akd serve` and the tests' live servers both build their uvicorn settings with `uvicorn_options`, so what is
tested is what runs. uvicorn alone holds a connection forever until a request head is complete: its
keep-alive timeout starts only after a response, and any byte received resets it, so an idle socket or a
head sent a byte at a time holds a descriptor forever, and enough of them make good requests fail. Its
`limit_concurrency` answers past the limit only once a request head arrives, in plain text. The protocol
here adds, at the connection level where only the server sees them:

- a request-head deadline: from the moment a connection opens, or from the end of its last response, a
  complete request head must arrive within `[server.timeouts] header_s`, however slowly its bytes trickle; past it,
  408 (if part of a head came) and the connection closes;
- a bound on the head's size (`[server.limits] header_bytes`; httptools has none of its own), answered with 431;
- a connection limit (`[server.limits] connections`): a request on a connection opened past it gets a JSON 503 with
  `Retry-After` and the connection closes; one that sends nothing is closed by the head deadline.

The body has its own deadline (`[server.timeouts] body_s`), enforced where the app reads it (`body.read_body`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

# What uvicorn's "auto" picks when httptools is installed (a dependency): its parser calls back at each
# request's first byte, URL and header, which the head deadline and size bound below hook into.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from teacher_service.config import ServerConfig

log = logging.getLogger("akd.service")


def uvicorn_options(server: ServerConfig) -> dict:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` (all but the app, host and port)."""
    return {
        "http": guarded_protocol(server.limits.connections, server.timeouts.header_s, server.limits.header_bytes),
        "timeout_keep_alive": server.timeouts.keep_alive_s,
        "log_level": server.log_level,
    }


def _error_body(code: str, message: str, expected: str, received: str) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "expected": expected, "received": received}}
    ).encode()


def _raw_error(status: int, reason: bytes, body: bytes) -> bytes:
    """A complete HTTP/1.1 response, for the socket itself when no request (or no valid one) is in."""
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        status,
        reason,
        len(body),
        body,
    )


@dataclass(frozen=True)
class Guards:
    """One server's limits, and the responses that enforce them, written once when the server starts."""

    max_connections: int
    timeout_header_s: float
    max_header_bytes: int

    @cached_property
    def over_limit_body(self) -> bytes:
        return _error_body(
            "too_many_connections",
            "the service holds as many connections as it may; retry shortly",
            f"at most {self.max_connections} open connections",
            "a request on a connection past the limit",
        )

    @cached_property
    def head_timeout_response(self) -> bytes:
        return _raw_error(
            408,
            b"Request Timeout",
            _error_body(
                "header_timeout",
                "the request head did not arrive in time",
                f"a complete request line and headers within {self.timeout_header_s:g} s",
                "an incomplete request head",
            ),
        )

    @cached_property
    def head_too_large_response(self) -> bytes:
        return _raw_error(
            431,
            b"Request Header Fields Too Large",
            _error_body(
                "header_too_large",
                "the request line and headers are over the configured limit",
                f"at most {self.max_header_bytes} bytes",
                f"more than {self.max_header_bytes} bytes",
            ),
        )

    async def over_limit(self, scope, receive, send) -> None:
        """The app for a connection opened past the limit: one JSON 503 (uvicorn's own limit answers in plain text)."""
        log.warning("refused a request on a connection opened past the limit of %d connections", self.max_connections)
        body = self.over_limit_body
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the head deadline, head size bound and connection limit of `guards`."""

    guards: ClassVar[Guards]  # set on the subclass guarded_protocol makes for one server

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the current request head, counted by the parser's callbacks
        self._head_too_large = False
        if len(self.connections) > self.guards.max_connections:
            self.app = self.guards.over_limit  # counted once, when it opens: it stays refused for its one request
        self._wait_for_head()

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self._waiting_cycle = self.cycle  # a complete head makes a new self.cycle
        self._head_started = False
        self._head_timer = self.loop.call_later(self.guards.timeout_header_s, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:  # part of a request came; an idle connection is just closed, like keep-alive's
            self.transport.write(self.guards.head_timeout_response)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        waiting = self._head_timer is not None
        super().data_received(data)
        if waiting and self.cycle is not self._waiting_cycle:
            self._stop_waiting()  # the head is in: the app, and its body deadline, take over

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            self._wait_for_head()  # nothing pipelined behind it: the next head is on the clock

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            return super().send_400_response(msg)
        self.transport.write(self.guards.head_too_large_response)
        self.transport.close()

    # httptools' parser callbacks
    def on_message_begin(self) -> None:
        self._head_bytes, self._head_started = 0, True
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.guards.max_header_bytes:
            self._head_too_large = True
            # httptools: a parser error, so send_400_response
            raise ValueError(f"request head over {self.guards.max_header_bytes} bytes")


def guarded_protocol(max_connections: int, timeout_header_s: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a request-head deadline, a head size bound and a connection limit."""
    guards = Guards(max_connections, timeout_header_s, max_header_bytes)
    return type("GuardedProtocol", (GuardedProtocol,), {"guards": guards})
