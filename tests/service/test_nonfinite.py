"""A member whose logits overflow is never answered as a success, and never cached; other requests go on.

The overflowing member is a real torch.export file: a linear layer whose weights on the first two pixels are 2e38,
so that a row with both pixels at 255 sums past float32's largest number (+inf), and any other row is finite. The
service runs for real (uvicorn on a loopback port); to put a failing request and a good one in the same batch, the
test holds the service's one device while both queue up (a wait on the queue's length, not on time), then lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    MNIST_SHAPE,
    REPO,
    gauge,
    live_server,
    metric,
    mnist_teacher,
    random_inputs,
    reference_member_logits,
    reference_probs,
    save_member,
    write_config,
)
from torch import nn

from shared import codec
from shared.hashing import row_keys

# two of these overflow float32 (largest 3.4e38); one does not
HUGE = 2e38
FLOAT32_MAX = torch.finfo(torch.float32).max


class Clamped(nn.Module):
    """A linear layer's logits clamped into float32's range: finite always, but they may span more than it holds."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), linear)

    def forward(self, x):
        return self.net(x).clamp(-FLOAT32_MAX, FLOAT32_MAX)


def overflowing_member(path: Path, clamp: bool = False, every_pixel: bool = False) -> Path:
    """Class 0 gets HUGE * (pixel 0 + pixel 1): +inf where both are 255 (a "hot" row). With `clamp`, class 0 is
    float32's largest number there and class 1 its most negative: finite logits whose span overflows. With
    `every_pixel`, class 0 gets HUGE * the sum of all pixels: +inf on every image whose pixels sum past 1.7."""
    torch.manual_seed(5)
    linear = nn.Linear(28 * 28, 10)
    with torch.no_grad():
        linear.weight[0, : None if every_pixel else 2] = HUGE
        if clamp:
            linear.weight[1, :2] = -HUGE
    model = Clamped(linear) if clamp else nn.Sequential(nn.Flatten(), linear)
    program = torch.export.export(
        model.eval(), (torch.rand(4, *MNIST_SHAPE),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, path)
    return path


def rows(n: int, hot: list[int], seed: int) -> torch.Tensor:
    """n uint8 rows; the `hot` ones overflow the member, the others have pixels 0 and 1 at 0 (finite logits)."""
    x = random_inputs(n, dtype=torch.uint8, seed=seed)
    x.view(n, -1)[:, :2] = 0
    x.view(n, -1)[hot, :2] = 255
    return x


class NotingLoop:
    """The app as uvicorn would serve it, noting the server's event loop (the device pool lives on it).

    Pass the class as live_server's `asgi`; the instance made is what the test reads the loop from."""

    made: NotingLoop | None = None

    def __init__(self, app):
        self.app, self.loop = app, None
        NotingLoop.made = self

    async def __call__(self, scope, receive, send):
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


@contextlib.contextmanager
def device_held(service, loop):
    """Hold the service's one device: rows sent meanwhile queue up, and form one batch when it is given back."""
    worker = asyncio.run_coroutine_threadsafe(service.devices.acquire(), loop).result(HANG_S)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(service.devices.release, worker)


def wait_for_queued_rows(base: str, teacher: str, n: int) -> None:
    # a ceiling against hangs only
    deadline = time.monotonic() + HANG_S
    while gauge(httpx.get(f"{base}/metrics", timeout=HANG_S).text, f'akd_queue_rows{{teacher="{teacher}"}}') < n:
        assert time.monotonic() < deadline, f"{n} rows never queued"
        time.sleep(0.01)


def send(base: str, teacher: str, x: torch.Tensor, **params) -> httpx.Response:
    params = {"teacher": teacher, **params}
    return httpx.post(f"{base}/soft-targets", content=codec.encode_inputs(x), params=params, timeout=HANG_S)


def in_cache(service, version: str, keys: list[bytes]):
    """What a member's namespace holds for these keys (found, logits), read on the cache's own thread."""
    ns = next(ns for ns in service.cache.namespaces if ns.version == version)
    return service.cache_executor.submit(ns.get, keys).result(HANG_S)


@pytest.fixture
def members(tmp_path) -> dict[str, Path]:
    return {
        "good": save_member(tmp_path / "good.pt", seed=1),
        "over": overflowing_member(tmp_path / "over.pt2"),
        "span": overflowing_member(tmp_path / "span.pt2", clamp=True),
    }


def assert_refused(response: httpx.Response, member: int, path: Path, bad: int, of: int, received: str) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "non_finite_output"
    assert f"member {member} ({path}, version " in error["message"]
    assert f"of its {of} rows in one batch" in error["message"]
    assert f"overflowed on {bad} row" in error["message"]
    assert error["expected"] == "finite logits"
    assert error["received"].startswith(f"member {member} ({path}") and error["received"].endswith(received)


def test_an_overflowing_member_fails_only_the_request_owning_its_rows(tmp_path, members, caplog):
    """In an ensemble: the request with an overflowing row gets a 500 naming the member, the request batched with it
    gets its right answer, the overflow is logged and counted, and no non-finite row is cached or served later."""
    paths = [members["good"], members["over"]]
    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(paths[0], 1.0), (paths[1], 2.0)])},
        {"cache": {"dir": str(tmp_path / "cache")}, "batching": {"max_rows": 64}},
    )
    bad_x, good_x = rows(2, hot=[1], seed=1), rows(3, hot=[], seed=2)
    with (
        caplog.at_level(logging.ERROR, logger="akd.service"),
        live_server(config, asgi=NotingLoop) as (base, app),
        ThreadPoolExecutor(2) as pool,
    ):
        service = app.state.service
        with device_held(service, NotingLoop.made.loop):
            bad = pool.submit(send, base, "m", bad_x)
            good = pool.submit(send, base, "m", good_x, outputs="probs,member_logits")
            wait_for_queued_rows(base, "m", 5)
        bad, good = bad.result(HANG_S), good.result(HANG_S)
        # not answered from the cache either
        again = send(base, "m", bad_x)
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
        version = service.teachers["m"].members[1].version
        stored = in_cache(service, version, row_keys(bad_x) + row_keys(good_x))

    # the two requests shared one batch
    assert metric(metrics, 'akd_batch_rows_max{teacher="m"}') == 5
    assert_refused(bad, member=1, path=paths[1], bad=1, of=2, received="+inf")
    assert_refused(again, member=1, path=paths[1], bad=1, of=2, received="+inf")
    assert good.status_code == 200, good.text
    answer = codec.decode(good.content)
    expected = reference_member_logits(paths, good_x)
    torch.testing.assert_close(answer["member_logits"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(answer["probs"], reference_probs(expected, [1.0, 2.0], 1.0, "probs"))
    # once a request
    assert metric(metrics, f'akd_nonfinite_rows_total{{member="{version}",teacher="m"}}') == 2
    assert metric(metrics, 'akd_requests_total{status="500",teacher="m"}') == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "akd.service" and "overflowed" in r.getMessage()]
    assert len(lines) == 2 and all(f"member 1 ({paths[1]}, version {version})" in line for line in lines), lines
    found, logits = stored
    # the overflowing row only is not stored
    assert found.tolist() == [True, False, True, True, True]
    assert torch.isfinite(torch.from_numpy(logits)).all()


def test_an_overflowing_member_alone_fails_its_rows_whichever_slice_they_are_in(tmp_path, members):
    """A teacher of the one member: a request whose rows all overflow, and one split into slices (batching.max_rows 4)
    whose second slice holds the overflowing row, both get the 500; rows that do not overflow are answered."""
    config = write_config(
        tmp_path / "t.toml",
        {"solo": mnist_teacher([(members["over"], 1.0)])},
        {"cache": {"dir": str(tmp_path / "cache")}, "batching": {"max_rows": 4}},
    )
    with live_server(config) as (base, app):
        service = app.state.service
        every_row = send(base, "solo", rows(2, hot=[0, 1], seed=3))
        sliced = send(base, "solo", rows(6, hot=[5], seed=4))
        good_x = rows(6, hot=[], seed=5)
        good = send(base, "solo", good_x, outputs="member_logits")
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    assert_refused(every_row, member=0, path=members["over"], bad=2, of=2, received="+inf")
    # the slice of rows 4, 5
    assert_refused(sliced, member=0, path=members["over"], bad=1, of=2, received="+inf")
    assert good.status_code == 200, good.text
    torch.testing.assert_close(
        codec.decode(good.content)["member_logits"],
        reference_member_logits([members["over"]], good_x),
        rtol=1e-5,
        atol=1e-5,
    )
    # only the good request's rows were answered
    assert metric(metrics, 'akd_rows_total{teacher="solo"}') == 6
    version = service.teachers["solo"].members[0].version
    assert metric(metrics, f'akd_nonfinite_rows_total{{member="{version}",teacher="solo"}}') == 3


def test_finite_logits_whose_probabilities_are_not_are_refused_too(tmp_path, members):
    """Logits at float32's two ends are finite, but at a temperature past float32 (which a request may name) their
    softmax is NaN: the row is refused whatever the temperature, rather than answered with NaN probabilities."""
    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(members["good"], 1.0), (members["span"], 1.0)])},
        {"cache": {"dir": str(tmp_path / "cache")}},
    )
    x = rows(3, hot=[2], seed=6)
    with live_server(config) as (base, _):
        hot_tau = send(base, "m", x, temperature=1e39)
        plain = send(base, "m", x)
    for response in (hot_tau, plain):
        assert_refused(
            response,
            member=1,
            path=members["span"],
            bad=1,
            of=3,
            received="finite logits spanning more than float32 holds",
        )


