"""The trainer's teacher client against a real service: retries, restarts, clear errors, transport."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import (
    HANG_S,
    ServerProcess,
    free_port,
    live_server,
    mnist_teacher,
    random_inputs,
    reference_member_logits,
    write_config,
)

from student_trainer.teacher_client import LocalTeacher, RemoteTeacher, TeacherRequestError, TeacherUnavailable
from teacher_service.ensemble import aggregate_probs, normalised_weights


@pytest.fixture
def ensemble_config(tmp_path, mnist_members):
    members = [(mnist_members["a"], 1.0), (mnist_members["c"], 3.0)]
    return write_config(
        tmp_path / "t.toml", {"ens": mnist_teacher(members, temperature=9.0)}, {"cache": {"dir": "cache"}}
    ), members


def test_remote_and_local_teachers_give_the_ensemble_formula(ensemble_config):
    config, members = ensemble_config
    x = random_inputs(6)
    expected = aggregate_probs(reference_member_logits([p for p, _ in members], x), normalised_weights([1.0, 3.0]), 2.0)
    local = LocalTeacher(config, None, temperature=2.0, device=torch.device("cpu"))
    torch.testing.assert_close(local(x), expected, rtol=1e-5, atol=1e-6)
    with live_server(config) as (base, _):
        remote = RemoteTeacher(base, None, temperature=2.0)
        assert remote.info().name == "ens"
        # the run's temperature, not the config's 9
        torch.testing.assert_close(remote(x), expected, rtol=1e-5, atol=1e-6)
        remote(x)
        assert (remote.rows_requested, remote.cache_hits) == (12, 6)
        remote.close()


def test_clean_inputs_travel_as_uint8_and_hit_the_cache_across_jobs(ensemble_config):
    config, _ = ensemble_config
    # what the data loader produces
    clean = random_inputs(5, dtype=torch.uint8).float() / 255
    with live_server(config) as (base, app):
        job_a, job_b = RemoteTeacher(base, "ens", 1.0), RemoteTeacher(base, "ens", 1.0)
        job_a(clean)
        job_b(clean)
        assert job_b.cache_hits == 5
        # not k/255: sent as float32, still answered
        adversarial = (clean + 0.003).clamp(0, 1)
        assert job_a(adversarial).shape == (5, 10)
        versions = [ns.version for ns in app.state.service.cache.namespaces]
        # rows were cached under the members' versions
        assert versions


def test_cache_bypass_neither_reads_nor_stores(ensemble_config):
    """`teacher.cache = "bypass"`: for inputs that never repeat (fresh adversarial examples)."""
    config, _ = ensemble_config
    x = random_inputs(4, dtype=torch.uint8).float() / 255
    with live_server(config) as (base, app):
        bypass = RemoteTeacher(base, "ens", 1.0, clean_cache="bypass")
        first, second = bypass(x), bypass(x)
        assert bypass.cache_hits == 0
        assert sum(ns.rows for ns in app.state.service.cache.namespaces) == 0
        using = RemoteTeacher(base, "ens", 1.0)
        torch.testing.assert_close(using(x), first)
        torch.testing.assert_close(second, first)
        assert using.cache_hits == 0 and using(x) is not None and using.cache_hits == 4


def test_adversarial_queries_bypass_the_cache_and_clean_ones_use_it_by_default(ensemble_config):
    """AKD's fresh adversarial examples never repeat: storing them would fill the cache with rows nobody reads."""
    config, _ = ensemble_config
    x = random_inputs(4, dtype=torch.uint8).float() / 255
    with live_server(config) as (base, app):
        rows = lambda: sum(ns.rows for ns in app.state.service.cache.namespaces)  # noqa: E731
        client = RemoteTeacher(base, "ens", 1.0)
        adversarial = client(x, adversarial=True)
        assert rows() == 0 and client.cache_hits == 0
        # same answer either way; now stored
        torch.testing.assert_close(client(x), adversarial)
        stored = rows()
        assert stored > 0 and client(x, adversarial=True) is not None and client.cache_hits == 0
        assert rows() == stored
        # the config can say otherwise
        storing = RemoteTeacher(base, "ens", 1.0, adversarial_cache="use")
        storing(x, adversarial=True)
        assert storing.cache_hits == 4


