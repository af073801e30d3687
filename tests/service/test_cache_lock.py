"""One writer per cache folder, however the folder is spelt.

A real service (its own process) holds a cache folder; `akd serve` started beside it with AKD_CACHE_DIR set to
another spelling of the same folder (relative, `..`, trailing slash, a symlink, `file:`/`local:` URLs in any letter
case, fsspec cache layers over them) must be refused at start-up with one line naming the real folder and the
holder, exit 2, no traceback; the first keeps serving its rows. Spellings that name no lockable folder, and unknown
protocols, are refused with what was expected. `akd cache` takes the same spellings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    REPO,
    ServerProcess,
    free_port,
    live_server,
    mnist_teacher,
    post,
    random_inputs,
    wait_healthy,
    write_config,
)
from test_cache import wait_for_committed_rows

from shared.configfile import ConfigError
from shared.hashing import file_version
from teacher_service.cache.folder_lock import StoreLocked
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.store import LogitCache
from teacher_service.config import load_config
from teacher_service.service import _open_cache

ROWS = 12


def spellings(folder: Path, link: Path) -> list[str]:
    """Every way of naming `folder` a user might write, from a working directory beside it (`work/`)."""
    # the folder's name has a space: a file URL spells it %20
    path, uri = str(folder), folder.as_uri()
    return [
        path,
        path + "/",
        f"../{folder.name}",
        f"../work/../{folder.name}/",
        str(link),
        str(link) + "/.",
        uri,
        "FILE" + uri[4:],
        "File://localhost" + quote(path),
        "local://" + path,
        "LOCAL://" + str(link),
        "simplecache::" + uri,
        "filecache::local://" + path,
        "blockcache::FILE" + uri[4:],
        f"SimpleCache::../{folder.name}",
    ]


def environment(cache_dir: str | None = None) -> dict[str, str]:
    """AKD_CACHE_DIR set (when given), and this checkout importable from any working folder."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **({"AKD_CACHE_DIR": cache_dir} if cache_dir is not None else {})}


def akd_cache(args: list[str], cwd: Path, cache_dir: str) -> subprocess.CompletedProcess:
    """`akd cache <args> --cache-dir cache_dir`, run from `cwd` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "akd", "cache", *args, "--cache-dir", cache_dir],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )


def start_second(config: Path, cwd: Path, cache_dir: str, log: Path) -> tuple[int | None, str]:
    """`akd serve` with AKD_CACHE_DIR=cache_dir: (its exit code, its output) when it stops at start-up, (None, ...)
    when it came up and served (then it is stopped here: a second writer ran)."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "akd", "serve", "--config", str(config), "--port", str(port)],
            cwd=cwd,
            env=environment(cache_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", alive=lambda: proc.poll() is None, timeout_s=HANG_S)
    except RuntimeError:
        # it exited during start-up
        return proc.wait(timeout=HANG_S), log.read_text()
    proc.kill()
    proc.wait(timeout=HANG_S)
    return None, log.read_text()


@dataclass
class Held:
    first: ServerProcess
    config: Path
    folder: Path
    # of the one member, whose rows the first service stored
    version: str
    x: torch.Tensor
    # the first service's answer to x
    answer: httpx.Response


@pytest.fixture
def held(tmp_path, mnist_members):
    """A real service on `<tmp>/cache dir` that has stored ROWS rows; a symlink to the folder, and a working folder
    beside it."""
    folder = tmp_path / "cache dir"
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    (tmp_path / "work").mkdir()
    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(mnist_members["a"], 1.0)])},
        {"cache": {"dir": folder.name, "chunk_rows": 4}, "device": "cpu"},
    )
    first = ServerProcess(config, tmp_path / "first.log")
    x = random_inputs(ROWS, dtype=torch.uint8)
    try:
        answer = post(first.base, x, outputs="member_logits")
        # 3 whole chunks, on the folder
        wait_for_committed_rows(first.base, file_version(mnist_members["a"]), ROWS)
        yield Held(first, config, folder, file_version(mnist_members["a"]), x, answer)
    finally:
        if first.proc.poll() is None:
            first.stop()


