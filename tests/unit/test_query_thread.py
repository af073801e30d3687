"""A teacher client's query thread (shared/client/query_thread.py): calls in order, exceptions handed back as they
were raised, queued calls cancelled, and the thread ending with its client."""

from __future__ import annotations

import gc
import threading

import pytest
from conftest import HANG_S

from shared.client.query_thread import QueryThread
from student_trainer.teacher_client import TeacherUnavailable


def test_what_a_query_raises_on_the_thread_comes_out_of_result_unchanged():
    worker = QueryThread("akd-test-queries")
    raised = TeacherUnavailable("teacher service at http://127.0.0.1:1 unavailable for 1s")
    ran_on = []

    def fail():
        ran_on.append(threading.current_thread().name)
        raise raised

    with pytest.raises(TeacherUnavailable) as caught:
        worker.submit(fail).result()
    assert caught.value is raised and ran_on == ["akd-test-queries"]
    worker.close()


def test_calls_run_in_order_and_a_cancelled_one_never_runs():
    worker, ran, gate = QueryThread("akd-test-queries"), [], threading.Event()
    first = worker.submit(lambda: gate.wait(HANG_S) and ran.append(1))
    second, third = worker.submit(lambda: ran.append(2)), worker.submit(lambda: ran.append(3))
    assert worker.busy() and second.cancel()
    gate.set()
    third.result(timeout=HANG_S)
    assert ran == [1, 3] and first.done() and not worker.busy()
    worker.close()


class Client:
    """What owns a query thread, as a teacher client does."""

    def __init__(self) -> None:
        self.queries = QueryThread("akd-test-dropped")

    def query(self) -> Client:
        return self


def test_a_client_dropped_without_close_ends_its_thread():
    """A finished call (here a method of the client, returning it) holds nothing of its client: collecting the client
    ends the thread."""
    client = Client()
    assert client.queries.submit(client.query).result(timeout=HANG_S) is client
    [thread] = [t for t in threading.enumerate() if t.name == "akd-test-dropped"]
    del client
    gc.collect()
    thread.join(timeout=HANG_S)
    assert not thread.is_alive()
