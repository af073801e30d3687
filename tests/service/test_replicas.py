"""A trainer against several replicas of one teacher service (`teacher.url` a list): calls spread over them, a dead
replica is failed over without losing or repeating a step, and replicas serving different teachers are refused.
Real service processes on loopback ports; a replica dies by kill -9."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import HANG_S, REPO, ServerProcess, metric, mnist_teacher, random_inputs, write_config

from student_trainer.teacher_client import RemoteTeacher, TeacherRequestError


def replica_configs(tmp_path, members) -> list:
    """Two replicas of one teacher, each with its own cache folder (one writer per cache)."""
    return [
        write_config(tmp_path / f"{name}.toml", {"ens": mnist_teacher(members)}, {"cache": {"dir": f"cache-{name}"}})
        for name in ("a", "b")
    ]


def rows_answered(replica: ServerProcess) -> float:
    return metric(httpx.get(replica.base + "/metrics", timeout=HANG_S).text, 'akd_rows_total{teacher="ens"}', 0.0)


@pytest.fixture
def replicas(tmp_path, mnist_members):
    members = [(mnist_members["a"], 1.0), (mnist_members["c"], 3.0)]
    servers = [
        ServerProcess(config, tmp_path / f"{i}.log") for i, config in enumerate(replica_configs(tmp_path, members))
    ]
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.stop()


def test_calls_spread_over_the_replicas_and_fail_over_when_one_dies(replicas):
    a, b = replicas
    # one request per call (keys first would add a keys request for these cached rows)
    client = RemoteTeacher([a.base, b.base], "ens", 1.0, give_up_after_s=HANG_S, keys_first=False)
    client.info()
    x = random_inputs(3)
    answers = [client(x) for _ in range(4)]
    # two calls of 3 rows each
    assert rows_answered(a) == rows_answered(b) == 6
    a.kill9()
    # every call answered once, by the live replica
    answers += [client(x) for _ in range(4)]
    assert rows_answered(b) == 6 + 4 * 3
    assert client.rows_requested == 8 * 3
    for answer in answers[1:]:
        torch.testing.assert_close(answer, answers[0])


def test_replicas_serving_different_teachers_are_refused(tmp_path, mnist_members):
    same = replica_configs(tmp_path, [(mnist_members["a"], 1.0)])
    other = write_config(tmp_path / "other.toml", {"ens": mnist_teacher([(mnist_members["c"], 1.0)])}, {})
    servers = [ServerProcess(same[0], tmp_path / "a.log"), ServerProcess(other, tmp_path / "o.log")]
    try:
        with pytest.raises(TeacherRequestError, match="teacher replicas differ.*same teacher config"):
            RemoteTeacher([s.base for s in servers], "ens", 1.0).info()
    finally:
        for server in servers:
            server.stop()


def test_a_student_finishes_every_step_when_a_replica_dies_mid_training(replicas, tmp_path):
    a, b = replicas
    out = tmp_path / "akd"
    sets = [
        *("limit_train=800", "val_size=300", "epochs=3", "batch_size=64", "attack.steps=3", "lr=0.05"),
        *(f"out_dir={out}", "method=akd", "alpha=0.5", "teacher.name=ens", f'teacher.url=["{a.base}", "{b.base}"]'),
        f"teacher.give_up_after_s={HANG_S}",
    ]
    args = [arg for item in sets for arg in ("--set", item)]
    trainer = subprocess.Popen(
        [sys.executable, "-m", "student_trainer", "train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + HANG_S
    while not (metrics.exists() and metrics.read_text().strip()) and trainer.poll() is None:
        assert time.monotonic() < deadline, "the first epoch never ended"
        time.sleep(0.05)
    # after the first epoch, with two to go
    a.kill9()
    log, _ = trainer.communicate(timeout=HANG_S)
    assert trainer.returncode == 0, log
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["epoch"] for m in epochs] == [1, 2, 3]
    # no step lost, none asked twice
    assert [m["teacher_rows"] for m in epochs] == [800, 800, 800]
    assert f"teacher replica {a.base}" in log and "using the others" in log


@pytest.mark.parametrize("url", ['["ftp://teacher:8000"]', "[]", '"teacher:8000"'])
def test_teacher_urls_must_be_http_addresses(url):
    from shared.configfile import ConfigError
    from student_trainer.config import load_train_config

    with pytest.raises(ConfigError, match=r"teacher\.url|url"):
        load_train_config(sets=["method=akd", "alpha=0.5", f"teacher.url={url}"])