def refusal_problem(code: int | None, output: str, folder: Path, holder: int) -> str | None:
    """What is wrong with a second service's start-up, or None for the refusal wanted: exit 2, no traceback, one line
    naming the real folder and the holder's process."""
    wanted = f"akd serve: cache store {os.path.realpath(folder)} is in use by another teacher service (pid {holder}: "
    if code is None:
        return "it started and served beside the first"
    lines = [line for line in output.splitlines() if "in use by another teacher service" in line]
    if code != 2 or "Traceback" in output or len(lines) != 1 or not lines[0].startswith(wanted):
        return f"exit {code}: {output[-2000:]}"
    if "-m akd serve" not in lines[0] and "teacher_service" not in lines[0]:
        return f"the holder's command is not named: {lines[0]}"
    return None


def test_every_spelling_of_a_held_folder_is_refused_and_the_first_keeps_its_rows(held, tmp_path, monkeypatch):
    """Every spelling goes through what `akd serve` does at start-up (its config, AKD_CACHE_DIR, the service's own
    cache opening), in this process; the spellings a second writer once got through with, and one that crashed, also
    as a whole `akd serve` (one line, exit 2: each costs a Python start-up, so not all fifteen)."""
    monkeypatch.chdir(tmp_path / "work")
    real, pid = os.path.realpath(held.folder), held.first.proc.pid
    problems = {}
    for spelling in spellings(held.folder, tmp_path / "link"):
        config = load_config(held.config, environ={"AKD_CACHE_DIR": spelling})
        try:
            _open_cache(config.server.cache).close()
            problems[spelling] = "opened beside the first"
        except StoreLocked as exc:
            if not str(exc).startswith(f"cache store {real} is in use by another teacher service (pid {pid}: "):
                problems[spelling] = str(exc)
    for i, spelling in enumerate(
        ["local://" + str(held.folder), "filecache::local://" + str(held.folder), "FILE" + held.folder.as_uri()[4:]]
    ):
        code, output = start_second(held.config, tmp_path / "work", spelling, tmp_path / f"second-{i}.log")
        if problem := refusal_problem(code, output, held.folder, pid):
            problems[f"akd serve {spelling}"] = problem
    assert not problems, "\n".join(f"{spelling!r}: {problem}" for spelling, problem in problems.items())

    # the first service still serves, from its rows
    again = post(held.first.base, held.x, outputs="member_logits")
    assert again.headers["X-Cache-Hits"] == str(ROWS) and again.content == held.answer.content
    assert held.first.stop()
    # its rows are intact on the folder
    with live_server(held.config) as (base, _):
        restarted = post(base, held.x, outputs="member_logits")
    assert restarted.headers["X-Cache-Hits"] == str(ROWS) and restarted.content == held.answer.content
    verify = akd_cache(["verify"], tmp_path / "work", "FILE" + held.folder.as_uri()[4:])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # no other writer's
    assert verify.stdout.splitlines() == [f"{real}/{held.version}: ok, {ROWS} rows verified"]


def test_akd_cache_takes_the_same_spellings_and_gc_is_refused_under_the_service(held, tmp_path):
    real, work = os.path.realpath(held.folder), tmp_path / "work"
    for spelling in ("FILE" + held.folder.as_uri()[4:], "simplecache::local://" + str(tmp_path / "link"), "../link/"):
        stats = akd_cache(["stats", "--json"], work, spelling)
        assert stats.returncode == 0 and "Traceback" not in stats.stderr, stats.stderr
        [store] = json.loads(stats.stdout)
        assert store["folder"] == real and [(ns["version"], ns["rows"]) for ns in store["namespaces"]] == [
            (held.version, ROWS)
        ]
        gc = akd_cache(["gc", "--config", str(held.config)], work, spelling)
        assert gc.returncode == 2 and "Traceback" not in gc.stderr, gc.stderr
        holder = f"cache store {real} is in use by another teacher service (pid {held.first.proc.pid}: "
        assert holder in gc.stderr and "stop the service first" in gc.stderr, gc.stderr


