"""The teacher client without its I/O: which request to send next, and what each answer means (a sans-IO core).

A call is a generator of steps. It yields `Send` (one request to one replica) and is sent back what came of it (an
httpx.Response, or a `Failure`), or yields `Wait` (a pause before the next round of retries) and is sent None; it
returns the call's result. `TeacherClient` runs the steps with httpx.Client, `AsyncTeacherClient` with
httpx.AsyncClient: both ask, fail over, retry, check and count the same way, because all of that is here, once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

from shared.client.answers import cache_hits, checked_found, checked_probs, checked_teacher, decoded
from shared.client.arrays import Tensor, encode_inputs, encode_keys
from shared.client.backoff import Backoff, Uniform
from shared.client.errors import BadAnswer, TeacherAnswerError, TeacherRequestError, TeacherUnavailable, one_line
from shared.client.listing import TeacherInfo, parse_listing
from shared.client.shared_memory import REGION_NOT_FOUND, ClientRegion, answer_shape, call_bytes
from shared.wire import (
    FOUND_KEY,
    HEADER_AFFINITY,
    KEYS_FIRST,
    NON_FINITE_OUTPUT,
    SHARED_MEMORY,
    SOFT_TARGET_KEYS_PATH,
    SOFT_TARGETS_PATH,
    TEACHERS_PATH,
    CacheMode,
)

log = logging.getLogger("akd.client")

T = TypeVar("T")

# Answers that say "not now" rather than "no": the call goes to the next replica, then is retried with backoff.
PASSING_TROUBLE = {
    429: "too many requests",
    500: "internal server error",
    502: "bad gateway: a load balancer found no live replica",
    503: "queue full, or shutting down",
    504: "gateway timeout: a load balancer's replica did not answer in time",
}
# the first wait's scale (Backoff.base_s)
BACKOFF_BASE_S = 0.1


@dataclass(frozen=True)
class Send:
    """One request, to the replica at index `replica` (its base URL: `ClientCore.urls[replica]`)."""

    replica: int
    method: str
    path: str
    params: dict | None = None
    headers: dict | None = None
    content: bytes | None = None


@dataclass(frozen=True)
class Wait:
    """A pause before the next round; a client being closed may cut it short."""

    seconds: float


@dataclass(frozen=True)
class Failure:
    """A request that brought no answer: refused, reset, past its deadline; `undecodable`: an answer came whose body
    does not decode as its Content-Encoding says (a wrong answer, not trouble that passes)."""

    problem: str
    undecodable: bool = False

    @classmethod
    def of(cls, exc: httpx.TransportError | httpx.DecodingError) -> Failure:
        """What an httpx error means: a transport error (refused, reset, timed out: the service may be restarting),
        or a body that does not decode."""
        if isinstance(exc, httpx.DecodingError):
            return cls(f"a body that does not decode as its Content-Encoding says: {one_line(exc)}", undecodable=True)
        return cls(f"{type(exc).__name__}: {one_line(exc)}")

    @classmethod
    def overdue(cls, timeout_s: float) -> Failure:
        return cls(f"no complete answer within teacher.timeout_s = {timeout_s:g}s")


Outcome = httpx.Response | Failure
Steps = Generator[Send | Wait, Outcome | None, T]


class _Refused(Exception):
    """One replica gave no answer to use now (transport error, deadline, a passing-trouble status): try the next."""

    def __init__(self, problem: str, wait: float | None = None):
        super().__init__(problem)
        # wait: the answer's Retry-After, if it had one
        self.problem, self.wait = problem, wait


class ClientCore:
    """A teacher client's settings, state and protocol; `TeacherClient` and `AsyncTeacherClient` add the I/O.

    `url`: one service, or a list of its replicas (each call goes to them in turn; a replica that refuses, by a
    connection error, 429, 500, 503 or a load balancer's 502/504, is failed over to the next at once). `name`: the
    teacher (None: the only one served). `temperature`: the soft targets' (None: the teacher's own). `token`: sent
    as `Authorization: Bearer`. `timeout_s`: each request whole, connecting to last byte. `give_up_after_s`: how long
    rounds of retries go on after the first failure before TeacherUnavailable; between rounds, the client waits a
    jittered backoff (`Backoff`: capped at `max_backoff_s`, drawn with `rng`) on top of any Retry-After.
    `clean_cache`, `adversarial_cache`: the service's cache mode for each kind of query. `affinity`: queries the cache
    keeps carry X-AKD-Affinity, so that a balancer sends them to one replica. `keys_first`: ask for cached rows by key
    and upload only the others, where info() finds the service offers it. `shared_memory`: where info() finds one
    service (not replicas) offering it and the service sees this process's shared memory (registering a region is the
    probe), rows and answers go through one region of this client's (`shared.client.shared_memory`) and a request
    carries neither; the answers are the same bit for bit. One call at a time uses the region.

    Every answer is checked before it is returned (`shared.client.answers`): decoded, the tensors and shape asked
    for, rows that are probabilities, the teacher the client started with (from info() or the first call). A wrong
    answer is asked again once of another replica, where there is one, then raises TeacherAnswerError. Each call's
    soft targets are exactly one replica's answer.
    """

    def __init__(
        self,
        url: str | list[str],
        name: str | None = None,
        temperature: float | None = None,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        give_up_after_s: float = 300.0,
        max_backoff_s: float = 5.0,
        clean_cache: CacheMode | str = CacheMode.use,
        adversarial_cache: CacheMode | str = CacheMode.bypass,
        affinity: bool = True,
        keys_first: bool = True,
        shared_memory: bool = True,
        rng: Uniform | None = None,
    ):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("a teacher client needs at least one url")
        _check_settings(temperature, timeout_s, give_up_after_s)
        # the replicas' base URLs
        self.urls = [u.rstrip("/") for u in urls]
        self.url, self.name, self.temperature = ", ".join(urls), name, temperature
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.cache_modes = {False: CacheMode(clean_cache), True: CacheMode(adversarial_cache)}
        self.timeout_s, self.give_up_after_s, self.max_backoff_s = timeout_s, give_up_after_s, max_backoff_s
        self.backoff = Backoff(BACKOFF_BASE_S, max_backoff_s, rng)
        self.affinity = affinity
        # keys first is used only once info() has seen the service offer it
        self.wants_keys_first, self.keys_first = keys_first, False
        # the same for shared memory, which the first upload's registration then confirms (or turns off)
        self.wants_shared_memory, self.shared_memory = shared_memory, False
        self.region: ClientRegion | None = None
        # counters since the client was made: rows asked for, how many of them the service's cache answered, and
        # how many were sent whole (the rest were asked for by key)
        self.rows_requested, self.cache_hits, self.rows_uploaded = 0, 0, 0
        # once closed, no request sends
        self.closed = False
        self._next_replica = 0
        # replicas whose last answer was a refusal: logged once, not on every call
        self._down: set[int] = set()
        # the teacher every answer must come from
        self._started_with: TeacherInfo | None = None
        self._connect()

    def _connect(self) -> None:
        """Where a transport makes its connections (one a replica)."""

    def info_steps(self) -> Steps[TeacherInfo]:
        """The served teacher's description; also the start-up check that the service is there, and that every
        replica reachable now serves the same teacher (same members, versions, weights and temperature): soft targets
        must not depend on which replica answered. Every later answer must come from this teacher."""
        teacher, features = yield from self._exchange("GET", TEACHERS_PATH, self._listing)
        for replica, base in enumerate(self.urls):
            outcome = yield Send(replica, "GET", TEACHERS_PATH)
            try:
                other, offered = self._listing(self._checked(self._usable(outcome)))
            except (_Refused, TeacherRequestError, BadAnswer) as exc:
                log.warning("teacher replica %s not checked at start: %s", base, exc)
                continue
            features &= offered
            if other != teacher:
                raise TeacherRequestError(
                    f"teacher replicas differ: {base} serves {other.name!r} with members "
                    f"{[m.version for m in other.members]}, another {[m.version for m in teacher.members]}; "
                    "every url in teacher.url must serve the same teacher config"
                )
        self.keys_first = self.wants_keys_first and KEYS_FIRST in features
        self.shared_memory = self.wants_shared_memory and SHARED_MEMORY in features and len(self.urls) == 1
        self._started_with = teacher
        return teacher

    def _listing(self, response: httpx.Response) -> tuple[TeacherInfo, set[str]]:
        """The teacher this client asks for, and the features offered, from a /teachers answer."""
        teachers, features = parse_listing(response.content)
        if self.name is None and len(teachers) == 1:
            self.name = teachers[0].name
        match = [t for t in teachers if t.name == self.name]
        if not match:
            raise TeacherRequestError(
                f"{response.url} serves {[t.name for t in teachers]}, not {self.name!r}: set teacher.name"
            )
        return match[0], set(features)

    def _teacher(self) -> Steps[TeacherInfo]:
        """The teacher answers must come from: info()'s, or the service's at the first call when info() was not asked
        (keys first then stays off: only info() learns whether the service offers it)."""
        if self._started_with is None:
            self._started_with, _ = yield from self._exchange("GET", TEACHERS_PATH, self._listing)
        return self._started_with

    def query_steps(self, rows: np.ndarray, adversarial: bool) -> Steps[np.ndarray]:
        """The soft targets (B, K), float32, for rows in their wire form (`arrays.wire_rows`): one call's whole work
        (the counters are updated here)."""
        teacher = yield from self._teacher()
        mode = self.cache_modes[adversarial]
        params = {"temperature": self.temperature, "outputs": "probs", "cache": mode.value}
        if self.temperature is None:
            del params["temperature"]
        if self.name:
            params["teacher"] = self.name
        headers = {}
        # rows worth caching go to one replica behind a balancer
        if self.affinity and mode is not CacheMode.bypass:
            headers[HEADER_AFFINITY] = self.name or "default"
        probs = None
        if self.keys_first and mode is CacheMode.use:
            probs = yield from self._by_keys_first(rows, params, headers, teacher)
        if probs is None:
            probs = yield from self._upload(rows, params, headers, teacher)
        self.rows_requested += len(rows)
        return probs

    def _by_keys_first(
        self, rows: np.ndarray, params: dict, headers: dict, teacher: TeacherInfo
    ) -> Steps[np.ndarray | None]:
        """The cached rows' soft targets asked for by key (16 bytes a row), then only the other rows uploaded.
        None when the service turns the path down (then it is not asked again)."""
        query = {k: v for k, v in params.items() if k != "cache"}
        read = lambda response: self._found_rows(response, len(rows), teacher)  # noqa: E731
        try:
            answered, found = yield from self._exchange(
                "POST", SOFT_TARGET_KEYS_PATH, read, params=query, headers=headers, content=encode_keys(rows)
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
        probs = np.empty((len(rows), teacher.num_classes), dtype=np.float32)
        probs[found] = answered
        probs[~found] = yield from self._upload(rows[~found], params, headers, teacher)
        return probs

    @staticmethod
    def _found_rows(response: httpx.Response, rows: int, teacher: TeacherInfo) -> tuple[np.ndarray, np.ndarray]:
        """A keys-first answer, checked: the found rows' probabilities, and which rows those are."""
        checked_teacher(response.headers, teacher)
        cache_hits(response.headers, rows)
        tensors = decoded(response.content)
        found = checked_found(tensors.get(FOUND_KEY), rows)
        probs = checked_probs(tensors.get("probs"), int(found.sum()), teacher.num_classes, len(teacher.members))
        return probs, found

    def _upload(self, rows: np.ndarray, params: dict, headers: dict, teacher: TeacherInfo) -> Steps[np.ndarray]:
        if self.shared_memory:
            probs = yield from self._through_region(rows, params, headers, teacher)
            if probs is not None:
                return probs
        read = lambda response: self._answered_rows(response, len(rows), teacher)  # noqa: E731
        probs, hits = yield from self._exchange(
            "POST", SOFT_TARGETS_PATH, read, params=params, headers=headers, content=encode_inputs(rows)
        )
        self.rows_uploaded += len(rows)
        self.cache_hits += hits
        return probs

    def _through_region(
        self, rows: np.ndarray, params: dict, headers: dict, teacher: TeacherInfo
    ) -> Steps[np.ndarray | None]:
        """The rows' soft targets through this client's region (the v2 infer route); None once the service turns
        shared memory down, which is then not used again."""
        need = call_bytes(rows, teacher.num_classes)
        # a region the service no longer holds (it restarted) is registered again, once a call
        for again in (False, True):
            stale = again or self.region is None or self.region.pid != os.getpid() or not self.region.fits(*need)
            if stale and not (yield from self._new_region(*need)):
                return None
            self.region.write_rows(rows)
            request = self.region.infer_request(rows, teacher.num_classes, params)
            read = lambda response: self._region_answer(response, len(rows), teacher)  # noqa: E731
            try:
                probs, hits = yield from self._exchange(
                    "POST",
                    f"/v2/models/{self.name}/infer",
                    read,
                    headers={**headers, "Content-Type": "application/json"},
                    content=json.dumps(request).encode(),
                )
            except TeacherRequestError as exc:
                if exc.status not in (400, 404):
                    raise
                if exc.code == REGION_NOT_FOUND and not again:
                    continue
                self._no_shared_memory(f"its shared-memory request was refused ({exc})")
                return None
            self.rows_uploaded += len(rows)
            self.cache_hits += hits
            return probs
        return None

    def _new_region(self, rows_bytes: int, answer_bytes: int) -> Steps[bool]:
        """A region for the call, registered with the service: the probe that it sees this process's shared memory.
        False (and shared memory off) where it does not."""
        if self.region is not None and self.region.pid == os.getpid():
            self.region.close()
        # a forked child leaves its parent's region alone
        self.region = None
        region = ClientRegion(rows_bytes, answer_bytes)
        path = f"/v2/systemsharedmemory/region/{region.name}/register"
        try:
            yield from self._exchange("POST", path, lambda _: None, content=json.dumps(region.registration()).encode())
        except TeacherRequestError as exc:
            region.close()
            self._no_shared_memory(f"it does not take this process's shared memory ({exc})")
            return False
        self.region = region
        return True

    def _no_shared_memory(self, why: str) -> None:
        log.info("teacher service %s: %s; rows go in request bodies", self.url, why)
        self.shared_memory = False
        self.close_region()

    def close_region(self) -> None:
        """Unlinks this client's region (the service then drops it); a forked child's copy is left to its parent."""
        if self.region is not None and self.region.pid == os.getpid():
            self.region.close()
        self.region = None

    def _region_answer(self, response: httpx.Response, rows: int, teacher: TeacherInfo) -> tuple[np.ndarray, int]:
        """A shared-memory answer, checked as an upload's: its JSON names `probs` in the region, read from there."""
        checked_teacher(response.headers, teacher)
        hits = cache_hits(response.headers, rows)
        try:
            answer = response.json()
        except ValueError:
            raise BadAnswer("an infer answer that is not JSON") from None
        if wrong := answer_shape(answer, self.region, rows, teacher.num_classes):
            raise BadAnswer(wrong)
        values = self.region.read_answer(rows, teacher.num_classes)
        probs = Tensor("float32", values.shape, values)
        return checked_probs(probs, rows, teacher.num_classes, len(teacher.members)), hits

    @staticmethod
    def _answered_rows(response: httpx.Response, rows: int, teacher: TeacherInfo) -> tuple[np.ndarray, int]:
        """An upload's answer, checked: the rows' probabilities, and how many the cache answered."""
        checked_teacher(response.headers, teacher)
        hits = cache_hits(response.headers, rows)
        probs = checked_probs(decoded(response.content).get("probs"), rows, teacher.num_classes, len(teacher.members))
        return probs, hits

    def _exchange(self, method: str, path: str, read: Callable[[httpx.Response], T], **request: Any) -> Steps[T]:
        """`read` of the first usable answer from a replica, going round them with backoff; TeacherUnavailable past
        give_up_after_s, TeacherRequestError for a refusal, TeacherAnswerError for a second wrong answer (or the
        first, with one replica)."""
        first_failure, wrong, waits = None, 0, self.backoff.waits()
        while True:
            if self.closed:
                raise self.closed_error()
            problem, floors = None, []
            for replica in self._round():
                outcome = yield Send(replica, method, path, **request)
                try:
                    return self._read(replica, outcome, read)
                except _Refused as refused:
                    problem = refused.problem
                    floors.append(refused.wait or 0.0)
                    self._mark(replica, problem)
                except TeacherAnswerError as exc:
                    wrong += 1
                    if wrong > 1 or len(self.urls) == 1:
                        raise
                    log.warning("%s; asking another replica", exc)
                    problem = str(exc)
                    floors.append(0.0)
            first_failure = first_failure or time.monotonic()
            # a Retry-After is a floor (the soonest any replica said it may answer), and the jittered backoff comes on
            # top: clients told the same time do not all come back at it
            yield Wait(self._pause(time.monotonic() - first_failure, problem, min(floors) + next(waits)))

    def _read(self, replica: int, outcome: Outcome | None, read: Callable[[httpx.Response], T]) -> T:
        """One replica's answer, read and checked; _Refused when it gave none to use now."""
        try:
            response = self._usable(outcome)
            self._mark(replica, None)
            return read(self._checked(response))
        except BadAnswer as exc:
            raise TeacherAnswerError(f"the teacher service at {self.urls[replica]} answered {exc}") from None

    @staticmethod
    def _usable(outcome: Outcome | None) -> httpx.Response:
        """The answer, unless it is none to use now (_Refused) or a wrong one (BadAnswer)."""
        if isinstance(outcome, Failure):
            if outcome.undecodable:
                raise BadAnswer(outcome.problem)
            raise _Refused(outcome.problem)
        if not isinstance(outcome, httpx.Response):
            raise TypeError(f"a Send is answered by an httpx.Response or a Failure, not {type(outcome).__name__}")
        if outcome.status_code == 500 and _error_code(outcome) == NON_FINITE_OUTPUT:
            raise BadAnswer(f"rows it cannot answer: {_service_error(outcome)}")
        if outcome.status_code in PASSING_TROUBLE:
            status, said = outcome.status_code, _service_error(outcome)
            problem = f"{status} ({PASSING_TROUBLE[status]})" + (f": {said}" if said else "")
            raise _Refused(problem, _retry_after(outcome))
        return outcome

    def _pause(self, waited: float, problem: str | None, wait: float) -> float:
        """How long to wait before the next round (never past the give-up point), or TeacherUnavailable."""
        if waited > self.give_up_after_s:
            raise TeacherUnavailable(
                f"teacher service at {self.url} unavailable for {waited:.0f}s (limit teacher.give_up_after_s = "
                f"{self.give_up_after_s:g}s); last error: {problem}"
            )
        wait = min(wait, self.give_up_after_s - waited)
        log.warning("teacher service %s: %s; retrying in %.1fs", self.url, problem, wait)
        return wait

    def _round(self) -> list[int]:
        """Every replica once, starting with the next in turn: calls spread over the replicas."""
        start, self._next_replica = self._next_replica, (self._next_replica + 1) % len(self.urls)
        return [(start + i) % len(self.urls) for i in range(len(self.urls))]

    def _mark(self, replica: int, problem: str | None) -> None:
        if problem is None and replica in self._down:
            self._down.discard(replica)
            log.info("teacher replica %s answers again", self.urls[replica])
        elif problem is not None and replica not in self._down and len(self.urls) > 1:
            self._down.add(replica)
            log.warning("teacher replica %s: %s; using the others", self.urls[replica], problem)

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        detail = _service_error(response) or one_line(response.text, 500)
        raise TeacherRequestError(
            f"teacher service answered {response.status_code}: {detail}", response.status_code, _error_code(response)
        )

    def closed_error(self) -> RuntimeError:
        return RuntimeError(f"the teacher client for {self.url} is closed")


def _check_settings(temperature: float | None, timeout_s: float, give_up_after_s: float) -> None:
    """ValueError for a setting no request could honour (the service checks a temperature again)."""
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number or None (the teacher's own), not {temperature!r}")
    if not timeout_s > 0 or not give_up_after_s >= 0:
        raise ValueError(f"timeout_s must be > 0 and give_up_after_s >= 0, not {timeout_s!r} and {give_up_after_s!r}")


def _error_code(response: httpx.Response) -> str | None:
    """The `code` of the service's JSON error, or None when the body is not one."""
    try:
        body = response.json()
        # the native error nests its code; the Open Inference Protocol's error is a string beside it
        return str(body["code"] if isinstance(body["error"], str) else body["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def _service_error(response: httpx.Response) -> str | None:
    """The service's JSON error (teacher_service/errors.py) as one line, or None when the body is not one."""
    try:
        error = response.json()["error"]
        if isinstance(error, str):
            return one_line(error, 500)
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
