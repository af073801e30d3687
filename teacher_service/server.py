"""How uvicorn runs the app: timeouts, a head size bound and a connection limit, from `ServerConfig`.

`akd serve` and the tests' live servers both build their uvicorn settings with `uvicorn_options`, so what is tested
is what runs. uvicorn alone holds a connection forever until a request head is complete: its keep-alive timeout
starts only after a response, and any byte received resets it, so an idle socket or a head sent a byte at a time
holds a descriptor forever, and enough of them make good requests fail. Its `limit_concurrency` answers past the
limit only once a request head arrives, in plain text. The protocol it runs (`framework.GuardedProtocol`, uvicorn's
own extended with the `Guards` here; framework.py says which of uvicorn's internals that relies on) adds, at the
connection level where only the server sees them:

- a request-head deadline: from the moment a connection opens, or from the end of its last response, a
  complete request head must arrive within `[server.timeouts] header_s`, however slowly its bytes trickle; past it,
  408 (if part of a head came) and the connection closes;
- a bound on the head's size (`[server.limits] header_bytes`; httptools has none of its own), answered with 431;
- a connection limit (`[server.limits] connections`): a request on a connection opened past it gets a JSON 503 with
  `Retry-After` and the connection closes; one that sends nothing is closed by the head deadline.

The body has its own deadline (`[server.timeouts] body_s`), enforced where the app reads it (`body.read_body`).

`serve` runs an app as `akd serve` does: a stop signal (SIGTERM, Ctrl-C) makes the service no longer ready at once
(GET /readyz answers 503) and, after `[server.timeouts] drain_s` more of serving (framework.DrainingServer), stops it
the way uvicorn does: no new connections, the requests in flight finished, the app's shutdown (the cache flushed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import uvicorn

from teacher_service.config import ServerConfig
from teacher_service.framework import DrainingServer, GuardedProtocol

log = logging.getLogger("akd.service")


def uvicorn_options(server: ServerConfig) -> dict:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` (all but the app, host and port)."""
    return {
        "http": guarded_protocol(server.limits.connections, server.timeouts.header_s, server.limits.header_bytes),
        "timeout_keep_alive": server.timeouts.keep_alive_s,
        "log_level": server.log_level,
    }


def serve(app, server: ServerConfig, on_stop: Callable[[], None]) -> int:
    """Serve `app` on `server`'s host and port until stopped (see the module docstring); uvicorn's exit status for a
    server that never started (3), else 0. `on_stop` runs on the first stop signal."""
    config = uvicorn.Config(app, host=server.host, port=server.port, **uvicorn_options(server))
    running = DrainingServer(config, server.timeouts.drain_s, on_stop)
    # uvicorn re-raises a stop signal after a graceful exit; Ctrl-C's is KeyboardInterrupt, as under uvicorn.run
    with contextlib.suppress(KeyboardInterrupt):
        running.run()
    return 0 if running.started else 3


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


def guarded_protocol(max_connections: int, timeout_header_s: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a request-head deadline, a head size bound and a connection limit."""
    guards = Guards(max_connections, timeout_header_s, max_header_bytes)
    return type("GuardedProtocol", (GuardedProtocol,), {"guards": guards})
