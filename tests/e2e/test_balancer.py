"""Replicas of one teacher service behind nginx (deploy/nginx.conf, what compose's `balancer` runs), with Debian's
nginx: every replica started from one config claims its own cache folder, adversarial queries are spread,
clean ones stay on one replica and hit its cache, a replica killed under load costs the trainer's client no request,
nginx holds no body a replica has not accepted (token, size, whole-body deadline: the replica's own checks), a full
queue's 503 reaches the client and takes no replica out, and nginx's limits equal or tighten the service's, its own
refusals in the service's JSON error shape.

Real service processes and a real nginx on loopback ports; a replica dies by kill -9. Where nginx is not
installed (.ci/run installs Debian's nginx-light where it can) the nginx tests are skipped, saying why.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import os
import re
import select
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    REPO,
    ServerProcess,
    closed_by_peer,
    metric,
    mnist_teacher,
    post,
    random_inputs,
    raw_connect,
    raw_head,
    raw_response,
    write_config,
)

from bench.servers import balancer_conf, nginx_balancer, process_tree
from shared import codec, protocol
from shared.protocol import ErrorBody, ErrorDetail
from student_trainer.teacher_client import RemoteTeacher
from teacher_service.config import ServerConfig

NGINX = shutil.which("nginx", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)")


def rows_answered(replica: ServerProcess) -> float:
    return metric(httpx.get(replica.base + "/metrics", timeout=HANG_S).text, 'akd_rows_total{teacher="ens"}', 0.0)


def one_config(tmp_path, mnist_members, slots: int = 2, **server):
    """The config every replica is started from, as a scaled compose service's replicas are."""
    teacher = mnist_teacher([(mnist_members["a"], 1.0), (mnist_members["c"], 3.0)])
    return write_config(
        tmp_path / "teachers.toml", {"ens": teacher}, {"cache": {"dir": "cache", "slots": slots}, **server}
    )


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


TOKEN = "balancer-test-token"


@contextlib.contextmanager
def pool(tmp_path, mnist_members, **server):
    """Two replicas of one config with these [server] settings, behind deploy/nginx.conf."""
    config = one_config(tmp_path, mnist_members, **server)
    servers = [ServerProcess(config, tmp_path / f"replica-{i}.log") for i in range(2)]
    balancer = None
    try:
        balancer = nginx_balancer("nginx", [r.base for r in servers], tmp_path / "nginx")
        yield servers, balancer
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in servers:
            if replica.proc.poll() is None:
                replica.stop()


@pytest.fixture
def locked(tmp_path, mnist_members):
    """Replicas that need a token and take a whole body within 2 s of its head (the service's timeouts.body_s)."""
    with pool(tmp_path, mnist_members, token=TOKEN, timeouts={"body_s": 2.0}) as replicas_and_balancer:
        yield replicas_and_balancer


@pytest.fixture
def busy(tmp_path, mnist_members):
    """Replicas whose queue holds one 16-row query: a second one, while the first waits, is refused (503)."""
    with pool(tmp_path, mnist_members, limits={"queue_rows": 16}) as replicas_and_balancer:
        yield replicas_and_balancer


def test_replicas_of_one_config_claim_their_own_cache_folders_and_a_restart_takes_one_back(tmp_path, replicas):
    a, b = replicas
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["replica-0", "replica-1"]
    x = random_inputs(5)
    post(a.base, x, cache="use")
    third = tmp_path / "third.log"
    with pytest.raises(RuntimeError, match="did not start|exited"):
        ServerProcess(tmp_path / "teachers.toml", third)
    assert "raise [server.cache] slots to at least the number of replicas" in third.read_text()
    # a clean stop writes its buffered rows
    assert a.stop()
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

    path = write_config(
        tmp_path / "t.toml", {"ens": mnist_teacher([(mnist_members["a"], 1.0)])}, {"cache": {"slots": 2}}
    )
    with pytest.raises(ConfigError, match="server.cache: slots needs dir to be a local folder"):
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
        # no affinity header: round-robin
        client(x, adversarial=True)
    assert rows_answered(a) > 0 and rows_answered(b) > 0
    assert rows_answered(a) + rows_answered(b) == 24
    before = (rows_answered(a), rows_answered(b))
    clean = random_inputs(8, seed=1)
    first = client(clean)
    hits_before = client.cache_hits
    for _ in range(4):
        # cache hits: the stored rows, bit for bit (not recomputed)
        assert (client(clean) == first).all()
    grew = [after - was for after, was in zip((rows_answered(a), rows_answered(b)), before, strict=True)]
    # every clean query on one replica
    assert sorted(grew) == [0, 40], grew
    # ... which keeps its rows and hits
    assert client.cache_hits - hits_before == 4 * 8
    spread = RemoteTeacher(balancer.url, "ens", 1.0, give_up_after_s=HANG_S, affinity=False)
    before = (rows_answered(a), rows_answered(b))
    other = random_inputs(8, seed=2)
    for _ in range(4):
        spread(other)
    grew = [after - was for after, was in zip((rows_answered(a), rows_answered(b)), before, strict=True)]
    # affinity off: clean queries spread too ...
    assert grew == [16, 16], grew
    # ... and each replica computes the rows once: 2 misses of 4, not 1
    assert spread.cache_hits == 2 * 8


