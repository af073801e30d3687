"""Liveness and readiness: /healthz answers while the process runs; /readyz is 200 only while the service takes
queries (every teacher's members loaded on every device, the cache verified, not shutting down), else 503 in the
service's error shape saying what is not ready. A stop signal makes it not ready at once, and with
`[server.timeouts] drain_s` the service keeps serving meanwhile, so a balancer polling readiness takes it out first.

The teachers load and the cache verifies before the server listens (app.py), so a client never sees the start-up
states; they are checked on a service whose app has not started. Real uvicorn servers, real httpx, a real zarr cache."""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from conftest import HANG_S, ServerProcess, live_server, mnist_teacher, random_inputs, write_config

from shared import codec
from shared.protocol import ErrorBody
from teacher_service.app import create_app
from teacher_service.config import load_config


@pytest.fixture
def config(tmp_path, mnist_members):
    return write_config(
        tmp_path / "teachers.toml",
        {
            "ens": mnist_teacher([(mnist_members["a"], 1.0), (mnist_members["c"], 1.0)]),
            "solo": mnist_teacher([(mnist_members["b"], 1.0)]),
        },
        server={"device": "cpu", "token": "s3cret", "cache": {"dir": str(tmp_path / "cache")}},
    )


def not_ready(response: httpx.Response) -> str:
    """The reasons a 503 from /readyz gives, after checking it is the service's error shape."""
    assert response.status_code == 503, response.text
    error = ErrorBody.model_validate(response.json()).error
    assert error.code == "not_ready" and error.received in error.message
    return error.received


def test_a_serving_service_is_ready_and_both_probes_need_no_token(config):
    with live_server(config) as (base, app):
        ready = httpx.get(f"{base}/readyz", timeout=HANG_S)
        health = httpx.get(f"{base}/healthz", timeout=HANG_S)
        refused = httpx.get(f"{base}/teachers", timeout=HANG_S)
        assert app.state.service.not_ready() == []
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "teachers": ["ens", "solo"]}
    assert health.status_code == 200 and refused.status_code == 401
    # the app's shutdown ran
    assert app.state.service.not_ready() == ["the service is shutting down"]


def test_a_stopping_service_is_not_ready_and_still_alive(config):
    with live_server(config) as (base, app):
        app.state.service.stop()
        ready = httpx.get(f"{base}/readyz", timeout=HANG_S)
        health = httpx.get(f"{base}/healthz", timeout=HANG_S)
    assert not_ready(ready) == "the service is shutting down"
    assert health.status_code == 200


def test_a_service_not_started_or_missing_a_teacher_says_which(config):
    """The states no client of `akd serve` can reach (it listens only after them), from the service's own state."""
    service = create_app(load_config(config, environ={})).state.service
    try:
        assert service.not_ready() == ["the batchers have not started"]
        (worker,) = service.devices.workers
        del worker.runners["solo"]
        worker.runners["ens"].caches[1] = None
        assert service.not_ready() == [
            "the batchers have not started",
            "teacher ens: its cache namespaces are not verified on device 0:cpu",
            "teacher solo: its 1 members are not loaded on device 0:cpu",
        ]
    finally:
        service.cache.close()
        service.shutdown()


def test_a_stop_signal_drains_not_ready_but_serving_and_a_second_one_stops_it(tmp_path, mnist_members):
    """drain_s is far longer than the test: the second SIGTERM ends the drain, gracefully."""
    config = write_config(
        tmp_path / "teachers.toml",
        {"solo": mnist_teacher([(mnist_members["a"], 1.0)])},
        server={"device": "cpu", "timeouts": {"drain_s": HANG_S}},
    )
    server = ServerProcess(config, tmp_path / "server.log")
    try:
        assert httpx.get(f"{server.base}/readyz", timeout=HANG_S).status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + HANG_S
        while (ready := httpx.get(f"{server.base}/readyz", timeout=HANG_S)).status_code == 200:
            assert time.monotonic() < deadline, "never stopped being ready"
            time.sleep(0.05)
        assert not_ready(ready) == "the service is shutting down"
        assert httpx.get(f"{server.base}/healthz", timeout=HANG_S).status_code == 200
        answer = httpx.post(
            f"{server.base}/soft-targets", content=codec.encode_inputs(random_inputs(2)), timeout=HANG_S
        )
        assert answer.status_code == 200 and codec.decode(answer.content)["probs"].shape == (2, 10)
        assert server.stop(), (server.proc.returncode, (tmp_path / "server.log").read_text()[-3000:])
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=HANG_S)
    log = (tmp_path / "server.log").read_text()
    assert "draining for" in log and "Traceback" not in log
