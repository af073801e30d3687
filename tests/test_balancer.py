"""Replicas of one teacher service behind nginx (deploy/nginx.conf, what compose's `balancer` runs), with Debian's
nginx: every replica started from one config claims its own cache folder, adversarial queries are spread,
clean ones stay on one replica and hit its cache, and a replica killed under load costs no request.

Real service processes and a real nginx on loopback ports; a replica dies by kill -9. Where nginx is not
installed (.ci/run installs Debian's nginx-light where it can) the nginx tests are skipped, saying why.
"""

from __future__ import annotations

import http.server
import shutil
import threading

import httpx
import pytest
from conftest import HANG_S, ServerProcess, metric, mnist_teacher, post, random_inputs, write_config

from bench.servers import balancer_conf, nginx_balancer
from shared import codec, protocol
from student_trainer.teacher_client import RemoteTeacher

NGINX = shutil.which("nginx", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)")


def rows_answered(replica: ServerProcess) -> float:
    return metric(httpx.get(replica.base + "/metrics", timeout=HANG_S).text, 'akd_rows_total{teacher="ens"}', 0.0)


def one_config(tmp_path, mnist_members, slots: int = 2):
    """The config every replica is started from, as a scaled compose service's replicas are."""
    teacher = mnist_teacher([(mnist_members["a"], 1.0), (mnist_members["c"], 3.0)])
    return write_config(tmp_path / "teachers.toml", {"ens": teacher}, {"cache_dir": "cache", "cache_slots": slots})


@pytest.fixture
def replicas(tmp_path, mnist_members):
    config = one_config(tmp_path, mnist_members)
    servers = [ServerProcess(config, tmp_path / f"replica-{i}.log") for i in range(2)]
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture
def balancer(replicas, tmp_path):
    server = nginx_balancer("nginx", [r.base for r in replicas], tmp_path / "nginx")
    yield server
    server.stop()


def test_replicas_of_one_config_claim_their_own_cache_folders_and_a_restart_takes_one_back(tmp_path, replicas):
    a, b = replicas
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["replica-0", "replica-1"]
    x = random_inputs(5)
    post(a.base, x, cache="use")
    third = tmp_path / "third.log"
    with pytest.raises(RuntimeError, match="did not start|exited"):
        ServerProcess(tmp_path / "teachers.toml", third)
    assert "raise cache_slots to at least the number of replicas" in third.read_text()
    assert a.stop()  # a clean stop writes its buffered rows
    restarted = ServerProcess(tmp_path / "teachers.toml", tmp_path / "restarted.log")
    try:
        assert "claimed" in (tmp_path / "restarted.log").read_text()
        # the free folder is the one `a` left, rows and all
        assert post(restarted.base, x, cache="use").headers[protocol.HEADER_CACHE_HITS] == "5"
    finally:
        restarted.stop()


def test_a_cache_slot_setting_needs_a_local_folder(tmp_path, mnist_members):
    from shared.configfile import ConfigError
    from teacher_service.config import load_config

    path = write_config(tmp_path / "t.toml", {"ens": mnist_teacher([(mnist_members["a"], 1.0)])}, {"cache_slots": 2})
    with pytest.raises(ConfigError, match="cache_slots needs cache_dir to be a local folder"):
        load_config(path, environ={})


def test_the_balancer_config_lists_every_replica_with_the_files_health_check():
    conf = balancer_conf(["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
    assert "server 127.0.0.1:9001 max_fails=1 fail_timeout=5s;" in conf
    assert "server 127.0.0.1:9002 max_fails=1 fail_timeout=5s;" in conf
    assert "teacher:8000" not in conf


@needs_nginx
def test_adversarial_queries_are_spread_and_clean_ones_stay_on_one_replica_and_hit(replicas, balancer):
    a, b = replicas
    client = RemoteTeacher(balancer.url, "ens", 1.0, give_up_after_s=HANG_S)
    assert client.info().name == "ens"
    x = random_inputs(4)
    for _ in range(6):
        client(x, adversarial=True)  # no affinity header: round-robin
    assert rows_answered(a) > 0 and rows_answered(b) > 0
    assert rows_answered(a) + rows_answered(b) == 24
    before = (rows_answered(a), rows_answered(b))
    clean = random_inputs(8, seed=1)
    first = client(clean)
    hits_before = client.cache_hits
    for _ in range(4):
        assert (client(clean) == first).all()
    grew = [after - was for after, was in zip((rows_answered(a), rows_answered(b)), before, strict=True)]
    assert sorted(grew) == [0, 40], grew  # every clean query on one replica
    assert client.cache_hits - hits_before == 4 * 8  # ... which keeps its rows and hits
    spread = RemoteTeacher(balancer.url, "ens", 1.0, give_up_after_s=HANG_S, affinity=False)
    before = (rows_answered(a), rows_answered(b))
    other = random_inputs(8, seed=2)
    for _ in range(4):
        spread(other)
    grew = [after - was for after, was in zip((rows_answered(a), rows_answered(b)), before, strict=True)]
    assert grew == [16, 16], grew  # affinity off: clean queries spread too ...
    assert spread.cache_hits == 2 * 8  # ... and each replica computes the rows once: 2 misses of 4, not 1


@needs_nginx
def test_a_replica_killed_under_load_costs_no_request(replicas, balancer):
    """Plain httpx clients with no retry of their own: nginx alone must move every query off the dead replica."""
    a, b = replicas
    x = random_inputs(16)
    body = codec.encode_inputs(x)
    expected = post(b.base, x, cache="bypass").content
    statuses: list[int] = []
    wrong: list[int] = []
    served = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=balancer.url, timeout=HANG_S) as http:
            for _ in range(15):
                r = http.post(protocol.SOFT_TARGETS_PATH, params={"teacher": "ens", "cache": "bypass"}, content=body)
                statuses.append(r.status_code)
                if r.status_code == 200 and r.content != expected:
                    wrong.append(len(statuses))
                served.set()

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    served.wait(HANG_S)
    a.kill9()
    for thread in threads:
        thread.join(HANG_S)
    assert statuses == [200] * 90, [s for s in statuses if s != 200]
    assert not wrong
    assert rows_answered(b) > 0


class GatewayWithoutReplicas(http.server.BaseHTTPRequestHandler):
    """What nginx answers when every replica is out: 502. Records the affinity header of each call."""

    affinity: list[str | None] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        GatewayWithoutReplicas.affinity.append(self.headers.get(protocol.HEADER_AFFINITY))
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_client_sets_affinity_on_clean_queries_and_moves_a_502_on(replicas):
    gateway = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatewayWithoutReplicas)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    try:
        bad = f"http://127.0.0.1:{gateway.server_address[1]}"
        client = RemoteTeacher([bad, replicas[0].base], "ens", 1.0, give_up_after_s=HANG_S)
        x = random_inputs(2)
        for adversarial in (False, True):
            client._next_replica = 0  # the 502-answering one first
            assert client(x, adversarial=adversarial).shape == (2, 10)
    finally:
        gateway.shutdown()
        gateway.server_close()
    assert GatewayWithoutReplicas.affinity == ["ens", None]  # clean rows to one replica; adversarial spread