@needs_nginx
def test_a_replica_killed_under_load_costs_no_request(replicas, balancer):
    """The trainer's client through nginx, a replica killed under its load: every call is answered, within float32
    tolerance of the rows' lone computation. nginx streams bodies (deploy/nginx.conf), so the queries the dead replica
    held are answered 502, which the client sends again; nginx alone moves every query that starts after the kill."""
    a, b = replicas
    x = random_inputs(16)
    expected = RemoteTeacher(b.base, "ens", 1.0, timeout_s=HANG_S, give_up_after_s=HANG_S)(x, adversarial=True)
    answers: list[torch.Tensor] = []
    failures: list[BaseException] = []
    served = threading.Event()

    def client() -> None:
        teacher = RemoteTeacher(balancer.url, "ens", 1.0, timeout_s=HANG_S, give_up_after_s=HANG_S)
        try:
            for _ in range(15):
                # adversarial: cache=bypass, no affinity (spread)
                answers.append(teacher(x, adversarial=True))
                served.set()
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            failures.append(exc)
            served.set()
        finally:
            teacher.close()

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    served.wait(HANG_S)
    a.kill9()
    for thread in threads:
        thread.join(HANG_S)
    assert not failures, failures
    assert len(answers) == 90
    for answer in answers:
        # rows batched with other clients' rows: equal to their lone computation within float32 tolerance, not bit
        # for bit (the kernels a CPU picks depend on batch size and instruction set)
        torch.testing.assert_close(answer, expected)
    assert rows_answered(b) > 0
    # no retry of its own: nginx's doing alone
    with httpx.Client(base_url=balancer.url, timeout=HANG_S) as http:
        after = [
            http.post(
                protocol.SOFT_TARGETS_PATH,
                params={"teacher": "ens", "cache": "bypass"},
                content=codec.encode_inputs(x),
            ).status_code
            for _ in range(10)
        ]
    assert after == [200] * 10, after


class GatewayWithoutReplicas(http.server.BaseHTTPRequestHandler):
    """What nginx answers when every replica is out: 502. Records the affinity header of each call."""

    affinity: list[str | None] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        GatewayWithoutReplicas.affinity.append(self.headers.get(protocol.HEADER_AFFINITY))
        self.do_GET()

    def do_GET(self) -> None:
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
        # as a run starts: the teacher it will hold every answer to
        client.info()
        x = random_inputs(2)
        for adversarial in (False, True):
            # the 502-answering one first
            client.client._next_replica = 0
            assert client(x, adversarial=adversarial).shape == (2, 10)
    finally:
        gateway.shutdown()
        gateway.server_close()
    # clean rows to one replica; adversarial spread
    assert GatewayWithoutReplicas.affinity == ["ens", None]


# ------------------------------------------------------------------ nginx's limits against the service's


NGINX_CONF = REPO / "deploy" / "nginx.conf"
# the service's [server] defaults (teacher_service/config.py), what a replica runs with
SERVICE = ServerConfig()


def conf_block(text: str, opening: str) -> str:
    """The body of the top-level block that starts with `opening` (`upstream teacher`, `server`)."""
    match = re.search(rf"^{re.escape(opening)} \{{\n(.*?)^\}}", text, re.M | re.S)
    assert match, f"no `{opening} {{ ... }}` block in {NGINX_CONF}"
    return match.group(1)


def directives(block: str) -> dict[str, str]:
    """`name value;` lines at the block's own level (nested locations and comments left out), by name (the last)."""
    top = re.sub(r"^\s+location [^{]*\{.*?^\s+\}", "", block, flags=re.M | re.S)
    return dict(re.findall(r"^\s*([a-z_]+)\s+([^;#']*?)\s*;", top, re.M))


def location(block: str, name: str) -> dict[str, str]:
    match = re.search(rf"^\s+location {re.escape(name)} \{{\n(.*?)^\s+\}}", block, re.M | re.S)
    assert match, f"no `location {name}` in {NGINX_CONF}"
    return directives(match.group(1))


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmM]?)", value).groups()
    return int(number) << {"": 0, "k": 10, "m": 20}[unit.lower()]


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 1e-3, "s": 1.0, None: 1.0, "m": 60.0}[unit]


