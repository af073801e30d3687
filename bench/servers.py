"""The servers a benchmark talks to, as separate processes on loopback ports, as users run them.

The teachers are written once per run with random weights: speed does not depend
on what a network has learned, and nothing has to be trained or downloaded.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import tomli_w
import torch

from bench import triton_client
from bench.config import BenchConfig
from pipeline.health import free_port, wait_healthy
from shared.checkpoint import Checkpoint, save_checkpoint
from shared.configfile import merged
from shared.models import build_model

START_TIMEOUT_S = 120.0


def write_teachers(workdir: Path, cfg: BenchConfig, max_wait_ms: float) -> Path:
    """Checkpoints for every declared teacher and the service TOML serving each of them by name."""
    teachers = {}
    for name, spec in cfg.teachers.items():
        torch.manual_seed(0)
        model = build_model(spec.arch, spec.num_classes, spec.input_shape)
        path = workdir / "teachers" / f"{name}.pt"
        save_checkpoint(
            path,
            Checkpoint(
                spec.arch,
                spec.num_classes,
                spec.input_shape,
                model.state_dict(),
                {"note": "random weights, for benchmarks"},
            ),
        )
        teachers[name] = {
            "num_classes": spec.num_classes,
            "input_shape": list(spec.input_shape),
            "members": [{"path": str(path)}],
        }
    config = workdir / "teachers.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "server": merged(cfg.server, {"batching": {"max_wait_ms": max_wait_ms}, "log_level": "warning"}),
                "teachers": teachers,
            }
        )
    )
    return config


@dataclass
class ServerProcess:
    name: str
    url: str
    process: subprocess.Popen
    log: Path
    # seconds a clean shutdown is given before the kill
    stop_timeout_s: float = 30.0
    # paths (globs) the server leaves behind, when killed or at all, removed after the stop
    leftovers: list[str] = field(default_factory=list)

    def pause(self) -> None:
        """Freeze the server's processes (SIGSTOP): an idle server that polls must not share the CPU with a measured
        one."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: int) -> None:
        if self.process.poll() is None:
            # its own session (start_new_session): the group holds its workers too
            os.killpg(self.process.pid, sig)

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) of the server and its worker processes so far; None off Linux."""
        try:
            return sum(_process_cpu(pid) for pid in process_tree(self.process.pid))
        except OSError:
            return None

    def stop(self) -> None:
        """A clean shutdown first, then whatever of the group outlived its leader (LitServe's workers can) is
        killed: a benchmark leaves no server process behind."""
        self.resume()
        if self.process.poll() is None:
            # uvicorn, LitServe and PyTriton all shut down cleanly on SIGINT
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            # the group outlives its leader while a member lives
            os.killpg(self.process.pid, signal.SIGKILL)
        for pattern in self.leftovers:
            for path in map(Path, glob.glob(pattern)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def start(
    name: str,
    command: list[str],
    log_dir: Path,
    env: dict[str, str],
    # None: a server that speaks no HTTP, up once its port accepts a connection
    health_path: str | None,
    listen_in: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
    leftovers: tuple[str, ...] = (),
) -> ServerProcess:
    """Start a server process on a free loopback port ({port} in `command`, or in the `listen 8000;` line of the
    config file `listen_in`) and wait until it is healthy. `leftovers`: glob patterns of what it leaves behind, when
    killed or at all ({pid}: its process id), removed by its `stop()`."""
    port = free_port()
    if listen_in is not None:
        listen_in.write_text(
            re.sub(r"^(\s*)listen 8000;$", rf"\1listen 127.0.0.1:{port};", listen_in.read_text(), flags=re.M)
        )
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [part.format(port=port) for part in command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    left = [pattern.replace("{pid}", str(process.pid)) for pattern in leftovers]
    server = ServerProcess(name, f"http://127.0.0.1:{port}", process, log, leftovers=left)
    try:
        if health_path is None:
            wait_listening(port, lambda: process.poll() is None, timeout_s)
        else:
            wait_healthy(server.url, lambda: process.poll() is None, timeout_s, path=health_path)
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        raise RuntimeError(f"{name} did not start: {exc}; its log {log} ends with:\n{_tail(log)}") from None
    return server


def wait_listening(port: int, alive, timeout_s: float) -> None:
    """Until a loopback connection to `port` is accepted; fail early if the server died, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server on port {port} exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} after {timeout_s:.0f}s")


def floor(kind: str, log_dir: Path) -> ServerProcess:
    """A floor of bench/floors.py (`starlette` or `socket`) as its own process."""
    command = [sys.executable, "-m", "bench.floors", kind, "--port", "{port}"]
    return start(f"floor-{kind}", command, log_dir, {}, health_path="/healthz" if kind == "starlette" else None)


def teacher_service(
    name: str,
    config: Path,
    log_dir: Path,
    device: str,
    batching: bool,
    cache_dir: Path | None,
    # e.g. AKD_DEVICES=cpu,cpu, OMP_NUM_THREADS=1
    extra_env: dict[str, str] | None = None,
    # a cache of millions of rows is verified before the service is up
    start_timeout_s: float = START_TIMEOUT_S,
) -> ServerProcess:
    env = {"AKD_DEVICE": device, "AKD_BATCHING": str(batching).lower(), **(extra_env or {})}
    if cache_dir is not None:
        env["AKD_CACHE_DIR"] = str(cache_dir)
    command = [sys.executable, "-m", "teacher_service", "--config", str(config), "--port", "{port}"]
    return start(name, command, log_dir, env, health_path="/healthz", timeout_s=start_timeout_s)


