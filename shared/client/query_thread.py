"""A teacher client's query thread: queries answered in order while the caller computes, and what the caller holds
meanwhile (a `Pending` answer).

The service's client (`TeacherClient.submit`, and the trainer's RemoteTeacher over it) hands each query whole to its
one query thread, so that a training step can ask the teacher early and collect the answer where its loss needs it:
the student's work in between hides the round trip. One thread a client, one query at a time: the client's state (its
counters, its replica turn, its connections) is only ever touched by one thread at once, and answers come in the order
asked. The same thread class carries the client's requests (its courier), so that a call can stop waiting at a
deadline.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from shared.client.arrays import like_input

T = TypeVar("T")


class Pending(Protocol):
    """An answer asked for and not yet collected (a `concurrent.futures.Future` is one)."""

    def result(self) -> Any:
        """The answer, once there is one (waiting for it if need be); or what asking raised, unchanged."""

    def cancel(self) -> bool:
        """Never send the query, if it has not started (True); one under way runs to its end, and nobody reads it."""


class QueryThread:
    """Runs the calls handed to it one at a time, in order, on a daemon thread of its own.

    The thread is started by the first call and persists across calls (handing a call to a running thread costs far
    less than starting one). A forked child, which has none of its parent's threads, starts its own. A client dropped
    without close() still ends its thread: a finished call keeps no reference to it, and its finaliser stops the thread.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue | None = None
        self._pid = 0
        # handed to this process's thread and maybe not finished: what busy() looks at
        self._handed: list[Future] = []

    def submit(self, call: Callable[[], T]) -> Future:
        """A future of call(): its result, or what it raised, unchanged; cancelled before it starts, it never runs."""
        if self._pid != os.getpid():
            # a forked child: its parent's calls never finish here
            self._jobs, self._handed = None, []
        if self._jobs is None:
            self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(target=_serve, args=(self._jobs,), name=self._name, daemon=True).start()
            weakref.finalize(self, self._jobs.put, None)
        done: Future = Future()
        self._jobs.put((call, done))
        self._handed = [f for f in self._handed if not f.done()] + [done]
        return done

    def busy(self) -> bool:
        """Whether a call handed over (and not cancelled) is yet to finish: the thread may be using what calls share."""
        return self._pid == os.getpid() and any(not f.done() for f in self._handed)

    def close(self) -> None:
        """The thread ends once the calls already handed to it are done (or cancelled)."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None


def _serve(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        call, done = job
        # a finished call keeps nothing alive while the thread waits for the next: not its client, nor its answer
        del job
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(call())
            except BaseException as exc:
                # the caller's, from result(), as it was raised
                done.set_exception(exc)
        del call, done


class Collected:
    """A future's soft targets (numpy, float32), collected as the inputs were asked: a torch tensor on `device`, where
    they were a torch tensor there, else the array itself (the query thread does no device work): a `Pending`."""

    def __init__(self, future: Future, device: Any | None) -> None:
        self._future, self._device = future, device

    def result(self) -> Any:
        return like_input(self._future.result(), self._device)

    def cancel(self) -> bool:
        return self._future.cancel()


def settled(call: Callable[[], T]) -> Future:
    """call() run now, on this thread, as a future that is already done: its result, or the Exception it raised."""
    done: Future = Future()
    try:
        done.set_result(call())
    except Exception as exc:
        done.set_exception(exc)
    return done
