"""Soft targets for the trainer: from the teacher service over HTTP, or from a local teacher in-process.

Both are a `Teacher`: a callable `teacher(x) -> probs` (B, K), tempered and ensemble-aggregated,
so a training method never knows which one it has.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import httpx
import torch

from shared import codec, protocol
from shared.protocol import CacheMode, TeacherInfo, TeachersResponse

log = logging.getLogger("akd.teacher_client")


class Teacher(Protocol):
    """Where a run's soft targets come from (RemoteTeacher or LocalTeacher)."""

    name: str | None
    temperature: float
    rows_requested: int  # rows asked for so far, how many of them the service's cache answered, and how many went
    cache_hits: int  # up whole (the rest were asked for by key)
    rows_uploaded: int

    def info(self) -> TeacherInfo:
        """What the teacher is (classes, input shape, members); checked against the dataset before training."""

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """Soft targets (B, K) for inputs x (B, C, H, W) in [0, 1], on x's device; `adversarial`: x was made by an
        attack (it picks the service's cache mode)."""

    def close(self) -> None: ...


class TeacherUnavailable(RuntimeError):
    """The service stayed unreachable (or saturated) for longer than the run allows."""


class TeacherRequestError(RuntimeError):
    """The service refused a request (a 4xx): retrying would not help."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# Answers that say "not now" rather than "no": the call goes to the next replica, then is retried with backoff.
PASSING_TROUBLE = {
    502: "bad gateway: a load balancer found no live replica",
    503: "queue full, or shutting down",
    504: "gateway timeout: a load balancer's replica did not answer in time",
}


class RemoteTeacher:
    """POST /soft-targets with connection reuse, timeouts, and retries that ride out a service restart.

    `url` is one service or a list of its replicas (behind no load balancer, or
    several): calls go to them in turn, and a call that a replica refuses
    (connection error, 503, or a load balancer's 502/504) goes to the next one at once. Each call's soft
    targets are exactly one replica's answer, so a lost replica costs no step and
    repeats none. When every replica has failed in a row, the round is retried
    with exponential backoff (honouring Retry-After) until `give_up_after_s` has
    passed since the first failure.
    Clean inputs that are exactly k/255 travel as uint8: 4x smaller, and identical
    bytes from every job, which is what lets the service's cache hit across jobs.
    The service's cache mode depends on what is asked about: `clean_cache` for
    clean inputs (which repeat every epoch), `adversarial_cache` for adversarial
    ones (fresh every step, so `bypass` by default: storing them helps nobody).
    Queries the cache keeps carry X-AKD-Affinity (the teacher's name) unless
    `affinity` is off: a load balancer that hashes it (deploy/nginx.conf) sends them
    all to one replica, where their rows are cached once and hit. Where the service
    offers keys first (a cache), those queries send the rows' keys first and upload
    only the rows it has not cached.
    """

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
        self._down: set[str] = set()  # replicas whose last answer was a refusal: logged once, not on every call
        self.url, self.name, self.temperature = ", ".join(urls), name, temperature
        self.cache_modes = {False: CacheMode(clean_cache), True: CacheMode(adversarial_cache)}
        self.give_up_after_s, self.max_backoff_s = give_up_after_s, max_backoff_s
        self.affinity = affinity
        self.wants_keys_first, self.keys_first = keys_first, False  # used once info() has seen the service offer it
        self.rows_requested = 0
        self.rows_uploaded = 0  # rows sent whole: all of them, but the cached ones where keys first is used
        self.cache_hits = 0

    def info(self) -> TeacherInfo:
        """The served teacher's description; also the start-up check that the service is there, and that every
        replica reachable now serves the same teacher (same members, versions, weights and temperature): soft targets
        must not depend on which replica answered."""
        first = self._send("GET", protocol.TEACHERS_PATH)
        teacher = self._teacher_in(first)
        features = set(TeachersResponse.model_validate(first.json()).features)
        for replica in self._replicas:
            try:
                answer = self._checked(replica.get(protocol.TEACHERS_PATH))
                other = self._teacher_in(answer)
            except (httpx.TransportError, TeacherRequestError) as exc:
                log.warning("teacher replica %s not checked at start: %s", replica.base_url, exc)
                continue
            features &= set(TeachersResponse.model_validate(answer.json()).features)
            if other != teacher:
                raise TeacherRequestError(
                    f"teacher replicas differ: {replica.base_url} serves {other.name!r} with members "
                    f"{[m.version for m in other.members]}, another {[m.version for m in teacher.members]}; "
                    "every url in teacher.url must serve the same teacher config"
                )
        self.keys_first = self.wants_keys_first and protocol.KEYS_FIRST in features
        return teacher

    def _teacher_in(self, response: httpx.Response) -> TeacherInfo:
        teachers = TeachersResponse.model_validate(response.json()).teachers
        if self.name is None and len(teachers) == 1:
            self.name = teachers[0].name
        match = [t for t in teachers if t.name == self.name]
        if not match:
            raise TeacherRequestError(
                f"{response.url} serves {[t.name for t in teachers]}, not {self.name!r}: set teacher.name"
            )
        return match[0]

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        rows = codec.to_transport(x.detach().cpu())
        mode = self.cache_modes[adversarial]
        params = {"temperature": self.temperature, "outputs": "probs", "cache": mode.value}
        if self.name:
            params["teacher"] = self.name
        headers = {}
        if self.affinity and mode is not CacheMode.bypass:  # rows worth caching: one replica behind a balancer
            headers[protocol.HEADER_AFFINITY] = self.name or "default"
        probs = self._by_keys_first(rows, params, headers) if self.keys_first and mode is CacheMode.use else None
        if probs is None:
            probs = self._upload(rows, params, headers)
        self.rows_requested += len(x)
        return probs.to(x.device)

    def _by_keys_first(self, rows: torch.Tensor, params: dict, headers: dict) -> torch.Tensor | None:
        """The cached rows' soft targets asked for by key (16 bytes a row), then only the other rows uploaded.
        None when the service turns the path down (then it is not asked again)."""
        query = {k: v for k, v in params.items() if k != "cache"}
        body = codec.encode_keys(rows)
        try:
            response = self._send("POST", protocol.SOFT_TARGET_KEYS_PATH, params=query, headers=headers, content=body)
        except TeacherRequestError as exc:
            if exc.status != 404:
                raise
            log.info("teacher service %s offers no keys-first path (%s): uploading every row", self.url, exc)
            self.keys_first = False
            return None
        answer = codec.decode(response.content)
        found = answer[protocol.FOUND_KEY].bool()
        self.cache_hits += int(found.sum())
        if found.all():
            return answer["probs"]
        probs = torch.empty(len(rows), answer["probs"].shape[1])
        probs[found] = answer["probs"]
        probs[~found] = self._upload(rows[~found], params, headers)
        return probs

    def _upload(self, rows: torch.Tensor, params: dict, headers: dict) -> torch.Tensor:
        body = codec.encode_inputs(rows)
        response = self._send("POST", protocol.SOFT_TARGETS_PATH, params=params, headers=headers, content=body)
        self.rows_uploaded += len(rows)
        self.cache_hits += int(response.headers.get(protocol.HEADER_CACHE_HITS, 0))
        return codec.decode(response.content)["probs"]

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        first_failure, backoff = None, 0.1
        while True:
            problem, waits = None, []
            for replica in self._round():
                try:
                    response = replica.request(method, path, **kwargs)
                    if response.status_code not in PASSING_TROUBLE:
                        self._mark(replica, None)
                        return self._checked(response)
                    problem = f"{response.status_code} ({PASSING_TROUBLE[response.status_code]})"
                    waits.append(_retry_after(response, backoff))
                except httpx.TransportError as exc:  # refused, reset, timed out: the service may be restarting
                    problem = f"{type(exc).__name__}: {exc}"
                    waits.append(backoff)
                self._mark(replica, problem)
            wait = min(waits)
            first_failure = first_failure or time.monotonic()
            waited = time.monotonic() - first_failure
            if waited > self.give_up_after_s:
                raise TeacherUnavailable(
                    f"teacher service at {self.url} unavailable for {waited:.0f}s (limit teacher.give_up_after_s = "
                    f"{self.give_up_after_s:g}s); last error: {problem}"
                )
            log.warning("teacher service %s: %s; retrying in %.1fs", self.url, problem, wait)
            time.sleep(min(wait, self.max_backoff_s))
            backoff = min(backoff * 2, self.max_backoff_s)

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
        try:
            error = response.json()["error"]
            detail = f"{error['message']} (expected {error.get('expected')}, got {error.get('received')})"
        except (ValueError, KeyError, TypeError):
            detail = response.text[:500]
        raise TeacherRequestError(f"teacher service answered {response.status_code}: {detail}", response.status_code)

    def close(self) -> None:
        for replica in self._replicas:
            replica.close()


class LocalTeacher:
    """The same teacher, in this process: for runs without a service, and the reference for tests.

    A thin shell over the service's in-process entry (teacher_service.local), which runs the members through the
    service's own forward path and ensemble formula, so both give the same numbers on one device.
    """

    def __init__(self, config_path: str | Path, name: str | None, temperature: float | None, device: torch.device):
        """`temperature=None`: the teacher's own, as the service uses when a request names none."""
        from teacher_service.local import InProcessTeacher

        self._teacher = InProcessTeacher(config_path, name, device)
        self.name = self._teacher.name
        self.temperature = self._teacher.default_temperature if temperature is None else temperature
        self.rows_requested = 0
        self.cache_hits = 0
        self.rows_uploaded = 0  # nothing leaves the process

    def info(self) -> TeacherInfo:
        return self._teacher.info()

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """`adversarial` only matters to a cache, which this has none of."""
        self.rows_requested += len(x)
        return self._teacher.probs(x, self.temperature).to(x.device)

    def close(self) -> None:
        pass


def _retry_after(response: httpx.Response, default: float) -> float:
    """The 503's Retry-After in seconds, or `default` when it is missing or not a number of seconds."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default