def test_the_balancers_limits_equal_or_tighten_the_services():
    """Parsed from both files, so neither drifts: a limit nginx enforces is never looser than the replica's, and the
    replica's own checks see every body (nginx streams them) before anyone holds it."""
    text = NGINX_CONF.read_text()
    server, upstream = directives(conf_block(text, "server")), directives(conf_block(text, "upstream teacher"))
    # bodies streamed: no temp file, the replica's limits apply
    assert server.get("proxy_request_buffering") == "off"
    assert size_bytes(server["client_max_body_size"]) == SERVICE.limits.body_bytes
    # what nginx holds of a body, per connection
    assert size_bytes(server["client_body_buffer_size"]) <= 1 << 20
    count, each = server["large_client_header_buffers"].split()
    head = size_bytes(server["client_header_buffer_size"]) + int(count) * size_bytes(each)
    assert head <= SERVICE.limits.header_bytes, head
    assert seconds(server["client_header_timeout"]) <= SERVICE.timeouts.header_s
    assert seconds(server["keepalive_timeout"]) <= SERVICE.timeouts.keep_alive_s
    assert seconds(server["client_body_timeout"]) <= SERVICE.timeouts.body_s
    # nginx closes an idle upstream connection before the replica does: no query is sent on one it is closing
    assert seconds(upstream["keepalive_timeout"]) < SERVICE.timeouts.keep_alive_s
    proxy = location(conf_block(text, "server"), "/")
    # a stalled client is nginx's to cut off, never read as a replica that timed out (which takes it out)
    assert seconds(server["client_body_timeout"]) < seconds(proxy["proxy_send_timeout"])
    # only a query no byte of which was sent moves on; a replica's 503 is the client's to see
    assert set(proxy["proxy_next_upstream"].split()) <= {"error", "timeout"}, proxy["proxy_next_upstream"]


def test_what_nginx_answers_itself_is_the_services_json_error_shape():
    """Every status nginx may answer itself goes to a location that returns the service's ErrorBody (JSON)."""
    block = conf_block(NGINX_CONF.read_text(), "server")
    pages = re.findall(r"^\s*error_page ([\d ]+?) (?:=(\d+) )?(\S+);", block, re.M)
    handled = {int(code) for codes, _, _ in pages for code in codes.split()}
    # 494: nginx's own "head too large"
    assert handled >= {400, 413, 414, 494, 500, 502, 503, 504}, handled
    for codes, new_status, uri in pages:
        answer = re.search(rf"location = {re.escape(uri)} \{{\n(.*?)^\s+\}}", block, re.M | re.S).group(1)
        assert "internal;" in answer and "default_type application/json;" in answer
        status, body = re.search(r"return (\d+) '(.*)';", answer).groups()
        assert int(status) == int(new_status or codes.split()[0])
        error = ErrorBody.model_validate(json.loads(re.sub(r"\$\w+", "x", body))).error
        assert error.code and error.message
        if status == "413":
            # the limit it states is the one it has
            assert error.expected == f"at most {SERVICE.limits.body_bytes} bytes"


# ------------------------------------------------------------------ the real nginx, running deploy/nginx.conf


def nginx_body_files(balancer, body_temp: Path) -> list[str]:
    """The files under nginx's client_body_temp_path its processes hold open (nginx unlinks them at once, so the
    folder itself stays empty while they fill)."""
    held = []
    for pid in process_tree(balancer.process.pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(str(body_temp)):
                        held.append(target)
    return held


def nginx_resident_bytes(balancer) -> int:
    total = 0
    for pid in process_tree(balancer.process.pid):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) << 10
    return total


def json_error(headers: dict[str, str], body: bytes) -> ErrorDetail:
    assert headers["content-type"].startswith("application/json"), (headers, body[:300])
    return ErrorBody.model_validate_json(body).error


@needs_nginx
def test_bodies_without_the_token_are_refused_before_nginx_holds_them(locked, tmp_path):
    """Four connections each declare 200 MiB and send 48 MiB without the token: the replica refuses each from its
    head (401), and nginx, streaming rather than buffering, holds no temp file and no more memory for them."""
    _, balancer = locked
    # bench.servers.nginx_balancer's client_body_temp_path
    body_temp = tmp_path / "nginx" / "nginx" / "body"
    assert body_temp.is_dir()
    resident_before = nginx_resident_bytes(balancer)
    head = raw_head("POST", f"{protocol.SOFT_TARGETS_PATH}?teacher=ens", {"Content-Length": str(200 << 20)})
    sockets = [raw_connect(balancer.url) for _ in range(4)]

    def send(sock) -> None:
        # nginx may close once the answer is out: what it did not read is gone
        with contextlib.suppress(OSError):
            sock.sendall(head)
            sock.sendall(bytes(48 << 20))

    senders = [threading.Thread(target=send, args=(sock,)) for sock in sockets]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(HANG_S)
    try:
        # buffered, each would hold a temp file of tens of MiB
        assert nginx_body_files(balancer, body_temp) == []
        grown = nginx_resident_bytes(balancer) - resident_before
        # buffered, 16 MiB of memory each
        assert grown < 16 << 20, f"nginx grew by {grown} bytes"
        for sock in sockets:
            status, headers, body = raw_response(sock)
            assert status == 401, body[:300]
            assert json_error(headers, body).code == "unauthorized"
    finally:
        for sock in sockets:
            sock.close()