def test_a_FILE_url_serves_from_the_folder_it_names(tmp_path, mnist_members):
    """`FILE:///...` used to end start-up with a traceback (fsspec knows no protocol 'FILE')."""
    folder = tmp_path / "upper"
    config = write_config(tmp_path / "t.toml", {"m": mnist_teacher([(mnist_members["a"], 1.0)])}, {"device": "cpu"})
    x = random_inputs(ROWS, seed=3)
    server = ServerProcess(config, tmp_path / "server.log", env={"AKD_CACHE_DIR": "FILE://" + quote(str(folder))})
    try:
        first = post(server.base, x, outputs="member_logits")
    finally:
        assert server.stop()
    assert (folder / file_version(mnist_members["a"]) / "zarr.json").is_file()
    with live_server(config, overrides={"cache.dir": str(folder)}) as (base, _):
        again = post(base, x, outputs="member_logits")
    assert again.headers["X-Cache-Hits"] == str(ROWS) and again.content == first.content


@pytest.mark.parametrize(
    ("spelling", "says"),
    [
        ("zip::file:///{tmp}/a.zip", "'zip' over the local file system names no folder"),
        ("dir::FILE:///{tmp}/cache", "'dir' over the local file system names no folder"),
        ("simplecache:///{tmp}/cache", "'simplecache' stands over another file system"),
        ("nosuchproto://bucket/cache", "fsspec knows no protocol 'nosuchproto'"),
        ("NoSuchLayer::file:///{tmp}/cache", "fsspec knows no protocol 'nosuchlayer'"),
        ("FILE://otherhost/{tmp}/cache", "a file URL must name an absolute folder on this machine"),
    ],
)
def test_a_spelling_that_names_no_lockable_folder_is_refused_at_start_up(tmp_path, mnist_members, spelling, says):
    """As the config is read (in this process); the first case also as a whole `akd serve` (one line, exit 2)."""
    config = write_config(tmp_path / "t.toml", {"m": mnist_teacher([(mnist_members["a"], 1.0)])}, {"device": "cpu"})
    spelling = spelling.replace("/{tmp}", str(tmp_path))
    with pytest.raises(ConfigError) as refused:
        load_config(config, environ={"AKD_CACHE_DIR": spelling})
    lines = [f"akd serve: {refused.value}"]
    if spelling.startswith("zip::"):
        code, output = start_second(config, tmp_path, spelling, tmp_path / "serve.log")
        assert code == 2 and "Traceback" not in output, output
        lines = [line for line in output.splitlines() if line.startswith("akd serve:")]
    [line] = lines
    assert line.startswith("akd serve: server.cache.dir: expected a local folder") and f"got {spelling!r}" in line
    assert says in line, line


def test_the_cache_itself_locks_every_spelling(tmp_path):
    """LogitCache given a spelling directly (as `akd cache gc --max-bytes` and the benchmarks open it) takes the same
    lock, and names the process that holds it (here, this one)."""
    folder = tmp_path / "store"
    first = LogitCache(str(folder), CacheSettings(max_bytes=1 << 20))
    try:
        for spelling in (
            "local://" + str(folder),
            "simplecache::" + folder.as_uri(),
            str(tmp_path / "x" / ".." / "store"),
        ):
            with pytest.raises(
                StoreLocked,
                match=re.escape(f"cache store {folder} is in use by another teacher service (pid {os.getpid()}: "),
            ):
                LogitCache(spelling, CacheSettings(max_bytes=1 << 20))
    finally:
        first.close()
    # free again once closed
    LogitCache("File://" + str(folder), CacheSettings(max_bytes=1 << 20)).close()