def test_a_trainer_whose_teacher_overflows_ends_at_once_naming_the_member(tmp_path):
    """`akd train` against a real service whose member overflows on every MNIST image: the 500 non_finite_output
    would fail again on any replica at any time, so the trainer does not retry it (as it does a 500 that may pass):
    it ends at once, exit 2, with one line naming the member, and saves nothing. A client that retried would end
    after give_up_after_s (2 s) as "unavailable" instead."""
    member = overflowing_member(tmp_path / "over.pt2", every_pixel=True)
    config = write_config(tmp_path / "t.toml", {"over": mnist_teacher([(member, 1.0)])})
    out = tmp_path / "run"
    sets = ["limit_train=32", "val_size=16", "batch_size=16", "attack.steps=1", "epochs=1", "method=akd"]
    with live_server(config) as (base, _):
        sets += [f"out_dir={out}", f"teacher.url={base}", "teacher.give_up_after_s=2"]
        done = subprocess.run(
            [sys.executable, "-m", "akd", "train", *[f"--set={s}" for s in sets]],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=HANG_S,
        )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("akd train: the teacher service")]
    assert f"at {base} answered rows it cannot answer: teacher 'over' cannot answer this request" in line, line
    assert f"member 0 ({member}, version " in line and "overflowed on 16 rows" in line, line
    assert "retrying" not in done.stderr and not (out / "last.pt").exists()
