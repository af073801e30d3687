"""TeacherClient: the teacher service's client for a training loop, on httpx.Client; numpy in and out, or torch.

    teacher = TeacherClient("http://127.0.0.1:8000", "mnist", temperature=4.0)
    probs = teacher.soft_targets(x)

Everything a call means (replicas, failover, retries, keys first, checks, counters) is `ClientCore`'s; this module
sends its requests and waits out its pauses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from shared.client.arrays import like_input, wire_rows
from shared.client.core import ClientCore, Failure, Outcome, Send, Steps, Wait
from shared.client.listing import TeacherInfo
from shared.client.query_thread import Collected, Pending, QueryThread, settled

T = TypeVar("T")


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


class TeacherClient(ClientCore):
    """Soft targets from a teacher service (or its replicas), with connection reuse, a deadline on each request, and
    retries that ride out a service restart; see `ClientCore` for the arguments.

    `soft_targets(x)`: x a numpy array (B, C, H, W) in [0, 1] (or uint8 0..255) gives a float32 numpy array (B, K);
    a torch tensor gives a float32 torch tensor on x's device. Clean inputs that are exactly k/255 travel as uint8.
    `submit(x)` asks now and returns a `Pending` whose result() is what soft_targets(x) would give: the query runs
    whole on the client's query thread (one a client, answering in order) while the caller computes. A call runs on
    the caller's thread when no query is in flight, behind them when some are. One caller thread at a time: for
    concurrent calls, use one client each, or AsyncTeacherClient.
    """

    def _connect(self) -> None:
        self._replicas = [httpx.Client(base_url=u, headers=self.headers, timeout=self.timeout_s) for u in self.urls]
        self._courier = _Courier()
        # submit()'s queries; once close() is called, no query sends again and a retry's wait ends at once
        self._queries, self._closing = QueryThread("akd-teacher-queries"), threading.Event()

    def info(self) -> TeacherInfo:
        """The served teacher (`ClientCore.info_steps`): checks every replica serves it, and whether keys first is
        offered. Optional: the first call learns the teacher otherwise, but without keys first."""
        return self._run(self.info_steps())

    def soft_targets(self, x: Any, *, adversarial: bool = False) -> Any:
        """The soft targets (B, K) for inputs x (B, C, H, W); `adversarial`: x was made by an attack (it picks the
        cache mode). Raises TeacherUnavailable, TeacherRequestError or TeacherAnswerError rather than return rows
        that are not probabilities."""
        if self._queries.busy():
            return self.submit(x, adversarial=adversarial).result()
        rows, device = wire_rows(x)
        return like_input(self._run(self.query_steps(rows, adversarial)), device)

    def submit(self, x: Any, *, adversarial: bool = False) -> Pending:
        """`soft_targets(x, adversarial=...)`, asked for now and answered on the query thread, queries in the order
        submitted: `.result()` gives what the call gives and raises what it raises. x is copied (in its wire form)
        before this returns, so the caller may change it at once."""
        rows, device = wire_rows(x, own=True)
        query = lambda: self._run(self.query_steps(rows, adversarial))  # noqa: E731
        # closed: refused at once, here (a thread started now would outlive the client)
        return Collected(settled(query) if self._closing.is_set() else self._queries.submit(query), device)

    def _run(self, steps: Steps[T]) -> T:
        """The call's steps, run: each Send on the courier, each Wait on this thread (cut short by close())."""
        outcome: Outcome | None = None
        while True:
            try:
                step = steps.send(outcome)
            except StopIteration as end:
                return end.value
            if isinstance(step, Wait):
                self._closing.wait(step.seconds)
                outcome = None
            else:
                outcome = self._request(step)

    def _request(self, send: Send) -> Outcome:
        """One request to one replica, complete within timeout_s, or the Failure it came to."""
        replica = self._replicas[send.replica]
        call = lambda: replica.request(  # noqa: E731
            send.method, send.path, params=send.params, headers=send.headers, content=send.content
        )
        try:
            return self._courier.run(call, self.timeout_s)
        except _Overdue:
            return Failure.overdue(self.timeout_s)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            return Failure.of(exc)

    def close(self) -> None:
        """Ends the client without waiting for a query in flight (one asked ahead for a batch that never came, or one
        retrying a service that is down): its retries stop, it ends once its request does (within timeout_s), and a
        query still queued never sends. The connections are closed by the thread that uses them, once it is done."""
        if self._closing.is_set():
            return
        self.closed = True
        self._closing.set()
        if self._queries.busy():
            self._queries.submit(self._shut)
        else:
            self._shut()
        self._queries.close()

    def _shut(self) -> None:
        self._courier.close()
        self.close_region()
        for replica in self._replicas:
            replica.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
