"""`docker compose` for real: build the image from a fresh copy of the checkout and run the quick pipeline with
the README's command (scripts/compose_demo.sh) and two teacher replicas behind the balancer, then check every
stage's exit code, the results on the host, each replica's own cache folder and share of the work, and the
service answering from the host through the balancer; a failing stage must fail the command. Also what a user
expects of the containers: none runs as root, what they write on the host is the host user's, the long-lived ones
restart unless stopped and report healthy by their readiness, and the image's own health check passes.

Run as root (as CI runs it), the test stands in for a host user the image does not know (HOST_USER): root's own
containers would run as the image's user, whose files root can take anyway.

The balancer's image is the official nginx image in docker-compose.yml; no registry is reachable here, so this
test builds a stand-in with Debian's nginx (NGINX_IMAGE below) and runs the same deploy/nginx.conf in it.

Runs where a Docker engine answers `docker info` (.ci/run starts one with ../shared/container/docker-engine.sh
where that script exists); elsewhere it is skipped, saying why. The image under test takes the CPU build of
this environment's torch when pip finds that wheel on disk (TORCH=<its URL>, served from a loopback port to
the build), instead of PyPI's 2.9 GB CUDA build, which is the Dockerfile's default and was measured by hand
(docs/operations.md, "Docker compose").
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from conftest import HANG_S, copy_checkout, free_port

from akd.cli import SUBCOMMANDS
from teacher_service import scrape

STAGES = ("teachers", "trainer-seed0", "trainer-seed1", "report")
LONG_LIVED = ("teacher", "balancer")
# The ids the containers must run as, and own their files on the host as: this user's, or the stand-in's under root.
HOST_USER = (4242, 4242) if os.getuid() == 0 else (os.getuid(), os.getgid())
IMAGE = "akd:e2e-test"
NGINX_IMAGE = "akd-nginx:e2e-test"
# Debian's nginx where the official image cannot be pulled; its stock site is removed so only conf.d/ is served.
NGINX_DOCKERFILE = """FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light curl \\
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/*
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
"""


def quiet(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=HANG_S, **kwargs)


def compose_command() -> list[str] | None:
    """compose v2 (the docker plugin) or v1 (Debian's docker-compose): what scripts/compose_demo.sh picks too."""
    if shutil.which("docker") and quiet(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    info = quiet(["docker", "info"])
    if info.returncode != 0:
        return f"no Docker engine answers `docker info` ({(info.stderr.strip().splitlines() or ['?'])[-1]})"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


pytestmark = pytest.mark.skipif(bool(problem := engine_problem()), reason=f"docker compose cannot run here: {problem}")


def local_torch_wheel() -> Path | None:
    """This environment's torch as a wheel in pip's find-links folders, for the image's Python (3.11) and machine."""
    listed = quiet([sys.executable, "-m", "pip", "config", "list"]).stdout
    folders = " ".join(re.findall(r"find-links='([^']*)'", listed) + [os.environ.get("PIP_FIND_LINKS", "")]).split()
    pattern = f"torch-{torch.__version__}-cp311-cp311-*{platform.machine()}.whl"
    return next((wheel for folder in folders for wheel in sorted(Path(folder).glob(pattern))), None)


@contextlib.contextmanager
def served_folder(folder: Path):
    """A folder over HTTP on a loopback port (the build runs with --network host, so it reaches it)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Pipeline:
    clone: Path
    env: dict
    # the first run's, which the tests read
    done: subprocess.CompletedProcess | None = None
    images: set[str] = field(default_factory=set)

    def run(self) -> subprocess.CompletedProcess:
        """scripts/compose_demo.sh once more, remembering the image it built so that down() can remove it."""
        done = run_script(self.clone, self.env)
        built = quiet(["docker", "image", "inspect", "-f", "{{.Id}}", IMAGE])
        self.images.update(built.stdout.split())
        return done

    def containers(self) -> dict[str, list[tuple[str, int, str]]]:
        """Every service's containers (replicas) as (status, exit code, id), as the engine reports them."""
        listed = quiet(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.env['COMPOSE_PROJECT_NAME']}"]
        )
        states = {}
        for container in listed.stdout.split():
            service, status, code = quiet(
                [
                    "docker",
                    "inspect",
                    "-f",
                    '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} {{.State.ExitCode}}',
                    container,
                ]
            ).stdout.split()
            states.setdefault(service, []).append((status, int(code), container))
        return states

    def down(self) -> None:
        """Containers, volumes and the image under test go: a 1.6 GB image left per run fills a CI disk in a day."""
        quiet([*compose_command(), "down", "-v", "--remove-orphans"], cwd=self.clone, env=self.env)
        # by ID: a rebuild leaves the earlier image untagged, where removing the tag would miss it
        if self.images:
            quiet(["docker", "image", "rm", "--force", *self.images])


def run_script(clone: Path, env: dict) -> subprocess.CompletedProcess:
    """scripts/compose_demo.sh, as the README gives it."""
    env = dict(env)
    wheel = local_torch_wheel()
    with served_folder(wheel.parent) if wheel else contextlib.nullcontext() as url:
        if wheel:
            env["TORCH"] = f"{url}/{wheel.name}"
        return subprocess.run(
            ["scripts/compose_demo.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=HANG_S
        )


@pytest.fixture(scope="module")
def quick_pipeline(tmp_path_factory):
    """The quick pipeline in a fresh copy of the checkout, two teacher replicas; torn down (with its volumes and
    images) after the module."""
    clone = copy_checkout(tmp_path_factory.mktemp("compose") / "akd")
    env = {
        **os.environ,
        "AKD_DEMO_QUICK": "1",
        "AKD_IMAGE": IMAGE,
        "AKD_NGINX_IMAGE": NGINX_IMAGE,
        "AKD_TEACHER_REPLICAS": "2",
        "AKD_HOST_PORT": str(free_port()),
        "COMPOSE_PROJECT_NAME": f"akde2e{os.getpid()}",
        **({"AKD_UID": str(HOST_USER[0]), "AKD_GID": str(HOST_USER[1])} if os.getuid() == 0 else {}),
    }
    run = Pipeline(clone, env)
    built = subprocess.run(
        ["docker", "build", "--network", "host", "-t", NGINX_IMAGE, "-"],
        input=NGINX_DOCKERFILE,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    run.images.add(NGINX_IMAGE)
    run.done = run.run()
    try:
        yield run
    finally:
        run.down()


def test_the_quick_pipeline_runs_to_its_end_and_says_so(quick_pipeline):
    done = quick_pipeline.done
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    states = quick_pipeline.containers()
    assert {stage: [s[:2] for s in states[stage]] for stage in STAGES} == {stage: [("exited", 0)] for stage in STAGES}
    # the shared service (two replicas) and its balancer outlive the pipeline
    assert [s[0] for s in states["teacher"]] == ["running", "running"] and states["balancer"][0][0] == "running"
    for stage in STAGES:
        assert f"{stage}: exited 0" in done.stdout
    # on the host, where docs/operations.md says
    results = quick_pipeline.clone / "runs" / "compose" / "RESULTS.md"
    assert "| pgd-at |" in results.read_text() and "| akd-ensemble |" in results.read_text()


def test_each_replica_keeps_its_own_cache_and_both_answer_the_trainers(quick_pipeline):
    cache = quick_pipeline.clone / "runs" / "compose" / "service" / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["replica-0", "replica-1"]
    served = []
    for _, _, container in quick_pipeline.containers()["teacher"]:
        metrics = quiet(
            [
                "docker",
                "exec",
                container,
                "python",
                "-c",
                "import httpx; print(httpx.get('http://127.0.0.1:8000/metrics').text)",
            ]
        )
        assert metrics.returncode == 0, metrics.stderr
        served.append(scrape.total(metrics.stdout, "akd_rows_total"))
    assert len(served) == 2 and all(rows > 0 for rows in served), served


def test_the_teacher_service_answers_from_the_host(quick_pipeline):
    port = quick_pipeline.env["AKD_HOST_PORT"]
    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=HANG_S)
    assert health.status_code == 200 and "ensemble" in health.json()["teachers"]
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=HANG_S)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def inspect(container: str, template: str) -> str:
    return quiet(["docker", "inspect", "-f", template, container]).stdout.strip()


def test_no_container_runs_as_root_and_what_they_write_is_the_host_users(quick_pipeline):
    states = quick_pipeline.containers()
    wanted = f"{HOST_USER[0]}:{HOST_USER[1]}"
    for stage in (*STAGES, "teacher"):
        for _, _, container in states[stage]:
            assert inspect(container, "{{.Config.User}}") == wanted, stage
            log = quiet(["docker", "logs", container])
            # HOME's caches (matplotlib's) and the bind mount are writable to a user the image does not know
            assert "Permission denied" not in log.stdout + log.stderr and "not a writable" not in log.stderr, stage
    for _, _, container in states["teacher"]:
        assert quiet(["docker", "exec", container, "id", "-u"]).stdout.strip() == str(HOST_USER[0])
    # the image itself, without compose's user: its own, not root
    assert quiet(["docker", "run", "--rm", IMAGE, "id", "-un"]).stdout.strip() == "akd"
    written = [p for p in (quick_pipeline.clone / "runs" / "compose").rglob("*")]
    assert len(written) > 10 and {(p.lstat().st_uid, p.lstat().st_gid) for p in written} == {HOST_USER}


def test_the_long_lived_services_restart_and_are_healthy_by_their_readiness(quick_pipeline):
    states = quick_pipeline.containers()
    for service in LONG_LIVED:
        for _, _, container in states[service]:
            assert inspect(container, "{{.HostConfig.RestartPolicy.Name}}") == "unless-stopped", service
            assert inspect(container, "{{.State.Health.Status}}") == "healthy", service
    # the image's own health check (docker run without compose's), run in a serving replica: /readyz, and it passes
    check = json.loads(quiet(["docker", "image", "inspect", "-f", "{{json .Config.Healthcheck}}", IMAGE]).stdout)
    assert check["Test"][0] == "CMD" and "/readyz" in " ".join(check["Test"])
    _, _, replica = states["teacher"][0]
    assert quiet(["docker", "exec", replica, *check["Test"][1:]]).returncode == 0


def test_the_image_holds_every_akd_subcommand(quick_pipeline):
    for command in SUBCOMMANDS:
        done = quiet(["docker", "run", "--rm", IMAGE, "akd", command, "--help"])
        assert done.returncode == 0 and f"usage: akd {command}" in done.stdout, done.stderr


def test_a_failing_stage_fails_the_command_and_names_it_even_on_a_rerun(quick_pipeline):
    """Run again in the same project with the teachers stage made to fail: the later stages, which passed the
    first time, must read `never started`, not the first run's exit codes."""
    demo = quick_pipeline.clone / "runs" / "compose"
    (demo / "teachers").rename(demo / "teachers.first-run")
    (demo / "teachers").write_text("a file where the teachers stage needs a folder")
    done = quick_pipeline.run()
    assert done.returncode == 1, done.stdout[-3000:]
    assert re.search(r"^teachers: exited [1-9]", done.stdout, re.M), done.stdout[-3000:]
    for stage in ("trainer-seed0", "trainer-seed1", "report"):
        assert f"{stage}: never started" in done.stdout, done.stdout[-3000:]
    assert "FAILED" in done.stderr
