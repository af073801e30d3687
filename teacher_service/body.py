"""A request body read as the limits allow: refused as early as its bytes say it will be, never held whole when it
is too large, and decoded into rows for the batcher (off the event loop when large).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from shared import codec
from shared.hashing import row_keys
from shared.protocol import CacheMode
from teacher_service.config import ServerConfig
from teacher_service.errors import ClientGone, ServiceError
from teacher_service.inference import Rows
from teacher_service.service import Held

# Bodies and answers up to these many bytes are decoded and encoded on the event loop, where they cost less than the
# hop to a worker thread; larger ones go to the coding threads, so the loop stays free for other requests. A body is
# viewed, not copied (codec.decode): what is left of decoding it is the checks' passes over its values, cheap up to
# a larger size than an answer's softmax and encoding (the costs: docs/design/teacher-service.md).
INLINE_BODY_BYTES = 1 << 20
INLINE_ANSWER_BYTES = 128 << 10


async def off_loop_if_large(executor: Executor, size: int, inline_bytes: int, fn, *args):
    """`fn(*args)` on the event loop when `size` bytes are at most `inline_bytes`, else on `executor` (the service's
    coding threads)."""
    return fn(*args) if size <= inline_bytes else await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


async def read_body(
    request: Request,
    server: ServerConfig,
    held: Held,
    check_header: Callable[[bytes], bool],
    data_start: int | None = None,
) -> np.ndarray:
    """The body, refused as soon as the bytes so far allow, so a body that will be refused is never held whole.

    Past `limits.body_bytes`: 413 (before reading, when Content-Length says so). Past what all requests may hold
    together: 503. When the safetensors header, the first bytes, already declares a tensor that will be refused
    (`check_header`): its 413/422 before the rest arrives. When the whole body has not arrived `timeouts.body_s` after
    the head: 408, and the connection closes (a stalled or trickling client holds nothing longer). A client that
    hangs up: ClientGone. The body is laid out as `codec.assemble` lays it out, `data_start` as it says.
    """
    limit = server.limits.body_bytes

    def too_large(size: str) -> ServiceError:
        return ServiceError(
            413, "body_too_large", "the request body is over the configured limit", f"at most {limit} bytes", size
        )

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise too_large(f"{declared} bytes")
        held.budget.check(int(declared))

    async def read() -> np.ndarray:
        chunks, size, prefix = [], 0, b""
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(f"more than {limit} bytes")
                held.add(len(chunk))
                chunks.append(chunk)
                # the body's first bytes, for `check_header` until it has judged the header (then None); most often
                # the first chunk, read where it is
                if prefix is not None:
                    prefix = prefix + chunk if prefix else chunk
                    prefix = prefix if check_header(prefix) else None
        except ClientDisconnect:
            raise ClientGone(size, declared) from None
        # one copy, laid out so that the codec views the tensors in it rather than copy them again
        return codec.assemble(chunks, data_start)

    try:
        # one deadline for the whole body, kept in this task (no new task is made for it)
        async with asyncio.timeout(server.timeouts.body_s):
            return await read()
    except TimeoutError:
        raise ServiceError(
            408,
            "body_timeout",
            "the request body did not arrive in time",
            f"the whole body within {server.timeouts.body_s:g} s of the request head",
            f"{held.bytes} of {declared or 'an undeclared number of'} bytes",
            headers={"Connection": "close"},
        ) from None


# a header declaring a few tensors takes a few hundred bytes; this bounds the copy kept while it arrives
HEADER_PEEK_BYTES = 1 << 20


def header_check(input_shape: tuple[int, int, int], max_rows: int) -> Callable[[bytes], bool]:
    """A check of the body's first bytes: refuses the `inputs` tensor its header declares, before it is read or decoded.

    Returns True while the header is incomplete. A header that does not parse, or is not complete within
    HEADER_PEEK_BYTES, is left for `codec.decode`, whose error names the body's size, known once it is all in.
    """
    return _declared_check(lambda tensors: codec.check_inputs_declared(tensors, input_shape), max_rows)


def keys_header_check(max_rows: int) -> Callable[[bytes], bool]:
    """The same for a keys-first body: its `keys` tensor refused by its header."""
    return _declared_check(codec.check_keys_declared, max_rows)


def _declared_check(check_declared: Callable[[dict], tuple[int, ...]], max_rows: int) -> Callable[[bytes], bool]:
    def check(prefix: bytes) -> bool:
        try:
            tensors = codec.read_header(prefix)
        except codec.UnreadableHeader:
            return False
        if tensors is None:
            return len(prefix) <= HEADER_PEEK_BYTES
        try:
            shape = check_declared(tensors)
        except codec.CodecError as exc:
            raise ServiceError(422, exc.code, exc.message, exc.expected, exc.received) from None
        check_rows(shape[0], max_rows)
        return False

    return check


def check_rows(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise ServiceError(
            413,
            "too_many_rows",
            "the request has more rows than the queue holds",
            f"at most {max_rows} rows",
            f"{rows} rows",
        )


def prepare_rows(body: np.ndarray, input_shape: tuple[int, int, int], cache: CacheMode, keyed: bool) -> Rows:
    """The rows, and their keys when `keyed`. Hashing costs time in proportion to the body's bytes, on the request's
    path, so rows no cache reads or stores (cache=bypass, a service without a cache) are not hashed."""
    with _refused():
        x = codec.validate_inputs(codec.decode(body), input_shape)
    # the inputs stay as sent: the inference thread scales them to [0, 1]
    return Rows(x, row_keys(x) if keyed else None, cache)


def prepare_keys(body: np.ndarray) -> np.ndarray:
    with _refused():
        return codec.validate_keys(codec.decode(body))


@contextlib.contextmanager
def _refused():
    """A body the codec refuses: 400 when it is not a readable safetensors file, 422 when its tensors are wrong."""
    try:
        yield
    except codec.CodecError as exc:
        status = 400 if exc.code == "bad_body" else 422
        raise ServiceError(status, exc.code, exc.message, exc.expected, exc.received) from None
