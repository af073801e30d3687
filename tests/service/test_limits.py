"""What one client, or many, may hold: bytes in flight, connections, and time (idle, a slow head, a stalled body).

Real uvicorn servers on loopback ports with the settings `akd serve` uses (teacher_service.server), small
limits, and raw sockets for the clients an HTTP library will not imitate. No outcome depends on the
machine's speed: each wait polls for the state it needs, bounded by HANG_S, and the timeouts under test
can only fire late, never early.
"""

from __future__ import annotations

import json
import re
import select
import time

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    closed_by_peer,
    live_server,
    mnist_teacher,
    random_inputs,
    raw_connect,
    raw_head,
    raw_response,
    save_member,
    write_config,
)

from shared.codec import decode, encode_inputs

SOFT_TARGETS = "/soft-targets"


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    return save_member(tmp_path_factory.mktemp("limits") / "a.pt", seed=1)


def _config(tmp_path, member, **server):
    return write_config(
        tmp_path / "teachers.toml", {"mnist": mnist_teacher([(member, 1.0)])}, server={"device": "cpu", **server}
    )


def _good(base: str, rows: int = 2, deadlines: bool = False) -> None:
    """A fresh client on a fresh connection gets correct soft targets.

    `deadlines`: the server's timeouts are a second, and a test process descheduled that long between
    connecting and sending would be cut off too, rightly; such an attempt is retried, never counted as served.
    """
    give_up = time.monotonic() + HANG_S
    while True:
        try:
            r = httpx.post(
                f"{base}{SOFT_TARGETS}",
                content=encode_inputs(random_inputs(rows, seed=rows)),
                params={"cache": "bypass"},
                timeout=HANG_S,
            )
        except httpx.TransportError:
            if not deadlines or time.monotonic() > give_up:
                raise
            continue
        if not (deadlines and r.status_code == 408 and time.monotonic() < give_up):
            break
    assert r.status_code == 200, r.text
    assert decode(r.content)["probs"].shape == (rows, 10)


def _gauge(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    return float(re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE).group(1))


def _until(condition, what: str):
    deadline = time.monotonic() + HANG_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)
    return value


def _error(status: int, headers: dict, body: bytes) -> dict:
    assert headers["content-type"].startswith("application/json"), (status, headers, body)
    return json.loads(body)["error"]


# --------------------------------------------------------------------------- bytes held by all requests together


def test_bytes_in_flight_are_bounded_across_requests(tmp_path, member):
    """One upload held open holds its bytes; a second that would pass the bound gets 503 + Retry-After, then fits."""
    # deadlines longer than the test: the upload held open must stay open however slow the machine
    config = _config(
        tmp_path,
        member,
        limits={"body_bytes": 100_000, "inflight_bytes": 150_000},
        timeouts={"header_s": HANG_S, "body_s": HANG_S},
    )
    # 78,400 bytes of rows
    body_a = encode_inputs(random_inputs(100, dtype=torch.uint8, seed=1))
    # 74,480: each fits alone, not both
    body_b = encode_inputs(random_inputs(95, dtype=torch.uint8, seed=2))
    assert max(len(body_a), len(body_b)) <= 100_000 and len(body_a) - 1 + len(body_b) > 150_000
    with live_server(config) as (base, _):
        with raw_connect(base) as a:
            # all but its last byte
            a.sendall(raw_head("POST", SOFT_TARGETS, {"Content-Length": len(body_a)}) + body_a[:-1])
            _until(lambda: _gauge(base, "akd_inflight_bytes") == len(body_a) - 1, "the held upload is counted")

            # refused from Content-Length
            declared = httpx.post(f"{base}{SOFT_TARGETS}", content=body_b, timeout=HANG_S)
            assert declared.status_code == 503 and declared.headers["retry-after"] == "1", declared.text
            err = declared.json()["error"]
            assert (
                err["code"] == "inflight_full" and err["expected"] == "at most 150000 bytes held by requests in flight"
            )
            assert err["received"] == f"{len(body_a) - 1} bytes in flight and {len(body_b)} more"

            chunks = [body_b[i : i + 10_000] for i in range(0, len(body_b), 10_000)]
            # refused as its bytes arrive
            streamed = httpx.post(f"{base}{SOFT_TARGETS}", content=iter(chunks), timeout=HANG_S)
            assert "content-length" not in streamed.request.headers
            assert streamed.status_code == 503 and streamed.json()["error"]["code"] == "inflight_full", streamed.text
            # the refused request's bytes were given back
            assert _gauge(base, "akd_inflight_bytes") == len(body_a) - 1

            a.sendall(body_a[-1:])
            status, _, payload = raw_response(a)
            assert status == 200 and decode(payload)["probs"].shape == (100, 10)
        _until(lambda: _gauge(base, "akd_inflight_bytes") == 0, "the finished upload is released")
        r = httpx.post(f"{base}{SOFT_TARGETS}", content=body_b, timeout=HANG_S)
        assert r.status_code == 200, r.text
        assert _gauge(base, "akd_inflight_bytes") == 0


def test_inflight_bound_below_the_body_limit_is_a_config_error(tmp_path, member):
    from teacher_service.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=r"server.limits: inflight_bytes \(100000\) must be at least body_bytes \(200000\)"
    ):
        load_config(_config(tmp_path, member, limits={"body_bytes": 200_000, "inflight_bytes": 100_000}), environ={})


# --------------------------------------------------------------------------- time: idle, slow heads, stalled bodies


