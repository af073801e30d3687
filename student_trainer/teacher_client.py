"""Soft targets for the trainer: from the teacher service over HTTP, or from a local teacher in-process.

Both are a `Teacher`: a callable `teacher(x) -> probs` (B, K), tempered and ensemble-aggregated,
so a training method never knows which one it has, and `teacher.submit(x)`, the same answer asked for
now and collected later (the service's client has the query in flight meanwhile). Neither is trusted:
every answer is checked (`answer_checks`) before a loss sees it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import httpx
import torch

from shared import codec, protocol
from shared.protocol import CacheMode, TeacherInfo, TeachersResponse
from student_trainer.answer_checks import (
    BadAnswer,
    cache_hits,
    checked_found,
    checked_probs,
    checked_teacher,
    decoded,
    one_line,
)
from student_trainer.query_thread import OnDevice, Pending, QueryThread, settled

log = logging.getLogger("akd.teacher_client")

T = TypeVar("T")


class Teacher(Protocol):
    """Where a run's soft targets come from (RemoteTeacher or LocalTeacher)."""

    name: str | None
    temperature: float
    # Counters since the teacher was made: rows asked for, how many of them the service's cache answered, and how many
    # were uploaded whole (the rest were asked for by key, or never left the process).
    rows_requested: int
    cache_hits: int
    rows_uploaded: int
    # Whether submit() returns before the answer is computed (elsewhere: the service's client), so that asking early
    # hides the wait; False where it is computed by the caller's own thread (in-process), where asking early gains
    # nothing.
    overlaps: bool

    def info(self) -> TeacherInfo:
        """What the teacher is (classes, input shape, members); checked against the dataset before training."""

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """Soft targets (B, K) for inputs x (B, C, H, W) in [0, 1], on x's device; `adversarial`: x was made by an
        attack (it picks the service's cache mode). Raises TeacherAnswerError rather than return rows that are not
        probabilities."""

    def submit(self, x: torch.Tensor, *, adversarial: bool = False) -> Pending:
        """`self(x, adversarial=...)`, asked for now: `.result()` gives what the call gives and raises what it raises.
        x is copied before submit returns, so the caller may change it at once. Answers are given in the order asked."""

    def close(self) -> None:
        """Never waits for a query in flight: its answer is dropped, and its threads end by themselves."""


class TeacherUnavailable(RuntimeError):
    """The service stayed unreachable (or saturated) for longer than the run allows."""


class TeacherRequestError(RuntimeError):
    """The service refused a request (a 4xx): retrying would not help."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TeacherAnswerError(TeacherRequestError):
    """The teacher answered something other than the soft targets asked for: a body that does not decode, the wrong
    tensors or shape, rows that are not probabilities, another teacher. No loss may see it; a TeacherRequestError
    because asking the same teacher again would not help (another replica is asked once)."""


# Answers that say "not now" rather than "no": the call goes to the next replica, then is retried with backoff.
PASSING_TROUBLE = {
    429: "too many requests",
    500: "internal server error",
    502: "bad gateway: a load balancer found no live replica",
    503: "queue full, or shutting down",
    504: "gateway timeout: a load balancer's replica did not answer in time",
}


class _Refused(Exception):
    """One replica gave no answer to use now (transport error, deadline, a passing-trouble status): try the next."""

    def __init__(self, problem: str, wait: float | None = None):
        super().__init__(problem)
        # wait: the answer's Retry-After, if it had one
        self.problem, self.wait = problem, wait


class _Overdue(Exception):
    """A call the courier stopped waiting for."""


class _Courier:
    """Runs one call at a time on a daemon thread, so that the caller can stop waiting at a deadline.

    httpx's timeouts bound each read, not a request: an answer trickling a byte a second never trips them. The caller
    waits `timeout_s` for the whole call; past it, the thread is left to its request (ended by httpx's per-read
    timeout or by the server; a daemon, so it never holds the process) and the next call gets a fresh thread. The
    thread is a `QueryThread`: kept across calls, and a forked child's own.
    """

    def __init__(self) -> None:
        self._thread = QueryThread("akd-teacher-calls")

    def run(self, call: Callable[[], T], timeout_s: float) -> T:
        """call(), or what it raised; _Overdue when it has not returned within `timeout_s`."""
        done = self._thread.submit(call)
        try:
            return done.result(timeout=timeout_s)
        except TimeoutError:
            # finished after all: the TimeoutError is the call's own
            if done.done():
                raise
            # overdue: the thread ends once its call does, and takes no other
            self.close()
            raise _Overdue from None

    def close(self) -> None:
        self._thread.close()


def _own_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows on the CPU in their wire form (`codec.to_transport`), in memory of their own: the caller may change x
    once it has asked."""
    rows = codec.to_transport(x.detach().cpu())
    # handed back as they were: a CPU x's own memory
    if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        rows = rows.clone()
    return rows


