"""The floors a request's round trip is measured against, each a server process of its own on a loopback port.

- The framework's floor: a minimal Starlette app on the same uvicorn, with the service's own uvicorn settings, that
  reads the whole body and answers as many bytes as it is asked for (`?answer_bytes=N`). Whatever the service takes
  beyond it is the service's own work.
- The machine's floor: a raw TCP socket that reads a length-prefixed body and answers the asked-for bytes, with no
  HTTP at all: what moving the bytes through the kernel costs.

`python -m bench.floors starlette|socket --port N` runs one, with the service's malloc settings
(shared.allocator).
"""

from __future__ import annotations

import argparse
import socket
import struct

from shared.allocator import keep_freed_memory

# The raw socket's frame head: body bytes, answer bytes
FRAME = struct.Struct("<QQ")
STARLETTE_PATH = "/floor"


def starlette_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def floor(request: Request) -> Response:
        await request.body()
        return Response(b"\0" * int(request.query_params["answer_bytes"]), media_type="application/octet-stream")

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route(STARLETTE_PATH, floor, methods=["POST"]), Route("/healthz", health)])


def serve_starlette(port: int) -> None:
    import uvicorn

    from teacher_service.config import ServerConfig
    from teacher_service.server import uvicorn_options

    options = {**uvicorn_options(ServerConfig()), "log_level": "warning"}
    uvicorn.run(starlette_app(), host="127.0.0.1", port=port, **options)


def serve_socket(port: int) -> None:
    """One connection at a time, each a sequence of frames: FRAME, then the body; answered with zero bytes."""
    listener = socket.create_server(("127.0.0.1", port))
    while True:
        connection, _ = listener.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with connection:
            _answer_frames(connection)


def _answer_frames(connection: socket.socket) -> None:
    buffer = bytearray(1 << 20)
    while True:
        head = _receive(connection, bytearray(FRAME.size))
        if head is None:
            return
        body_bytes, answer_bytes = FRAME.unpack(head)
        if len(buffer) < body_bytes:
            buffer = bytearray(body_bytes)
        if _receive(connection, memoryview(buffer)[:body_bytes]) is None:
            return
        connection.sendall(b"\0" * answer_bytes)


def _receive(connection: socket.socket, into) -> bytes | None:
    """`into` filled from the connection; None when it closes first."""
    view, got = memoryview(into), 0
    while got < len(view):
        n = connection.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return into


class SocketClient:
    """The raw socket floor's client: one connection, one frame a call."""

    def __init__(self, port: int):
        self.connection = socket.create_connection(("127.0.0.1", port))
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.answer = bytearray(1 << 16)

    def round_trip(self, body: bytes, answer_bytes: int) -> None:
        self.connection.sendall(FRAME.pack(len(body), answer_bytes))
        self.connection.sendall(body)
        if len(self.answer) < answer_bytes:
            self.answer = bytearray(answer_bytes)
        if _receive(self.connection, memoryview(self.answer)[:answer_bytes]) is None:
            raise ConnectionError("the socket floor closed the connection")

    def close(self) -> None:
        self.connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floors")
    parser.add_argument("kind", choices=["starlette", "socket"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # the service's own malloc settings, so the floor is not slower by page faults it would not take
    keep_freed_memory()
    (serve_starlette if args.kind == "starlette" else serve_socket)(args.port)


if __name__ == "__main__":
    main()