def _trickle_head_until_closed(base: str) -> tuple[float, bytes]:
    """Send a request head a byte at a time, never finishing it, until the server hangs up; (seconds, what it sent)."""
    # before connecting: the server's clock starts later, so it cannot fire before `started + timeout`
    started = time.monotonic()
    sock = raw_connect(base)
    head = b"POST /soft-targets HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    sent = 0
    with sock:
        while time.monotonic() - started < HANG_S:
            if select.select([sock], [], [], 0.05)[0]:
                # something to read: the answer, or the close
                break
            try:
                sock.send(head[sent : sent + 1] if sent < len(head) else b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        else:
            raise AssertionError("the server never hung up on a trickling head")
        return time.monotonic() - started, closed_by_peer(sock)


def test_idle_and_trickling_heads_are_cut_off_while_good_clients_are_served(tmp_path, member):
    """A request head must be complete a second after connecting, however its bytes trickle; good clients meanwhile are
    served."""
    with live_server(_config(tmp_path, member, timeouts={"header_s": 1.0})) as (base, _):
        started = time.monotonic()
        # connect, send nothing
        idle = [raw_connect(base) for _ in range(5)]
        # served while those hold their connections
        _good(base, deadlines=True)
        for sock in idle:
            # closed, and nothing said: nothing was asked
            assert closed_by_peer(sock) == b""
            sock.close()
        assert time.monotonic() - started >= 1.0

        seconds, answer = _trickle_head_until_closed(base)
        # the server's timer may fire a hair early (once: 0.99998 s in a busy run)
        assert seconds >= 1.0 - 1e-3
        # written just before the close; a reset can swallow it, the close cannot be
        if answer:
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "header_timeout"
        _good(base, deadlines=True)


def test_stalled_bodies_and_idle_keep_alive_connections_are_cut_off(tmp_path, member):
    """The body must be in a second after its head (408, close); after an answer, a silent connection closes a second
    later."""
    # a head deadline longer than the test: whatever the machine's load, only the deadlines under test can fire
    config = _config(tmp_path, member, timeouts={"header_s": HANG_S, "body_s": 1.0, "keep_alive_s": 1.0})
    with live_server(config) as (base, _):
        body = encode_inputs(random_inputs(2))
        with raw_connect(base) as stalled:
            stalled.sendall(
                raw_head("POST", f"{SOFT_TARGETS}?teacher=mnist", {"Content-Length": len(body)}) + body[:100]
            )
            # served while it stalls
            _good(base, deadlines=True)
            # the body deadline, then the connection closes
            status, headers, payload = raw_response(stalled)
            assert status == 408 and headers["connection"] == "close"
            err = _error(status, headers, payload)
            assert (
                err["code"] == "body_timeout"
                and "1 s" in err["expected"]
                and err["received"].endswith(f"of {len(body)} bytes")
            ), err
            assert closed_by_peer(stalled) == b""

        with raw_connect(base) as keep_alive:
            keep_alive.sendall(raw_head("GET", "/healthz"))
            assert raw_response(keep_alive)[0] == 200
            assert closed_by_peer(keep_alive) == b""
        _good(base, deadlines=True)
        text = httpx.get(f"{base}/metrics", timeout=HANG_S).text
        assert 'akd_requests_total{status="408",teacher="mnist"} 1.0' in text


def test_a_head_over_the_size_bound_is_431(tmp_path, member):
    with (
        live_server(_config(tmp_path, member, limits={"header_bytes": 4096}, timeouts={"header_s": HANG_S})) as (
            base,
            _,
        ),
        raw_connect(base) as sock,
    ):
        sock.sendall(raw_head("GET", "/healthz", {"X-Big": "a" * 5000}))
        status, headers, payload = raw_response(sock)
        assert status == 431 and _error(status, headers, payload)["code"] == "header_too_large"
        assert closed_by_peer(sock) == b""
        _good(base)


# --------------------------------------------------------------------------- connections


def test_connections_past_the_limit_get_503_and_the_server_recovers(tmp_path, member):
    # a head deadline longer than the test, so the held connections stay open however slow the machine
    config = _config(tmp_path, member, limits={"connections": 3}, timeouts={"header_s": HANG_S})
    with live_server(config) as (base, _):
        held = [raw_connect(base) for _ in range(3)]
        # accepted after the three, so past the limit
        with raw_connect(base) as extra:
            extra.sendall(raw_head("GET", "/healthz"))
            status, headers, payload = raw_response(extra)
            assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
            err = _error(status, headers, payload)
            assert err["code"] == "too_many_connections" and err["expected"] == "at most 3 open connections"
            assert closed_by_peer(extra) == b""
        for sock in held:
            sock.close()
        # once the server has seen them go, a new connection is served
        _until(
            lambda: httpx.get(f"{base}/healthz", timeout=HANG_S).status_code == 200,
            "served again after the held connections closed",
        )
        _good(base)


def test_idle_sockets_past_the_descriptor_limit_cannot_lock_good_clients_out(tmp_path, member):
    """The probe that found this: with 128 descriptors, 160 idle sockets made good requests fail, for good.

    A real `akd serve` process under RLIMIT_NOFILE 128. Sockets it cannot accept wait in the kernel's
    backlog; the head deadline frees the accepted ones, so every idle socket is eventually closed and a
    good client is served again (before the deadline existed they were held forever).
    """
    from conftest import ServerProcess

    server = ServerProcess(
        _config(tmp_path, member, timeouts={"header_s": 1.0}, limits={"connections": 64}),
        tmp_path / "server.log",
        max_files=128,
    )
    try:
        idle = [raw_connect(server.base) for _ in range(160)]
        for sock in idle:
            # closed, nothing said: nothing was asked
            assert closed_by_peer(sock) == b""
            sock.close()
        _good(server.base, deadlines=True)
        assert server.proc.poll() is None
    finally:
        server.stop()