class RemoteTeacher:
    """POST /soft-targets with connection reuse, timeouts, and retries that ride out a service restart.

    `url` is one service or a list of its replicas (behind no load balancer, or several): calls go to them in turn,
    and a call that a replica refuses (connection error, 429, 500, 503, or a load balancer's 502/504) goes to the next
    one at once. Each call's soft targets are exactly one replica's answer, so a lost replica costs no step and repeats
    none. When every replica has failed in a row, the round is retried with exponential backoff (honouring
    Retry-After) until `give_up_after_s` has passed since the first failure. Each request, whole (connecting, sending,
    the answer to its last byte), has `timeout_s`: one that takes longer counts as a failure like a refused connection.

    Every answer is checked before it is used: decoded, the tensors and shape asked for, rows that are probabilities
    (`checked_probs`), the teacher the run started with (`checked_teacher`, from info() or the first call). A wrong
    answer is asked again once of another replica, where there is one, then raises TeacherAnswerError.

    Clean inputs that are exactly k/255 travel as uint8: 4x smaller, and identical bytes from every job, which is what
    lets the service's cache hit across jobs. The service's cache mode depends on what is asked about: `clean_cache`
    for clean inputs (which repeat every epoch), `adversarial_cache` for adversarial ones (fresh every step, so
    `bypass` by default: storing them helps nobody). Queries the cache keeps carry X-AKD-Affinity (the teacher's name)
    unless `affinity` is off: a load balancer that hashes it (deploy/nginx.conf) sends them all to one replica, where
    their rows are cached once and hit. Where the service offers keys first (a cache), those queries send the rows'
    keys first and upload only the rows it has not cached.

    `submit` hands a query to the client's query thread (one a client, answering in order), which runs it whole (the
    wire form aside: made on the caller's thread, from a copy) while the caller computes. A call runs on the caller's
    thread when no query is in flight, behind them when some are.
    """

    overlaps = True

    def __init__(
        self,
        url: str | list[str],
        name: str | None,
        temperature: float,
        token: str | None = None,
        timeout_s: float = 60.0,
        give_up_after_s: float = 300.0,
        max_backoff_s: float = 5.0,
        clean_cache: CacheMode = CacheMode.use,
        adversarial_cache: CacheMode = CacheMode.bypass,
        affinity: bool = True,
        keys_first: bool = True,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("RemoteTeacher needs at least one url")
        self._replicas = [httpx.Client(base_url=u.rstrip("/"), headers=headers, timeout=timeout_s) for u in urls]
        self._next_replica = 0
        # replicas whose last answer was a refusal: logged once, not on every call
        self._down: set[str] = set()
        self._courier = _Courier()
        # submit()'s queries; once close() is called, no query sends again and a retry's wait ends at once
        self._queries, self._closing = QueryThread("akd-teacher-queries"), threading.Event()
        # the teacher every answer must come from
        self._started_with: TeacherInfo | None = None
        self.url, self.name, self.temperature = ", ".join(urls), name, temperature
        self.cache_modes = {False: CacheMode(clean_cache), True: CacheMode(adversarial_cache)}
        self.timeout_s, self.give_up_after_s, self.max_backoff_s = timeout_s, give_up_after_s, max_backoff_s
        self.affinity = affinity
        # keys first is used only once info() has seen the service offer it
        self.wants_keys_first, self.keys_first = keys_first, False
        self.rows_requested = 0
        # rows sent whole: all of them, but the cached ones where keys first is used
        self.rows_uploaded = 0
        self.cache_hits = 0

    def info(self) -> TeacherInfo:
        """The served teacher's description; also the start-up check that the service is there, and that every
        replica reachable now serves the same teacher (same members, versions, weights and temperature): soft targets
        must not depend on which replica answered. Every later answer must come from this teacher."""
        teacher, features = self._send("GET", protocol.TEACHERS_PATH, read=self._listing)
        for replica in self._replicas:
            try:
                other, offered = self._listing(self._checked(self._attempt(replica, "GET", protocol.TEACHERS_PATH)))
            except (_Refused, TeacherRequestError, BadAnswer) as exc:
                log.warning("teacher replica %s not checked at start: %s", replica.base_url, exc)
                continue
            features &= offered
            if other != teacher:
                raise TeacherRequestError(
                    f"teacher replicas differ: {replica.base_url} serves {other.name!r} with members "
                    f"{[m.version for m in other.members]}, another {[m.version for m in teacher.members]}; "
                    "every url in teacher.url must serve the same teacher config"
                )
        self.keys_first = self.wants_keys_first and protocol.KEYS_FIRST in features
        self._started_with = teacher
        return teacher

    def _listing(self, response: httpx.Response) -> tuple[TeacherInfo, set[str]]:
        """The teacher this client asks for, and the features offered, from a /teachers answer."""
        try:
            listing = TeachersResponse.model_validate_json(response.content)
        except ValueError as exc:
            # pydantic's ValidationError, for bad JSON too
            raise BadAnswer(f"a teacher list that does not parse: {one_line(exc)}") from None
        teachers = listing.teachers
        if self.name is None and len(teachers) == 1:
            self.name = teachers[0].name
        match = [t for t in teachers if t.name == self.name]
        if not match:
            raise TeacherRequestError(
                f"{response.url} serves {[t.name for t in teachers]}, not {self.name!r}: set teacher.name"
            )
        return match[0], set(listing.features)

    def _teacher(self) -> TeacherInfo:
        """The teacher answers must come from: info()'s, or the service's at the first call when info() was not asked
        (keys first then stays off: only info() learns whether the service offers it)."""
        if self._started_with is None:
            self._started_with, _ = self._send("GET", protocol.TEACHERS_PATH, read=self._listing)
        return self._started_with

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """`submit(x, adversarial=...).result()`; on this thread, with nothing to hand over, when no query is in
        flight."""
        if self._queries.busy():
            return self.submit(x, adversarial=adversarial).result()
        return self._query(codec.to_transport(x.detach().cpu()), adversarial).to(x.device)

    def submit(self, x: torch.Tensor, *, adversarial: bool = False) -> Pending:
        """The call's answer, asked for now and answered on the query thread, queries in the order submitted. x is
        copied (in its wire form) before this returns; the answer comes on x's device."""
        rows, device = _own_rows(x), x.device
        query = lambda: self._query(rows, adversarial)  # noqa: E731
        # closed: refused at once, here (a thread started now would outlive the client)
        return OnDevice(settled(query) if self._closing.is_set() else self._queries.submit(query), device)

    def _query(self, rows: torch.Tensor, adversarial: bool) -> torch.Tensor:
        """The soft targets (B, K) for rows in their wire form, float32 on the CPU: one call's whole work, on
        whichever thread runs it (one at a time: the counters are updated here)."""
        teacher = self._teacher()
        mode = self.cache_modes[adversarial]
        params = {"temperature": self.temperature, "outputs": "probs", "cache": mode.value}
        if self.name:
            params["teacher"] = self.name
        headers = {}
        # rows worth caching go to one replica behind a balancer
        if self.affinity and mode is not CacheMode.bypass:
            headers[protocol.HEADER_AFFINITY] = self.name or "default"
        probs = None
        if self.keys_first and mode is CacheMode.use:
            probs = self._by_keys_first(rows, params, headers, teacher)
        if probs is None:
            probs = self._upload(rows, params, headers, teacher)
        self.rows_requested += len(rows)
        return probs.float()

    def _by_keys_first(
        self, rows: torch.Tensor, params: dict, headers: dict, teacher: TeacherInfo
    ) -> torch.Tensor | None:
        """The cached rows' soft targets asked for by key (16 bytes a row), then only the other rows uploaded.
        None when the service turns the path down (then it is not asked again)."""
        query = {k: v for k, v in params.items() if k != "cache"}
        body = codec.encode_keys(rows)
        read = lambda response: self._found_rows(response, len(rows), teacher)  # noqa: E731
        try:
            answered, found = self._send(
                "POST", protocol.SOFT_TARGET_KEYS_PATH, read=read, params=query, headers=headers, content=body
            )
        except TeacherRequestError as exc:
            if exc.status != 404:
                raise
            log.info("teacher service %s offers no keys-first path (%s): uploading every row", self.url, exc)
            self.keys_first = False
            return None
        self.cache_hits += int(found.sum())
        if found.all():
            return answered
        probs = torch.empty(len(rows), teacher.num_classes, dtype=torch.float32)
        probs[found] = answered.float()
        probs[~found] = self._upload(rows[~found], params, headers, teacher).float()
        return probs

    @staticmethod
    def _found_rows(response: httpx.Response, rows: int, teacher: TeacherInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """A keys-first answer, checked: the found rows' probabilities, and which rows those are."""
        checked_teacher(response.headers, teacher)
        cache_hits(response.headers, rows)
        tensors = decoded(response.content)
        found = checked_found(tensors.get(protocol.FOUND_KEY), rows)
        probs = checked_probs(tensors.get("probs"), int(found.sum()), teacher.num_classes, len(teacher.members))
        return probs, found

    def _upload(self, rows: torch.Tensor, params: dict, headers: dict, teacher: TeacherInfo) -> torch.Tensor:
        body = codec.encode_inputs(rows)
        read = lambda response: self._answered_rows(response, len(rows), teacher)  # noqa: E731
        probs, hits = self._send(
            "POST", protocol.SOFT_TARGETS_PATH, read=read, params=params, headers=headers, content=body
        )
        self.rows_uploaded += len(rows)
        self.cache_hits += hits
        return probs

    @staticmethod
    def _answered_rows(response: httpx.Response, rows: int, teacher: TeacherInfo) -> tuple[torch.Tensor, int]:
        """An upload's answer, checked: the rows' probabilities, and how many the cache answered."""
        checked_teacher(response.headers, teacher)
        hits = cache_hits(response.headers, rows)
        probs = checked_probs(decoded(response.content).get("probs"), rows, teacher.num_classes, len(teacher.members))
        return probs, hits

    def _send(self, method: str, path: str, read: Callable[[httpx.Response], T], **kwargs) -> T:
        """`read` of the first usable answer from a replica, going round them with backoff; TeacherUnavailable past
        give_up_after_s, TeacherRequestError for a refusal, TeacherAnswerError for a second wrong answer (or the
        first, with one replica)."""
        first_failure, backoff, wrong = None, 0.1, 0
        while True:
            if self._closing.is_set():
                raise self._closed()
            problem, waits = None, []
            for replica in self._round():
                try:
                    return self._read(replica, method, path, read, kwargs)
                except _Refused as refused:
                    problem = refused.problem
                    waits.append(backoff if refused.wait is None else refused.wait)
                    self._mark(replica, problem)
                except TeacherAnswerError as exc:
                    wrong += 1
                    if wrong > 1 or len(self._replicas) == 1:
                        raise
                    log.warning("%s; asking another replica", exc)
                    problem = str(exc)
                    waits.append(backoff)
            first_failure = first_failure or time.monotonic()
            self._pause(time.monotonic() - first_failure, problem, min(waits))
            backoff = min(backoff * 2, self.max_backoff_s)

    def _read(self, replica: httpx.Client, method: str, path: str, read: Callable[[httpx.Response], T], kwargs) -> T:
        """One replica's answer, read and checked; _Refused when it gave none to use now."""
        try:
            response = self._attempt(replica, method, path, **kwargs)
            self._mark(replica, None)
            return read(self._checked(response))
        except BadAnswer as exc:
            where = str(replica.base_url).rstrip("/")
            raise TeacherAnswerError(f"the teacher service at {where} answered {exc}") from None

    def _attempt(self, replica: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
        """One request to one replica, complete within timeout_s; _Refused for a failure worth another try."""
        try:
            response = self._courier.run(lambda: replica.request(method, path, **kwargs), self.timeout_s)
        except _Overdue:
            raise _Refused(f"no complete answer within teacher.timeout_s = {self.timeout_s:g}s") from None
        except httpx.TransportError as exc:
            # refused, reset, timed out: the service may be restarting
            raise _Refused(f"{type(exc).__name__}: {one_line(exc)}") from None
        except httpx.DecodingError as exc:
            raise BadAnswer(f"a body that does not decode as its Content-Encoding says: {one_line(exc)}") from None
        if response.status_code == 500 and _error_code(response) == protocol.NON_FINITE_OUTPUT:
            raise BadAnswer(f"rows it cannot answer: {_service_error(response)}")
        if response.status_code in PASSING_TROUBLE:
            status, said = response.status_code, _service_error(response)
            problem = f"{status} ({PASSING_TROUBLE[status]})" + (f": {said}" if said else "")
            raise _Refused(problem, _retry_after(response))
        return response

    def _pause(self, waited: float, problem: str | None, wait: float) -> None:
        """Sleep `wait` before the next round (a Retry-After is honoured, up to the give-up point), or give up."""
        if waited > self.give_up_after_s:
            raise TeacherUnavailable(
                f"teacher service at {self.url} unavailable for {waited:.0f}s (limit teacher.give_up_after_s = "
                f"{self.give_up_after_s:g}s); last error: {problem}"
            )
        wait = min(wait, self.give_up_after_s - waited)
        log.warning("teacher service %s: %s; retrying in %.1fs", self.url, problem, wait)
        # cut short by close(): the next round refuses to send
        self._closing.wait(wait)

    def _round(self) -> list[httpx.Client]:
        """Every replica once, starting with the next in turn: calls spread over the replicas."""
        start, self._next_replica = self._next_replica, (self._next_replica + 1) % len(self._replicas)
        return self._replicas[start:] + self._replicas[:start]

    def _mark(self, replica: httpx.Client, problem: str | None) -> None:
        url = str(replica.base_url)
        if problem is None and url in self._down:
            self._down.discard(url)
            log.info("teacher replica %s answers again", url)
        elif problem is not None and url not in self._down and len(self._replicas) > 1:
            self._down.add(url)
            log.warning("teacher replica %s: %s; using the others", url, problem)

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        detail = _service_error(response) or one_line(response.text, 500)
        raise TeacherRequestError(f"teacher service answered {response.status_code}: {detail}", response.status_code)

    def _closed(self) -> RuntimeError:
        return RuntimeError(f"the teacher client for {self.url} is closed")

    def close(self) -> None:
        """Ends the client without waiting for a query in flight (one asked ahead for a batch that never came, or one
        retrying a service that is down): its retries stop, it ends once its request does (within timeout_s), and a
        query still queued never sends. The connections are closed by the thread that uses them, once it is done."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._queries.busy():
            self._queries.submit(self._shut)
        else:
            self._shut()
        self._queries.close()

    def _shut(self) -> None:
        self._courier.close()
        for replica in self._replicas:
            replica.close()


class LocalTeacher:
    """The same teacher, in this process: for runs without a service, and the reference for tests.

    A thin shell over the service's in-process entry (teacher_service.local), which runs the members through the
    service's own forward path and ensemble formula, so both give the same numbers on one device. Its rows pass the
    same checks as the service's (`checked_probs`): a member with NaN weights must end the run, not poison it.
    """

    overlaps = False

    def __init__(self, config_path: str | Path, name: str | None, temperature: float | None, device: torch.device):
        """`temperature=None`: the teacher's own, as the service uses when a request names none."""
        from teacher_service.local import InProcessTeacher

        self._teacher = InProcessTeacher(config_path, name, device)
        self._info = self._teacher.info()
        self._config_path = config_path
        self.name = self._teacher.name
        self.temperature = self._teacher.default_temperature if temperature is None else temperature
        self.rows_requested = 0
        self.cache_hits = 0
        # nothing leaves the process
        self.rows_uploaded = 0

    def info(self) -> TeacherInfo:
        return self._info

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """`adversarial` only matters to a cache, which this has none of."""
        self.rows_requested += len(x)
        probs = self._teacher.probs(x, self.temperature)
        try:
            checked_probs(probs, len(x), self._info.num_classes, len(self._info.members))
        except BadAnswer as exc:
            raise TeacherAnswerError(f"the local teacher {self.name!r} ({self._config_path}) answered {exc}") from None
        return probs.to(x.device)

    def submit(self, x: torch.Tensor, *, adversarial: bool = False) -> Pending:
        """The call's answer, computed now on the caller's thread (a thread of its own would only compete with the
        caller for the same cores), as a future that is already done."""
        return settled(lambda: self(x, adversarial=adversarial))

    def close(self) -> None:
        pass


def _error_code(response: httpx.Response) -> str | None:
    """The `code` of the service's JSON error, or None when the body is not one."""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def _service_error(response: httpx.Response) -> str | None:
    """The service's JSON error (teacher_service/errors.py) as one line, or None when the body is not one."""
    try:
        error = response.json()["error"]
        detail = f"{error['message']} (expected {error.get('expected')}, got {error.get('received')})"
    except (ValueError, KeyError, TypeError):
        return None
    return one_line(detail, 500)


def _retry_after(response: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds, or None when it is missing or not a finite number of seconds."""
    try:
        seconds = float(response.headers.get("Retry-After", "none"))
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
