"""Fixtures: real teachers on disk, real uvicorn servers on ephemeral loopback ports, fresh copies of the checkout.

The suite comes in three tiers, one folder each, all run by `make test` (`pytest` from the root):
  unit/     a module or two in this process: no server, no subprocess of the project (`make test-fast`)
  service/  a real service: uvicorn on a loopback port, in this process or as `akd serve`, with real httpx clients
  e2e/      whole commands as a user runs them: `akd train`, `demo`, `bench`, `warm`, nginx, torchrun, docker
            compose, fresh clones of the checkout and the README's commands
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pipeline.health import free_port, wait_healthy  # noqa: F401  (free_port: used by the tests)
from shared import codec
from shared.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shared.models import build_model
from teacher_service.app import create_app
from teacher_service.config import load_config
from teacher_service.server import uvicorn_options

MNIST_SHAPE = (1, 28, 28)
REPO = Path(__file__).resolve().parents[1]
# Every wait in the suite is bounded by this ceiling against hangs, never by a budget: on a loaded 2-core
# machine the suite runs several times slower than on an idle one, and no test may fail for that.
HANG_S = 1800.0


def copy_checkout(dst: Path) -> Path:
    """What a fresh clone of this checkout holds (tracked and not-ignored files, as they are now), copied to `dst`.

    The user's-side tests run the README's commands there: no .venv, runs/ or build/ of the developer's.
    """
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        # a tracked file deleted in the working tree is not part of the copy
        if source.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dst / name)
    return dst


def seeded_model(seed: int, arch: str = "small_cnn", shape=MNIST_SHAPE, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, num_classes, shape).eval()


def save_member(
    path: Path, seed: int, arch: str = "small_cnn", shape=MNIST_SHAPE, num_classes: int = 10, epoch: int = 1
) -> Path:
    model = seeded_model(seed, arch, shape, num_classes)
    save_checkpoint(path, Checkpoint(arch, num_classes, shape, model.state_dict(), {"epoch": epoch, "seed": seed}))
    return path


def export_member(path: Path, seed: int, shape=MNIST_SHAPE) -> Path:
    model = seeded_model(seed, shape=shape)
    example = torch.rand(4, *shape)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, teachers: dict, server: dict | None = None) -> Path:
    """teachers: {name: {num_classes, input_shape, ..., members: [{path, weight}]}}; server: [server]'s keys, a
    section as a dict ({"cache": {"dir": "cache"}} is [server.cache] dir)."""
    lines = []
    if server:
        lines.append("[server]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in server.items() if not isinstance(v, dict)]
        for section, table in server.items():
            if isinstance(table, dict):
                lines.append(f"\n[server.{section}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for name, t in teachers.items():
        lines.append(f"\n[teachers.{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in t.items() if k != "members"]
        for m in t["members"]:
            lines.append(f"\n[[teachers.{name}.members]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in m.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def live_server(config_path: Path, asgi=None, overrides: dict | None = None):
    """The real app under a real uvicorn, in a thread, on an ephemeral loopback port.

    `asgi(app)`, when given, is what uvicorn serves instead of the app itself (a way in past the hot route);
    `overrides` are as `akd serve`'s flags give them to load_config ({"cache.dir": ...})."""
    config = load_config(config_path, overrides=overrides, environ={})
    app = create_app(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # the timeouts, limits and protocol `akd serve` runs with (teacher_service.server), quieter
    server = uvicorn.Server(
        uvicorn.Config(
            asgi(app) if asgi else app, **{**uvicorn_options(config.server), "log_level": "warning"}, lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, alive=thread.is_alive, timeout_s=HANG_S)
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class ServerProcess:
    """`python -m teacher_service` as its own process, for restarts and kill -9."""

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        env: dict | None = None,
        port: int | None = None,
        max_files: int | None = None,
    ):
        self.log_path = log_path
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")  # noqa: SIM115 (held open for the server's lifetime; closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "teacher_service", "--config", str(config_path), "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files)))
            if max_files
            else None,
        )
        wait_healthy(self.base, alive=lambda: self.proc.poll() is None, timeout_s=HANG_S)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=HANG_S)
        self.log.close()

    def stop(self) -> bool:
        """SIGTERM; True when the server shut down gracefully (uvicorn then re-raises the signal)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=HANG_S)
        self.log.close()
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log_path.read_text()


@pytest.fixture
def mnist_members(tmp_path) -> dict[str, Path]:
    """Three different small CNN teachers: two checkpoints and one torch.export file."""
    return {
        "a": save_member(tmp_path / "teachers" / "a.pt", seed=1),
        "b": save_member(tmp_path / "teachers" / "b.pt", seed=2, epoch=7),
        "c": export_member(tmp_path / "teachers" / "c.pt2", seed=3),
    }


def mnist_teacher(members: list[tuple[Path, float]], **fields) -> dict:
    return {
        "num_classes": 10,
        "input_shape": list(MNIST_SHAPE),
        **fields,
        "members": [{"path": str(p), "weight": w} for p, w in members],
    }


def random_inputs(n: int, dtype=torch.float32, seed: int = 0, shape=MNIST_SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return torch.rand(n, *shape, generator=g).to(dtype)


# --------------------------------------------------------------------------- raw sockets
# for what an HTTP client will not do: a head sent in pieces, a body that stops halfway, a connection sending nothing


def metric_series(text: str) -> dict[str, float]:
    """Every sample of a /metrics page (prometheus_client's parser), keyed as Prometheus writes it with its labels
    in name order, e.g. 'akd_rows_total{teacher="m"}'."""
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            series[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return series


def metric(text: str, series: str, default: float | None = None) -> float:
    """One sample's value (see metric_series); `default` when it is absent, or a failed assertion without one."""
    values = metric_series(text)
    assert series in values or default is not None, f"{series} not in /metrics"
    return values.get(series, default)


def gauge(text: str, name: str) -> float:
    """A sample's value, 0 until the service has one (a cache namespace not yet made)."""
    return metric(text, name, default=0.0)


def raw_connect(base: str) -> socket.socket:
    """A plain TCP connection to a live server's base URL; reads on it give up after HANG_S."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=HANG_S)
    sock.settimeout(HANG_S)
    return sock


def raw_head(method: str, target: str, headers: dict | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def raw_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response (status, lower-case headers, body by Content-Length) off a raw socket; not for pipelining."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_peer(sock: socket.socket) -> bytes:
    """Everything the server still sends, until it closes the connection (bounded by HANG_S); a reset counts as
    closed."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# ---------------------------------------------------------------- what several test files share


def load_in_process(path):
    if path.suffix == ".pt2":
        return torch.export.load(path).module()
    return load_checkpoint(path).build()


def reference_member_logits(paths, x: torch.Tensor) -> torch.Tensor:
    xf = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    with torch.inference_mode():
        return torch.stack([load_in_process(p)(xf) for p in paths])


def reference_probs(member_logits, weights, tau, aggregate):
    beta = torch.tensor(weights) / sum(weights)
    if aggregate == "logits":
        return torch.softmax(sum(b * z for b, z in zip(beta, member_logits)) / tau, dim=-1)
    return sum(b * torch.softmax(z / tau, dim=-1) for b, z in zip(beta, member_logits))


def post(base, x, **params) -> httpx.Response:
    r = httpx.post(f"{base}/soft-targets", content=codec.encode_inputs(x), params=params, timeout=HANG_S)
    assert r.status_code == 200, r.text
    return r


FAKE_ROBUSTBENCH = '''
"""Test double: the real robustbench package (and its weights) cannot be installed offline here."""
import torch
from shared.models import build_model

CALLS = []

def load_model(model_name, model_dir, dataset, threat_model):
    CALLS.append((model_name, model_dir, dataset, threat_model))
    model = build_model("small_cnn", 10, (1, 28, 28))
    model.load_state_dict(torch.load(f"{model_dir}/{dataset}/{threat_model}/{model_name}.pt"))
    return model.eval()
'''


@pytest.fixture
def fake_robustbench(tmp_path, monkeypatch):
    package = tmp_path / "site" / "robustbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "utils.py").write_text(FAKE_ROBUSTBENCH)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    for name in ("robustbench", "robustbench.utils"):
        sys.modules.pop(name, None)


def robustbench_config(tmp_path, model_id="Fake2024"):
    teacher = {
        "num_classes": 10,
        "input_shape": [1, 28, 28],
        "members": [{"robustbench": model_id, "dataset": "mnist"}],
    }
    return write_config(tmp_path / "t.toml", {"rb": teacher})
