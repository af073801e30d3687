"""docker-compose.yml, checked without an engine: it declares the pipeline, it validates, and each service's
command, run as a local process with the service's environment and in the order of its depends_on, runs the
demo's pipeline. tests/e2e/test_compose_e2e.py runs the same file under a real engine, where one answers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import HANG_S, REPO, free_port

from bench.servers import nginx_balancer
from teacher_service import scrape

BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def compose(*files: str) -> dict:
    merged: dict = {}
    for name in files or ("docker-compose.yml",):
        data = yaml.safe_load((REPO / name).read_text())
        for service, spec in data.get("services", {}).items():
            merged.setdefault("services", {}).setdefault(service, {}).update(spec)
        merged.setdefault("volumes", {}).update(data.get("volumes") or {})
    return merged


def interpolate(value: str, env: dict) -> str:
    """Compose's ${VAR:-default}."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def service_env(spec: dict, overrides: dict) -> dict:
    declared = {k: interpolate(str(v), overrides) for k, v in spec.get("environment", {}).items()}
    return {**os.environ, **declared, **overrides}


def local_argv(argv: list[str]) -> list[str]:
    """The image's `akd` and `python` are this environment's."""
    return [str(BIN / "akd") if argv[0] == "akd" else sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def test_compose_declares_the_pipeline():
    services = compose()["services"]
    assert set(services) == {"teachers", "teacher", "balancer", "trainer-seed0", "trainer-seed1", "report"}
    assert services["teacher"]["depends_on"] == {"teachers": {"condition": "service_completed_successfully"}}
    assert services["balancer"]["depends_on"] == {"teacher": {"condition": "service_healthy"}}
    for trainer in ("trainer-seed0", "trainer-seed1"):
        assert services[trainer]["depends_on"] == {"balancer": {"condition": "service_healthy"}}
        assert services[trainer]["environment"]["AKD_TEACHER_URL"] == "http://balancer:8000"
    assert set(services["report"]["depends_on"]) == {"trainer-seed0", "trainer-seed1"}
    akd = {name: spec for name, spec in services.items() if name != "balancer"}
    assert all(interpolate(s["image"], {}) == "akd:latest" for s in akd.values())
    # the results are on the host, in runs/compose
    assert all(
        s["volumes"] == ["./runs/compose:/data/demo"] and s["environment"]["AKD_DEMO_OUT"] == "/data/demo"
        for s in akd.values()
    )
    # scaled replicas share the config and publish no port of their own: the balancer is the one address
    assert "ports" not in services["teacher"] and int(services["teacher"]["environment"]["AKD_CACHE_SLOTS"]) >= 2
    balancer = services["balancer"]
    # the official image
    assert interpolate(balancer["image"], {}).startswith("nginx:")
    assert balancer["volumes"] == ["./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro"]
    assert balancer["ports"] == ["${AKD_HOST_PORT:-8000}:8000"]
    # the local path's command
    assert all(s["command"][:2] == ["akd", "demo"] for s in akd.values())
    gpu = compose("docker-compose.yml", "docker-compose.gpu.yml")["services"]["teacher"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_runs_as_the_host_user_restarts_the_servers_and_checks_readiness():
    services = compose()["services"]
    akd = {name: spec for name, spec in services.items() if name != "balancer"}
    # the image's own user by default; the host user's ids where given (scripts/compose_demo.sh gives them)
    assert {interpolate(s["user"], {}) for s in akd.values()} == {"1000:1000"}
    assert interpolate(akd["report"]["user"], {"AKD_UID": "1234", "AKD_GID": "99"}) == "1234:99"
    long_lived = {"teacher", "balancer"}
    assert {name: spec.get("restart") for name, spec in services.items()} == {
        name: "unless-stopped" if name in long_lived else None for name in services
    }
    # the one-shot stages are not servers: the image's health check is off for them
    assert all(s["healthcheck"] == {"disable": True} for name, s in akd.items() if name not in long_lived)
    assert all("/readyz" in " ".join(services[name]["healthcheck"]["test"]) for name in long_lived)
    merged = compose("docker-compose.yml", "docker-compose.gpu.yml")["services"]["teacher"]
    assert merged["restart"] == "unless-stopped" and "/readyz" in " ".join(merged["healthcheck"]["test"])


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed; the YAML checks still ran"
)
def test_docker_compose_config_validates():
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", f)]
        done = subprocess.run(["docker-compose", *args, "config", "-q"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)")
def test_compose_services_run_as_local_processes(tmp_path):
    """Two `teacher` replicas from the one config, behind deploy/nginx.conf run by Debian's nginx (the balancer's
    host name is this machine), as `docker compose up --scale teacher=2` runs them."""
    services = compose()["services"]
    overrides = {
        "AKD_DEMO_OUT": str(tmp_path / "demo"),
        "AKD_DEMO_QUICK": "1",
        "AKD_HOST": "127.0.0.1",
    }
    replica_ports = [free_port(), free_port()]

    def start(name: str, **env: str) -> subprocess.Popen:
        spec = services[name]
        return subprocess.Popen(
            local_argv(spec["command"]),
            env=service_env(spec, {**overrides, **env}),
            cwd=tmp_path,
            stdout=open(tmp_path / f"{name}{env.get('AKD_PORT', '')}.log", "wb"),
            stderr=subprocess.STDOUT,
        )

    def completes(*names: str, **env: str) -> None:
        procs = [start(n, **env) for n in names]
        for name, proc in zip(names, procs):
            assert proc.wait(timeout=HANG_S) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    def healthy(replica: subprocess.Popen, port: int) -> None:
        env = service_env(services["teacher"], {**overrides, "AKD_PORT": str(port)})
        check = local_argv(services["teacher"]["healthcheck"]["test"][1:])
        deadline = time.monotonic() + HANG_S
        while subprocess.run(check, env=env, capture_output=True).returncode != 0:
            assert replica.poll() is None, (tmp_path / f"teacher{port}.log").read_text()
            assert time.monotonic() < deadline, "a teacher replica never passed its health check"
            time.sleep(0.5)

    completes("teachers")
    replicas = [start("teacher", AKD_PORT=str(port)) for port in replica_ports]
    balancer = None
    try:
        for replica, port in zip(replicas, replica_ports, strict=True):
            healthy(replica, port)
        balancer = nginx_balancer("balancer", [f"http://127.0.0.1:{p}" for p in replica_ports], tmp_path / "nginx")
        # concurrently, through nginx
        completes("trainer-seed0", "trainer-seed1", AKD_TEACHER_URL=balancer.url)
        served = [
            scrape.total(httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=HANG_S).text, "akd_rows_total")
            for p in replica_ports
        ]
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.send_signal(signal.SIGTERM)
            replica.wait(timeout=HANG_S)
    # both replicas answered the trainers
    assert all(rows > 0 for rows in served), served
    cache = tmp_path / "demo" / "service" / "cache"
    # one cache folder each
    assert sorted(p.name for p in cache.iterdir()) == ["replica-0", "replica-1"]
    completes("report")
    demo = tmp_path / "demo"
    assert "| akd-ensemble |" in (demo / "RESULTS.md").read_text()
    # written by a later invocation than the trainers'
    results = json.loads((demo / "results.json").read_text())
    assert results["service"]["rows"] > 0 and results["service"] == json.loads(
        (demo / "service" / "stats.json").read_text()
    )
    assert set(results["stages"]) == {"teachers", "students", "evaluate"} and results["elapsed_s"] > 0
    log = (tmp_path / "trainer-seed1.log").read_text()
    # the quick plan has seed 0 only: the second trainer has nothing to do
    assert "0 to train" in log


def test_the_build_context_holds_every_package_the_akd_command_can_reach():
    """.dockerignore is an allow-list: each package pyproject.toml installs must be on it (the image once lacked
    bench)."""
    included = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    allowed = {line.strip("!/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert {pattern.rstrip("*") for pattern in included} <= allowed
    assert {"pyproject.toml", "README.md", "requirements.lock"} <= allowed