def test_client_rides_out_a_service_restart(tmp_path, ensemble_config):
    config, _ = ensemble_config
    # both processes use it, so the client sees one address
    port = free_port()
    first = ServerProcess(config, tmp_path / "a.log", port=port)
    client = RemoteTeacher(f"http://127.0.0.1:{port}", "ens", 1.0, give_up_after_s=HANG_S)
    x = random_inputs(3)
    before = client(x)
    first.stop()
    restarted = {}

    def restart_later():
        time.sleep(1.0)
        restarted["server"] = ServerProcess(config, tmp_path / "b.log", port=port)

    thread = threading.Thread(target=restart_later)
    thread.start()
    try:
        # sent while nothing listens: retried until the new process answers
        after = client(x)
    finally:
        thread.join()
        restarted["server"].stop()
    torch.testing.assert_close(after, before)


def test_client_gives_up_with_a_clear_error():
    client = RemoteTeacher(f"http://127.0.0.1:{free_port()}", "ens", 1.0, give_up_after_s=0.5)
    started = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=r"unavailable for \d+s \(limit teacher.give_up_after_s = 0.5s\)"):
        client(random_inputs(2))
    # it stopped by itself rather than hanging
    assert time.monotonic() - started < HANG_S


def test_refusals_are_not_retried_and_say_why(ensemble_config):
    config, _ = ensemble_config
    with live_server(config) as (base, _):
        with pytest.raises(TeacherRequestError, match=r"422.*\(B, 1, 28, 28\)"):
            RemoteTeacher(base, "ens", 1.0)(torch.rand(2, 3, 28, 28))
        with pytest.raises(TeacherRequestError, match="not 'nope'"):
            RemoteTeacher(base, "nope", 1.0).info()


def client_threads(since: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in set(threading.enumerate()) - since if t.name.startswith("akd-teacher-")]


def test_submit_answers_and_fails_exactly_as_a_call_does(ensemble_config):
    """`submit(x).result()` is the call's answer, bit for bit, for either teacher and either kind of input, even when
    x changes once asked; what a query raises on the query thread, result() raises as the call does."""
    config, _ = ensemble_config
    clean = random_inputs(5, dtype=torch.uint8).float() / 255
    cases = [(clean, False), ((clean + 0.003).clamp(0, 1), True)]
    local = LocalTeacher(config, None, temperature=2.0, device=torch.device("cpu"))
    with live_server(config) as (base, _):
        remote = RemoteTeacher(base, None, temperature=2.0)
        remote.info()
        before = set(threading.enumerate())
        for teacher in (remote, local):
            for x, adversarial in cases:
                called, asked = teacher(x, adversarial=adversarial), x.clone()
                pending = teacher.submit(asked, adversarial=adversarial)
                # the caller's to change at once: the query has its own copy
                asked.add_(0.5)
                assert torch.equal(pending.result(), called)
        assert [t.name for t in client_threads(before)] == ["akd-teacher-queries"]
        # counted as calls are
        assert (remote.rows_requested, remote.cache_hits, remote.rows_uploaded) == (20, 5, 15)
        wrong_shape = torch.rand(2, 3, 28, 28)
        with pytest.raises(TeacherRequestError) as called:
            remote(wrong_shape)
        with pytest.raises(TeacherRequestError) as collected:
            remote.submit(wrong_shape).result()
        assert (type(collected.value), str(collected.value), collected.value.status) == (
            type(called.value),
            str(called.value),
            called.value.status,
        )
        remote.close()


def test_close_neither_waits_for_nor_leaks_a_query_asked_ahead(caplog):
    """A query asked ahead for a batch that never comes, retrying a service that is down (for up to HANG_S), and one
    queued behind it: close() returns without them, the retries stop, the queued one never sends, and the client's
    threads end."""
    client = RemoteTeacher(f"http://127.0.0.1:{free_port()}", "ens", 1.0, give_up_after_s=HANG_S)
    before = set(threading.enumerate())
    with caplog.at_level("WARNING", logger="akd.teacher_client"):
        retrying, queued = client.submit(random_inputs(2)), client.submit(random_inputs(3))
        deadline = time.monotonic() + HANG_S
        while not any("retrying in" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert "akd-teacher-queries" in {t.name for t in client_threads(before)}
    client.close()
    for pending in (retrying, queued):
        with pytest.raises(RuntimeError, match="teacher client for .* is closed"):
            pending.result()
    for thread in client_threads(before):
        thread.join(timeout=HANG_S)
        assert not thread.is_alive(), thread
    # nothing is sent after close, and no thread starts for it
    with pytest.raises(RuntimeError, match="is closed"):
        client.submit(random_inputs(1)).result()
    assert client_threads(before) == []