@needs_nginx
def test_a_trickled_body_is_cut_off_by_the_replicas_whole_body_deadline(locked):
    """A client with the token trickles 4 KiB every 50 ms of a 4 MiB body (never more than nginx's between-reads
    timeout apart): the replica's deadline for the whole body (timeouts.body_s, 2 s here) answers 408 in JSON and the
    connection closes, long before the body is in. Buffered, nginx would hold it until its last byte came."""
    _, balancer = locked
    size, sent = 4 << 20, 0
    sock = raw_connect(balancer.url)
    try:
        sock.sendall(
            raw_head(
                "POST",
                f"{protocol.SOFT_TARGETS_PATH}?teacher=ens",
                {"Authorization": f"Bearer {TOKEN}", "Content-Length": str(size)},
            )
        )
        # until an answer comes
        while sent < size and not select.select([sock], [], [], 0.05)[0]:
            sock.sendall(bytes(4096))
            sent += 4096
        status, headers, body = raw_response(sock)
        assert status == 408, body[:300]
        assert json_error(headers, body).code == "body_timeout"
        assert sent < size
        assert closed_by_peer(sock) == b""
    finally:
        sock.close()


@needs_nginx
def test_nginxs_own_refusals_are_the_services_json_errors(replicas, balancer):
    """A body over limits.body_bytes (413), a head over the limit (431, where nginx's own is an HTML 400), a malformed
    request (400), and no live replica (502, with Retry-After): each in the service's JSON error shape."""
    over = SERVICE.limits.body_bytes + 1
    sock = raw_connect(balancer.url)
    try:
        sock.sendall(raw_head("POST", f"{protocol.SOFT_TARGETS_PATH}?teacher=ens", {"Content-Length": str(over)}))
        status, headers, body = raw_response(sock)
    finally:
        sock.close()
    assert status == 413, body[:300]
    error = json_error(headers, body)
    assert (error.code, error.received) == ("body_too_large", f"{over} bytes")
    r = httpx.get(balancer.url + protocol.TEACHERS_PATH, headers={"X-Pad": "a" * (64 << 10)}, timeout=HANG_S)
    assert r.status_code == 431, r.text[:300]
    assert json_error(r.headers, r.content).code == "header_too_large"
    sock = raw_connect(balancer.url)
    try:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, body = raw_response(sock)
    finally:
        sock.close()
    assert status == 400, body[:300]
    assert json_error(headers, body).code == "bad_request"
    for replica in replicas:
        replica.kill9()
    r = httpx.post(
        balancer.url + protocol.SOFT_TARGETS_PATH,
        params={"teacher": "ens"},
        content=codec.encode_inputs(random_inputs(2)),
        timeout=HANG_S,
    )
    assert r.status_code == 502, r.text[:300]
    assert r.headers.get("retry-after") == "1"
    assert json_error(r.headers, r.content).code == "no_replica"


@needs_nginx
def test_a_full_queue_is_a_503_with_retry_after_and_takes_no_replica_out(busy):
    """Six plain clients on two replicas whose queues hold one 16-row query each: the replicas refuse queries (503,
    queue full) and every one reaches the client as the replica wrote it, Retry-After and JSON; none is a 502 "no
    live upstreams" (a 503 taking its replica out of rotation). Each client goes on for 10 queries after the
    first refusal anyone saw (at most 100 in all)."""
    replicas, balancer = busy
    body = codec.encode_inputs(random_inputs(16))
    answers: list[httpx.Response] = []
    refused = threading.Event()

    def client() -> None:
        after = 0
        with httpx.Client(base_url=balancer.url, timeout=HANG_S) as http:
            for _ in range(100):
                r = http.post(protocol.SOFT_TARGETS_PATH, params={"teacher": "ens", "cache": "bypass"}, content=body)
                answers.append(r)
                if r.status_code != 200:
                    refused.set()
                after += refused.is_set()
                if after >= 10:
                    return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_S)
    statuses = collections.Counter(r.status_code for r in answers)
    assert refused.is_set(), f"no query was refused, so nothing was checked: {statuses}"
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1", r.headers
            assert json_error(r.headers, r.content).code == "queue_full"
    assert all(rows_answered(replica) > 0 for replica in replicas)