def litserve_peer(
    name: str, config: Path, teacher: str, log_dir: Path, device: str, max_batch_size: int, batch_timeout_s: float
) -> ServerProcess:
    command = [
        sys.executable,
        "-m",
        "bench.litserve_app",
        "--config",
        str(config),
        "--teacher",
        teacher,
        "--port",
        "{port}",
        "--device",
        device,
        "--max-batch-size",
        str(max_batch_size),
        "--batch-timeout",
        str(batch_timeout_s),
    ]
    return start(name, command, log_dir, {}, health_path="/health")


# The folder `bench` is in: the checkout, whose `make triton` makes the Triton environment
CHECKOUT = Path(__file__).resolve().parent.parent
TRITON_VENV_ENV = "AKD_TRITON_VENV"
# written last by `make triton`: an environment without it is not one to run
TRITON_STAMP = ".installed"


def triton_venv() -> Path:
    """The Triton environment: $AKD_TRITON_VENV, else .venv-triton in the checkout (where `make triton` makes it)."""
    return Path(os.environ.get(TRITON_VENV_ENV) or CHECKOUT / ".venv-triton")


def triton_missing() -> str | None:
    """Why Triton cannot be served here, in words that say how to get it; None when it can."""
    venv = triton_venv()
    if not (venv / TRITON_STAMP).is_file():
        return (
            f"no Triton environment at {venv} (`make triton` makes it: a venv of Debian's python3.11 with "
            "nvidia-pytriton 0.7.0, Triton 2.51, and torch, about 1.3 GB; or set AKD_TRITON_VENV to one)"
        )
    return None


def triton_version() -> str | None:
    """nvidia-pytriton's version in the Triton environment (read from its install record, nothing imported), or None
    where there is none."""
    if triton_missing():
        return None
    found = sorted((triton_venv() / "lib").glob("python*/site-packages/nvidia_pytriton-*.dist-info"))
    return found[-1].name.removeprefix("nvidia_pytriton-").removesuffix(".dist-info") if found else None


def triton_command() -> tuple[list[str], dict[str, str]]:
    """The command that runs bench/triton_app.py with the Triton environment's Python, and the environment it needs
    on top of this process's (the checkout on PYTHONPATH: that venv holds no install of the project)."""
    return [str(triton_venv() / "bin" / "python"), "-m", "bench.triton_app"], {"PYTHONPATH": str(CHECKOUT)}


def triton_peer(name: str, config: Path, teacher: str, log_dir: Path, device: str) -> ServerProcess:
    """Triton Inference Server (through PyTriton, bench/triton_app.py) serving `teacher` of the service config
    `config` (a teachers.toml: its checkpoints, and its [server.batching] max_rows and max_wait_ms for Triton's
    dynamic batcher) as the model named `teacher`, on a free loopback port, HTTP only; returned once the model is
    ready. `stop()` leaves no process of it (PyTriton's, tritonserver, the Python backend's stub), nor its workspace
    (a folder in /tmp), nor, after a kill, its shared memory. Raises RuntimeError when the Triton environment is
    missing (`triton_missing`) or the server does not start (with its log's tail)."""
    missing = triton_missing()
    if missing:
        raise RuntimeError(missing)
    # PyTriton's workspace holds its Unix sockets, whose paths must stay within 107 bytes: a short one in /tmp, not
    # one in the run's folder; PyTriton makes it (it must not exist yet)
    workspace = Path(tempfile.mkdtemp(prefix="akd-triton-")) / "w"
    command, env = triton_command()
    command += ["serve", "--config", str(config), "--teacher", teacher, "--port", "{port}", "--device", device]
    command += ["--workspace", str(workspace)]
    # PyTriton (sic) names its shared memory after its process; a clean stop removes it and the workspace
    leftovers = ("/dev/shm/pytrtion{pid}-*", str(workspace.parent))
    return start(name, command, log_dir, env, health_path=triton_client.ready_path(teacher), leftovers=leftovers)


NGINX_CONF = CHECKOUT / "deploy" / "nginx.conf"
_UPSTREAM_SERVER = re.compile(r"^(\s*)server teacher:8000( [^;]*);$", re.M)


def nginx_balancer(name: str, replicas: list[str], log_dir: Path) -> ServerProcess:
    """deploy/nginx.conf (what compose's `balancer` runs) in front of `replicas` (http://host:port), with the
    nginx on PATH or in /usr/sbin (where Debian's package puts it), as its own process on a free loopback port."""
    # Debian's is outside users' PATH
    nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if nginx is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    prefix = log_dir / name
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "conf.d").mkdir(exist_ok=True)
    (prefix / "conf.d" / "akd.conf").write_text(balancer_conf(replicas))
    # started as root, nginx runs its workers as nobody, who cannot write the temp folders below: keep them root
    user = "user root;" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        f"""{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/conf.d/*.conf;
}}
"""
    )
    command = [nginx, "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    return start(name, command, log_dir, {}, health_path="/healthz", listen_in=prefix / "conf.d" / "akd.conf")


def balancer_conf(replicas: list[str]) -> str:
    """deploy/nginx.conf with its one `server teacher:8000 ...;` line made one line per replica."""
    # an installed package (the image) has no deploy/ folder
    if not NGINX_CONF.is_file():
        raise RuntimeError(f"no balancer config at {NGINX_CONF}: run from a checkout of the project")
    text = NGINX_CONF.read_text()
    match = _UPSTREAM_SERVER.search(text)
    if match is None:
        raise RuntimeError(f"{NGINX_CONF} has no `server teacher:8000 ...;` line to point at the replicas")
    indent, params = match.groups()
    servers = "\n".join(f"{indent}server {urlsplit(url).netloc}{params};" for url in replicas)
    return text[: match.start()] + servers + text[match.end() :]


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it, from /proc's parent links (a process that exits meanwhile is
    skipped)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # after "(comm)": state, ppid, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime + stime
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
