"""The trainer trusts nothing its teacher answers: `akd train` against a fake teacher service.

The fake is a small real ASGI app under a real uvicorn on a loopback port. It answers /healthz, /teachers and
/soft-targets as the service does (the service's JSON models, its headers, its safetensors bodies through
shared.codec), until a test has it answer otherwise from some request on: rows that are not probabilities, bodies
that are not soft targets, another teacher, a 500, a 429, an answer trickling a byte at a time. The real service
never sends these, which is why a fake does. Every run is a real `akd train` subprocess (or, for runs compared in
pairs, its own function in this process), kept tiny (32 images, two steps of 16 an epoch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
import torch
import uvicorn
from conftest import HANG_S, REPO, mnist_teacher, save_member, write_config

from pipeline.health import wait_healthy
from shared import codec, protocol
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.protocol import Aggregate, ErrorBody, ErrorDetail, MemberInfo, TeacherInfo, TeachersResponse
from student_trainer.answer_checks import BadAnswer, checked_probs, row_sum_tolerance
from student_trainer.teacher_client import RemoteTeacher, TeacherAnswerError
from teacher_service.ensemble import aggregate_probs, normalised_weights

BATCH = 16
TINY = ["limit_train=32", "val_size=16", f"batch_size={BATCH}", "attack.steps=1", "epochs=1", "method=akd"]


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # send the body a byte at a time, this long apart
    trickle_s: float | None = None


class FakeTeacher:
    """One teacher, "fake" (10 classes, MNIST's input shape, one member), served as the real service serves it.

    `play(answer, start)`: from the `start`-th POST /soft-targets on (the first is 1), `answer(rows, fake)` answers,
    `times` times (all of them when None), then the right answers again."""

    def __init__(self) -> None:
        self.play(None)

    def play(self, answer: Callable[[int, FakeTeacher], Answer] | None, start: int = 1, times: int | None = None):
        self.name, self.versions = "fake", ["3f2a9c1e7b5d4a60"]
        # [protocol.KEYS_FIRST]: keys first offered, answered by `keys`
        self.features: list[str] = []
        self.keys: Callable[[int, FakeTeacher], Answer] | None = None
        self.answer, self.start, self.times, self.requests = answer, start, times, 0
        # a trickle from an earlier test stops
        self.round = getattr(self, "round", 0) + 1

    def teachers(self) -> bytes:
        member = MemberInfo(source="checkpoint", path="teacher.pt", weight=1.0, version=self.versions[0])
        teacher = TeacherInfo(
            name=self.name,
            num_classes=10,
            input_shape=(1, 28, 28),
            aggregate=Aggregate.probs,
            temperature=1.0,
            members=[member] + [member.model_copy(update={"version": v}) for v in self.versions[1:]],
        )
        return TeachersResponse(teachers=[teacher], features=self.features).model_dump_json().encode()

    def soft_targets(self, body: bytes) -> Answer:
        rows = len(codec.decode(body)[protocol.INPUTS_KEY])
        self.requests += 1
        played = self.requests - self.start
        if self.answer is None or played < 0 or (self.times is not None and played >= self.times):
            return served({"probs": probabilities(rows)}, self)
        return self.answer(rows, self)

    async def __call__(self, scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if scope["path"] == protocol.SOFT_TARGETS_PATH:
            answer = self.soft_targets(body)
        elif scope["path"] == protocol.SOFT_TARGET_KEYS_PATH:
            answer = self.keys(len(codec.decode(body)[protocol.KEYS_KEY]), self)
        elif scope["path"] == protocol.TEACHERS_PATH:
            answer = Answer(headers={"content-type": "application/json"}, body=self.teachers())
        else:
            # /healthz
            answer = Answer(headers={"content-type": "application/json"}, body=b'{"status": "ok"}')
        headers = {**answer.headers, "content-length": str(len(answer.body))}
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": answer.status, "headers": raw})
        if answer.trickle_s is None:
            await send({"type": "http.response.body", "body": answer.body})
            return
        this_round = self.round
        for i in range(len(answer.body)):
            if self.round != this_round:
                return
            await send({"type": "http.response.body", "body": answer.body[i : i + 1], "more_body": True})
            await asyncio.sleep(answer.trickle_s)
        await send({"type": "http.response.body", "body": b""})


def probabilities(rows: int, classes: int = 10) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, classes, generator=torch.Generator().manual_seed(rows)), dim=1)


def served(tensors: dict[str, torch.Tensor] | bytes, fake: FakeTeacher, **headers: str | None) -> Answer:
    """An answer as the service writes one (routes.py: its headers, codec.encode's body); `headers` change them
    (None: left out)."""
    body = tensors if isinstance(tensors, bytes) else codec.encode(tensors)
    usual = {
        "content-type": protocol.MEDIA_TYPE,
        protocol.HEADER_CACHE_HITS: "0",
        protocol.HEADER_TEACHER_VERSIONS: ",".join(fake.versions),
        protocol.HEADER_TEACHER: fake.name,
    }
    merged = {**usual, **headers}
    return Answer(headers={k: v for k, v in merged.items() if v is not None}, body=body)


@contextlib.contextmanager
def serve(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_healthy(base, alive=thread.is_alive, timeout_s=HANG_S)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def fakes():
    """Two fake replicas, each told per test how to answer."""
    apps = [FakeTeacher(), FakeTeacher()]
    with serve(apps[0]) as first, serve(apps[1]) as second:
        yield [(first, apps[0]), (second, apps[1])]
        for app in apps:
            # ends any trickle before the servers stop
            app.play(None)


@pytest.fixture
def fake(fakes):
    for _, app in fakes:
        app.play(None)
    return fakes[0]


def akd_train(tmp_path, *sets: str) -> tuple[int, str]:
    """`akd train` to its end: its exit code and its stderr (a file, not a pipe, so that its log never blocks it)."""
    with open(tmp_path / "train.err", "w+") as err:
        done = subprocess.run(
            [sys.executable, "-m", "akd", "train", *[f"--set={s}" for s in sets]],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=HANG_S,
        )
    return done.returncode, (tmp_path / "train.err").read_text()


def failure_line(stderr: str) -> str:
    """The one line that says why the run ended (the next one says how to go on)."""
    lines = [line for line in stderr.splitlines() if line.startswith("akd train: ")]
    assert len(lines) == 2, stderr
    return lines[0]


def with_row(probs: torch.Tensor, row: int, values: list[float]) -> torch.Tensor:
    probs = probs.clone()
    probs[row] = torch.tensor(values)
    return probs


NOT_PROBABILITIES = "rows that are not probabilities: "
EXPECTED_ROWS = " (expected finite, non-negative rows summing to 1)"
# what the fake answers: what the run must say
BAD_ANSWERS = {
    "NaN probabilities": (
        lambda n, f: served({"probs": torch.full((n, 10), float("nan"))}, f),
        NOT_PROBABILITIES + f"row 0 holds NaN (and {BATCH - 1} more of the {BATCH} rows)" + EXPECTED_ROWS,
    ),
    "one NaN row": (
        lambda n, f: served({"probs": with_row(probabilities(n), 3, [float("nan")] * 10)}, f),
        NOT_PROBABILITIES + "row 3 holds NaN" + EXPECTED_ROWS,
    ),
    "one Inf value": (
        lambda n, f: served({"probs": with_row(probabilities(n), 5, [float("inf")] + [0.0] * 9)}, f),
        NOT_PROBABILITIES + "row 5 holds inf" + EXPECTED_ROWS,
    ),
    "a negative probability": (
        lambda n, f: served({"probs": with_row(probabilities(n), 1, [-0.25, 0.45] + [0.1] * 8)}, f),
        NOT_PROBABILITIES + "row 1 holds -0.25" + EXPECTED_ROWS,
    ),
    "rows summing to 1.5": (
        lambda n, f: served({"probs": probabilities(n) * 1.5}, f),
        NOT_PROBABILITIES + "row 0 sums to 1.5 (off 1 by 0.5, more than float32 rows may be: ",
    ),
    "uint8 probabilities": (
        lambda n, f: served({"probs": (probabilities(n) * 255).to(torch.uint8)}, f),
        "probabilities of dtype uint8 (expected one of float16, bfloat16, float32, float64)",
    ),
    "an empty body": (lambda n, f: served(b"", f), "a body that is not a safetensors file (0 bytes)"),
    "a JSON body": (
        lambda n, f: served(b'{"probs": [[0.1, 0.9]]}', f),
        'a body that is not a safetensors file (23 bytes, starting b\'{"probs"',
    ),
    "a garbage body": (
        lambda n, f: served(bytes(range(256)) * 4, f),
        "a body that is not a safetensors file (1024 bytes, starting b'\\x00\\x01",
    ),
    "no probs": (
        lambda n, f: served({"logits": torch.zeros(n, 10)}, f),
        "no 'probs' tensor (expected the probabilities (B, K) that were asked for)",
    ),
    "one row too many": (
        lambda n, f: served({"probs": probabilities(n + 1)}, f),
        f"probabilities of shape ({BATCH + 1}, 10) (expected ({BATCH}, 10): one row for each of the {BATCH} inputs",
    ),
    "one row too few": (
        lambda n, f: served({"probs": probabilities(n - 1)}, f),
        f"probabilities of shape ({BATCH - 1}, 10) (expected ({BATCH}, 10)",
    ),
    "a 3-D answer": (
        lambda n, f: served({"probs": probabilities(n)[None]}, f),
        f"probabilities of shape (1, {BATCH}, 10) (expected ({BATCH}, 10)",
    ),
    "the wrong class count": (
        lambda n, f: served({"probs": probabilities(n, classes=9)}, f),
        f"probabilities of shape ({BATCH}, 9) (expected ({BATCH}, 10): one row for each of the {BATCH} inputs asked "
        "about, over the teacher's 10 classes)",
    ),
    "a non-integer X-Cache-Hits": (
        lambda n, f: served({"probs": probabilities(n)}, f, **{protocol.HEADER_CACHE_HITS: "lots"}),
        f"X-Cache-Hits: 'lots' (expected a whole number from 0 to {BATCH})",
    ),
    "no X-Teacher header": (
        lambda n, f: served({"probs": probabilities(n)}, f, **{protocol.HEADER_TEACHER: None}),
        "without the X-Teacher and X-Teacher-Versions headers (expected 'fake' with member versions",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_ANSWERS))
def test_a_bad_answer_ends_the_run_with_one_line_naming_it_and_no_checkpoint_after_it(fake, tmp_path, kind):
    """Before: NaN rows trained to exit 0 with NaN weights in best.pt; bodies that were not soft targets crashed with
    a traceback. Now the answer is refused before a loss sees it (the second step's, after one good one)."""
    base, app = fake
    answer, message = BAD_ANSWERS[kind]
    app.play(answer, start=2)
    out = tmp_path / "run"
    code, stderr = akd_train(tmp_path, *TINY, f"out_dir={out}", f"teacher.url={base}")
    assert code == 2 and "Traceback" not in stderr, stderr
    line = failure_line(stderr)
    assert line.startswith(f"akd train: the teacher service at {base} answered "), line
    assert message in line, line
    # one replica: not asked again
    assert app.requests == 2
    assert not any((out / name).exists() for name in ("last.pt", "best.pt", "epoch_001.pt"))
    assert "once the teacher answers right, run the same command again" in stderr


def test_a_poisoned_answer_keeps_the_last_good_checkpoint_and_the_run_resumes_from_it(fake, tmp_path):
    """One NaN row in one answer used to keep a 2-epoch run NaN to the end; now epoch 1's files stay as they were,
    the run says how to continue, and continuing once the teacher answers right finishes it."""
    base, app = fake
    # the first step of epoch 2
    app.play(BAD_ANSWERS["one NaN row"][0], start=3, times=1)
    out = tmp_path / "run"
    code, stderr = akd_train(tmp_path, *TINY, "epochs=2", f"out_dir={out}", f"teacher.url={base}")
    assert code == 2 and "Traceback" not in stderr, stderr
    assert "row 3 holds NaN" in failure_line(stderr)
    assert f"continue with: akd train --resume {out}" in stderr
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert last.metadata["epoch"] == best.metadata["epoch"] == 1 and not (out / "epoch_002.pt").exists()
    assert all(torch.isfinite(t).all() for t in last.state_dict.values() if t.is_floating_point())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    resumed = subprocess.run(
        [sys.executable, "-m", "akd", "train", "--resume", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_teacher_that_changes_mid_run_ends_the_run_naming_both(fake, tmp_path):
    """Before: after a few steps the fake answered as another teacher (X-Teacher, X-Teacher-Versions and /teachers)
    and the run finished with exit 0 on the targets of two teachers."""
    base, app = fake

    def another_teacher(rows: int, fake: FakeTeacher) -> Answer:
        fake.name, fake.versions = "other", ["9c0ffee000000001", "9c0ffee000000002"]
        return served({"probs": probabilities(rows)}, fake)

    app.play(another_teacher, start=2)
    code, stderr = akd_train(tmp_path, *TINY, f"out_dir={tmp_path / 'run'}", f"teacher.url={base}")
    assert code == 2 and "Traceback" not in stderr, stderr
    line = failure_line(stderr)
    assert (
        "answered as another teacher: 'other' with member versions ['9c0ffee000000001', '9c0ffee000000002']; "
        "the run started with 'fake' with member versions ['3f2a9c1e7b5d4a60']"
    ) in line, line


SERVICE_ERROR = (
    ErrorBody(error=ErrorDetail(code="failed", message="a member failed", expected="finite logits", received="inf"))
    .model_dump_json()
    .encode()
)


@pytest.mark.parametrize(
    "refusal, said",
    [
        # the service's JSON error shape: what it said is said again; the first backoff, jittered: 0.1 to 0.3 s
        (
            Answer(500, {"content-type": "application/json"}, SERVICE_ERROR),
            "500 (internal server error): a member failed (expected finite logits, got inf); retrying in 0.",
        ),
        # Retry-After honoured, the jittered backoff on top: 2.1 to 2.3 s, not the first backoff's 0.1 to 0.3 s
        (Answer(429, {"Retry-After": "2"}, b"slow down"), "429 (too many requests); retrying in 2."),
    ],
    ids=["500", "429 with Retry-After"],
)
def test_a_500_or_a_429_is_retried_and_the_run_goes_on(fake, tmp_path, refusal, said):
    """Before: a single 500, or a 429 with Retry-After, ended the run at once (exit 2)."""
    base, app = fake
    app.play(lambda rows, fake: refusal, start=2, times=1)
    out = tmp_path / "run"
    code, stderr = akd_train(tmp_path, *TINY, f"out_dir={out}", f"teacher.url={base}")
    assert code == 0, stderr
    assert said in stderr
    # the refused one asked again
    assert app.requests == 3
    assert json.loads((out / "metrics.jsonl").read_text())["teacher_rows"] == 32


def test_an_answer_trickling_a_byte_at_a_time_is_bounded_by_timeout_s(fake, tmp_path):
    """Before: an answer arriving a byte every 2 s held `akd train` for 75 s with no log line, despite timeout_s = 3
    and give_up_after_s = 10: httpx's timeouts bound each read, and every read brought a byte. Now timeout_s bounds
    each request whole; the trickle (a byte every 0.5 s, never finishing within this test) is a failed request like
    a refused connection, retried until give_up_after_s."""
    base, app = fake
    app.play(lambda rows, fake: replace(served({"probs": probabilities(rows)}, fake), trickle_s=0.5), start=2)
    sets = [*TINY, f"out_dir={tmp_path / 'run'}", f"teacher.url={base}", "teacher.timeout_s=3"]
    code, stderr = akd_train(tmp_path, *sets, "teacher.give_up_after_s=3")
    assert code == 2 and "Traceback" not in stderr, stderr
    line = failure_line(stderr)
    assert re.search(r"unavailable for \d+s \(limit teacher.give_up_after_s = 3s\)", line), line
    assert line.endswith("last error: no complete answer within teacher.timeout_s = 3s"), line
    # said as it happens
    assert "no complete answer within teacher.timeout_s = 3s; retrying in" in stderr


QUERY_FAILURES = {
    # TeacherAnswerError, from the adversarial query AKD sends before the student's forward pass and collects after it
    "akd, NaN rows": ("akd", BAD_ANSWERS["NaN probabilities"][0]),
    # TeacherUnavailable, from the clean query ARD asked ahead (during the first step) for the second; the third
    # batch's, asked ahead in turn, is never collected
    "ard, 503 until give-up": ("ard", lambda rows, fake: Answer(503, {}, b"busy")),
}


def train_here(capsys, *sets: str) -> tuple[int, str]:
    """`akd train`'s own function (student_trainer.cli.run_train) in this process: its exit code and its stderr. No
    interpreter to start, so a run of a few steps costs about a second."""
    from student_trainer.cli import run_train

    capsys.readouterr()
    before = set(threading.enumerate())
    code = run_train(argparse.Namespace(config=None, sets=list(sets), resume=None))
    # the client's threads end by themselves once it is closed, a query asked ahead and never collected included
    for thread in set(threading.enumerate()) - before:
        if thread.name.startswith("akd-teacher-"):
            thread.join(timeout=HANG_S)
            assert not thread.is_alive(), thread
    return code, capsys.readouterr().err


@pytest.mark.parametrize("failure", list(QUERY_FAILURES))
def test_a_failure_during_an_overlapped_query_ends_the_run_as_the_synchronous_path_does(
    fake, tmp_path, capsys, failure
):
    """The second query fails; teacher.overlap on and off end the run the same way: exit 2, no checkpoint, and the
    same one-line message (but for how many seconds the service was retried)."""
    base, app = fake
    method, answer = QUERY_FAILURES[failure]
    sets = [*TINY, "limit_train=48", f"method={method}", f"teacher.url={base}", "teacher.give_up_after_s=1"]
    lines = {}
    for overlap in ("true", "false"):
        app.play(answer, start=2)
        out = tmp_path / overlap
        code, stderr = train_here(capsys, *sets, f"out_dir={out}", f"teacher.overlap={overlap}")
        assert code == 2 and "Traceback" not in stderr, stderr
        lines[overlap] = re.sub(r"unavailable for \d+s", "unavailable for Ns", failure_line(stderr))
        assert not (out / "last.pt").exists()
    assert lines["true"] == lines["false"]
    said = {"akd, NaN rows": f"service at {base} answered rows that", "ard, 503 until give-up": "for Ns (limit"}
    assert said[failure] in lines["true"], lines["true"]


def test_a_bad_answer_is_asked_again_of_another_replica(fakes, tmp_path):
    """Two replicas: every answer of the first is NaN from its first soft targets on; each call it answers wrongly
    is asked again of the second, and the run finishes on the second's answers alone."""
    (first, bad), (second, good) = fakes
    bad.play(BAD_ANSWERS["NaN probabilities"][0], start=1)
    good.play(None)
    out = tmp_path / "run"
    urls = f'teacher.url=["{first}", "{second}"]'
    code, stderr = akd_train(tmp_path, *TINY, f"out_dir={out}", urls)
    assert code == 0, stderr
    assert f"the teacher service at {first} answered rows that are not probabilities" in stderr
    assert "asking another replica" in stderr
    # every step's targets: the good replica's
    assert bad.requests >= 1 and good.requests == 2
    assert all(torch.isfinite(t).all() for t in load_checkpoint(out / "last.pt").state_dict.values())


def test_a_non_finite_loss_ends_a_run_without_a_teacher_and_saves_nothing_after_it(tmp_path):
    """PGD-AT, no teacher: an lr of 1e38 makes the loss non-finite within a few steps. Before, the run went on and
    saved NaN weights with exit 0."""
    out = tmp_path / "run"
    sets = ["limit_train=64", "val_size=16", f"batch_size={BATCH}", "attack.steps=1", "epochs=1", "lr=1e38"]
    code, stderr = akd_train(tmp_path, *sets, f"out_dir={out}")
    assert code == 2 and "Traceback" not in stderr, stderr
    line = failure_line(stderr)
    assert re.search(
        r"training stopped at epoch 1, step \d of 4: the (training loss|gradients' norm) is (nan|inf)", line
    )
    assert not any((out / name).exists() for name in ("last.pt", "best.pt", "epoch_001.pt"))
    assert "with a setting that does not diverge (a smaller lr, say: add --set lr=...), run the same" in stderr


def test_a_local_teacher_with_nan_weights_ends_the_run(tmp_path):
    """A local teacher's rows pass the same checks: a member whose weights hold a NaN used to train the student to
    NaN with exit 0."""
    member = save_member(tmp_path / "teacher.pt", seed=1)
    ckpt = load_checkpoint(member)
    first = next(name for name, t in ckpt.state_dict.items() if t.is_floating_point())
    ckpt.state_dict[first].view(-1)[0] = float("nan")
    save_checkpoint(member, ckpt)
    config = write_config(tmp_path / "teachers.toml", {"local": mnist_teacher([(member, 1.0)])})
    out = tmp_path / "run"
    code, stderr = akd_train(tmp_path, *TINY, f"out_dir={out}", f"teacher.config={config}")
    assert code == 2 and "Traceback" not in stderr, stderr
    line = failure_line(stderr)
    assert f"the local teacher 'local' ({config}) answered rows that are not probabilities: row 0 holds NaN" in line
    assert not (out / "last.pt").exists()


# ------------------------------------------------------------------ the row checks' tolerance, in-process


def service_rows(classes: int, members: int, seed: int = 0) -> torch.Tensor:
    """Rows as the service computes them (teacher_service.ensemble, float32), of trained-teacher-like logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(members, 256, classes, generator=g) * 8
    return aggregate_probs(logits, normalised_weights(torch.rand(members, generator=g).add(0.1)), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes, members", [(10, 1), (100, 3), (1000, 7)])
def test_the_row_sum_tolerance_admits_the_services_rows_in_each_dtype_and_refuses_twice_it(dtype, classes, members):
    rows = service_rows(classes, members).to(dtype)
    assert checked_probs(rows, 256, classes, members) is rows
    tolerance = row_sum_tolerance(dtype, classes, members)
    off = rows.clone()
    # one row off by about twice the tolerance
    off[7] = (rows[7].double() * (1 + 2 * tolerance)).to(dtype)
    with pytest.raises(BadAnswer, match=r"row 7 sums to [\d.]+ \(off 1 by [\d.e-]+, more than"):
        checked_probs(off, 256, classes, members)
    # float32 rows: a few parts in a million
    assert row_sum_tolerance(torch.float32, 10, 1) < 2e-6


def test_answers_in_float16_and_bfloat16_are_used_as_float32(fake):
    base, app = fake
    client = RemoteTeacher(base, None, 1.0, give_up_after_s=HANG_S)
    assert client.info().name == "fake"
    for dtype in (torch.float16, torch.bfloat16):
        app.play(lambda rows, fake, dtype=dtype: served({"probs": probabilities(rows).to(dtype)}, fake))
        probs = client(torch.rand(4, 1, 28, 28))
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs, probabilities(4).to(dtype).float(), rtol=0, atol=0)
    client.close()


def test_a_keys_first_answer_is_checked_like_an_upload(fake):
    """The rows a keys-first answer says it found must be the rows it holds: a `found` of the wrong length, or more
    rows than found, is refused like any wrong answer; a right one (nothing found) leads to the upload."""
    base, app = fake
    # clean rows: asked for by key first
    x = torch.randint(0, 256, (4, 1, 28, 28)).float() / 255
    for keys, wrong in [
        (
            lambda n, f: served({"found": torch.zeros(n - 1, dtype=torch.uint8), "probs": torch.zeros(0, 10)}, f),
            "answered 'found' of dtype uint8 and shape (3,) (expected a uint8 tensor 'found' of shape (4,)",
        ),
        (
            lambda n, f: served({"found": torch.ones(n, dtype=torch.uint8), "probs": probabilities(n - 1)}, f),
            "answered probabilities of shape (3, 10) (expected (4, 10)",
        ),
    ]:
        app.play(None)
        app.features, app.keys = [protocol.KEYS_FIRST], keys
        client = RemoteTeacher(base, "fake", 1.0, give_up_after_s=HANG_S)
        client.info()
        with pytest.raises(TeacherAnswerError, match=re.escape(wrong)):
            client(x)
        client.close()
    app.keys = lambda n, f: served({"found": torch.zeros(n, dtype=torch.uint8), "probs": torch.zeros(0, 10)}, f)
    client = RemoteTeacher(base, "fake", 1.0, give_up_after_s=HANG_S)
    client.info()
    torch.testing.assert_close(client(x), probabilities(4), rtol=0, atol=0)
    assert (client.rows_uploaded, app.requests) == (4, 1)
    client.close()
