"""[server] in sections ([server.cache], [server.limits], [server.timeouts], [server.batching]): the sections load,
every flat key of the release before still works for one release with a notice naming its new key, every AKD_*
variable still sets its key, and `akd serve --set` changes any key of the config, over the environment and under
the command line's own flags."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import HANG_S, REPO, mnist_teacher, random_inputs, write_config

from pipeline.health import free_port, wait_healthy
from shared.codec import encode_inputs
from shared.configfile import ConfigError
from teacher_service.cache.settings import CacheSettings
from teacher_service.config import ENV_NAMES, FLAT_NAMES, ServerConfig, load_config

# A value for each flat name, none of them its default: where it lands shows it was read.
SAMPLES = {
    "cache_dir": "c",
    "cache_slots": 3,
    "cache_max_bytes": 12345,
    "cache_when_full": "stop",
    "cache_memory_bytes": 4096,
    "cache_index_memory_bytes": 8192,
    "cache_chunk_rows": 16,
    "cache_flush_s": 0.5,
    "cache_durable": True,
    "max_body_bytes": 1000,
    "max_inflight_bytes": 512 << 20,
    "max_connections": 9,
    "max_header_bytes": 2048,
    "max_queue_rows": 99,
    "timeout_header_s": 3.5,
    "timeout_body_s": 4.5,
    "timeout_keep_alive_s": 1.5,
    "timeout_drain_s": 2.0,
    "batching": False,
    "max_batch_rows": 7,
    "max_wait_ms": 9.0,
    "shm_enabled": False,
    "shm_max_regions": 5,
    "shm_max_bytes": 4096,
    "shm_sweep_s": 0.25,
}
# The same for the keys of [server] itself, as their environment variables spell them.
PLAIN_ENV = {
    "AKD_HOST": ("0.0.0.0", "0.0.0.0"),
    "AKD_PORT": ("8123", 8123),
    "AKD_TOKEN": ("s3cret", "s3cret"),
    "AKD_DEVICE": ("cpu", "cpu"),
    "AKD_DEVICES": ("cpu, cpu", ["cpu", "cpu"]),
    "AKD_AUTOCAST": ("bf16", "bf16"),
    "AKD_CHANNELS_LAST": ("true", True),
    "AKD_LOG_LEVEL": ("debug", "debug"),
}
TEACHER = {"mnist": {"num_classes": 10, "input_shape": [1, 28, 28], "members": [{"path": "a.pt"}]}}


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value).replace("'", '"')


def _at(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _leaves(model: type, prefix: str = "") -> set[str]:
    """Every setting of a config model, dotted: a section's fields, not the section."""
    out = set()
    for name, field in model.model_fields.items():
        kind = field.annotation
        nested = isinstance(kind, type) and hasattr(kind, "model_fields")
        out |= _leaves(kind, f"{prefix}{name}.") if nested else {prefix + name}
    return out


def _expected(old: str, tmp_path: Path):
    """What SAMPLES[old] becomes in the config: cache_dir resolves against the config's folder."""
    return str((tmp_path / "c").resolve()) if old == "cache_dir" else SAMPLES[old]


def test_the_table_names_every_setting_in_a_section_and_each_has_its_environment_variable():
    sectioned = {leaf for leaf in _leaves(ServerConfig) if "." in leaf}
    assert sorted(FLAT_NAMES.values()) == sorted(sectioned)
    # one variable each, none left out
    assert sorted(ENV_NAMES.values()) == sorted(_leaves(ServerConfig))
    assert set(SAMPLES) == set(FLAT_NAMES) and set(PLAIN_ENV) | {f"AKD_{old.upper()}" for old in FLAT_NAMES} == set(
        ENV_NAMES
    )


def test_the_sections_load(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(
        '[server]\nport = 8001\n[server.cache]\ndir = "c"\nmax_bytes = 100\nwhen_full = "stop"\n'
        "[server.limits]\nbody_bytes = 1000\nqueue_rows = 8\n[server.timeouts]\nbody_s = 2.5\n"
        "[server.batching]\nenabled = false\nmax_rows = 4\n"
        '[teachers.mnist]\nnum_classes = 10\ninput_shape = [1, 28, 28]\n[[teachers.mnist.members]]\npath = "a.pt"\n'
    )
    server = load_config(path, environ={}).server
    assert (server.port, server.cache.dir, server.cache.max_bytes) == (8001, str((tmp_path / "c").resolve()), 100)
    assert (server.limits.body_bytes, server.limits.queue_rows, server.timeouts.body_s) == (1000, 8, 2.5)
    assert (server.batching.enabled, server.batching.max_rows, server.batching.max_wait_ms) == (False, 4, 2.0)
    assert server.cache.settings == CacheSettings(
        max_bytes=100,
        chunk_rows=1024,
        durable=False,
        memory_bytes=ServerConfig().cache.memory_bytes,
        when_full="stop",
        index_memory_bytes=ServerConfig().cache.index_memory_bytes,
    )


@pytest.mark.parametrize("old", list(FLAT_NAMES))
def test_a_flat_key_still_works_with_a_notice_naming_its_new_key(tmp_path, caplog, old):
    section, key = FLAT_NAMES[old].split(".")
    # slots need a folder: given in the section, beside the flat key (both spellings of different keys merge)
    folder = {} if old == "cache_dir" else {"cache": {"dir": "c"}}
    path = write_config(tmp_path / "t.toml", TEACHER, {old: SAMPLES[old], **folder})
    with caplog.at_level(logging.WARNING, logger="akd.config"):
        config = load_config(path, environ={})
    assert _at(config.server, FLAT_NAMES[old]) == _expected(old, tmp_path)
    new = f"[server.{section}] {key}"
    assert [r.getMessage() for r in caplog.records if r.name == "akd.config"] == [
        f"config {path}: [server] {old} is deprecated and goes in the next release; write it as {new}"
    ]


# `batching = true` beside [server.batching] is one key given as a value and as a table: TOML itself refuses that.
@pytest.mark.parametrize("old", [old for old in FLAT_NAMES if old != "batching"])
def test_both_spellings_of_one_key_is_an_error_naming_both(tmp_path, old):
    section, key = FLAT_NAMES[old].split(".")
    text = f"[server]\n{old} = {_toml(SAMPLES[old])}\n[server.{section}]\n{key} = {_toml(SAMPLES[old])}\n"
    path = tmp_path / "t.toml"
    path.write_text(
        text + '[teachers.m]\nnum_classes = 10\ninput_shape = [1, 28, 28]\n[[teachers.m.members]]\npath = "a"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"[server] {old} and [server.{section}] {key} are one setting, given twice" in str(info.value)


def test_sections_hold_no_flat_key_in_the_files_of_the_repository():
    """The examples and generated configs speak the new names (the deprecation is for users' files)."""
    for path in [REPO / "configs" / "teachers.toml", REPO / "scripts" / "make_example_teachers.py"]:
        text = path.read_text()
        assert not [old for old in FLAT_NAMES if f"\n{old} =" in text], path


@pytest.mark.parametrize("name", [*PLAIN_ENV, *(f"AKD_{old.upper()}" for old in SAMPLES)])
def test_every_environment_variable_still_sets_its_key(tmp_path, name):
    path = write_config(tmp_path / "t.toml", TEACHER, {"cache": {"dir": "c"}})
    old = name.removeprefix("AKD_").lower()
    if name in PLAIN_ENV:
        text, expected = PLAIN_ENV[name]
    else:
        text, expected = _toml(SAMPLES[old]).strip('"'), SAMPLES[old]
        # relative to the working directory
        expected = str((Path.cwd() / "c").resolve()) if old == "cache_dir" else expected
    assert _at(load_config(path, environ={name: text}).server, ENV_NAMES[name]) == expected


def test_the_validators_across_fields_speak_the_new_names(tmp_path):
    path = write_config(tmp_path / "t.toml", TEACHER, {"cache": {"slots": 2}})
    with pytest.raises(ConfigError, match="server.cache: slots needs dir to be a local folder"):
        load_config(path, environ={})
    path = write_config(tmp_path / "t.toml", TEACHER, {"limits": {"body_bytes": 2000, "inflight_bytes": 1000}})
    with pytest.raises(ConfigError, match=r"server.limits: inflight_bytes \(1000\) must be at least body_bytes"):
        load_config(path, environ={})


def test_a_demo_plan_and_a_benchmark_config_take_flat_keys_with_the_notice(tmp_path, caplog):
    from bench.config import load_bench_config
    from pipeline.plan import load_plan

    with caplog.at_level(logging.WARNING, logger="akd.config"):
        plan = load_plan(None, "quick", sets=["service.max_batch_rows=1024"])
    assert plan.service == {"batching": {"max_rows": 1024}}
    assert "plan: [service] max_batch_rows is deprecated" in caplog.text
    text = (REPO / "bench" / "presets" / "gpu.toml").read_text()
    (tmp_path / "b.toml").write_text(text.replace('autocast = "none"', "max_batch_rows = 64"))
    assert load_bench_config(str(tmp_path / "b.toml")).server == {"batching": {"max_rows": 64}}
    (tmp_path / "b.toml").write_text(text.replace('autocast = "none"', "max_wait_ms = 5.0"))
    with pytest.raises(ConfigError, match=r"\['batching.max_wait_ms'\], which the benchmarks set themselves"):
        load_bench_config(str(tmp_path / "b.toml"))


# --------------------------------------------------------------------------- akd serve --set


def _serve(args: list[str], cwd: Path, env: dict, **kwargs):
    command = [sys.executable, "-m", "akd", "serve", *args]
    return subprocess.Popen(command, cwd=cwd, env={**env, "PYTHONPATH": str(REPO)}, **kwargs)


def _environment(**extra: str) -> dict[str, str]:
    """The test process's environment without any AKD_* variable, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AKD_")}, **extra}


def test_akd_serve_set_changes_the_service_it_starts(tmp_path, mnist_members):
    """--set over the environment (a teacher's temperature, the body limit, a cache folder relative to the working
    directory), and --cache-dir over --set."""
    config = write_config(tmp_path / "t.toml", {"mnist": mnist_teacher([(mnist_members["a"], 1.0)])}, {"device": "cpu"})
    port, cwd = free_port(), tmp_path / "cwd"
    cwd.mkdir()
    sets = ["server.limits.body_bytes=5000", "teachers.mnist.temperature=2", "server.cache.dir=set-cache"]
    args = ["--config", str(config), "--port", str(port), *(f"--set={s}" for s in sets), "--cache-dir", "flag-cache"]
    with open(tmp_path / "serve.log", "wb") as log:
        proc = _serve(args, cwd, _environment(AKD_MAX_BODY_BYTES="9000000"), stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, alive=lambda: proc.poll() is None, timeout_s=HANG_S)
            (teacher,) = httpx.get(f"{base}/teachers", timeout=HANG_S).json()["teachers"]
            small = httpx.post(f"{base}/soft-targets", content=encode_inputs(random_inputs(1)), timeout=HANG_S)
            large = httpx.post(f"{base}/soft-targets", content=encode_inputs(random_inputs(3)), timeout=HANG_S)
        finally:
            proc.terminate()
            proc.wait(timeout=HANG_S)
    assert teacher["temperature"] == 2.0
    assert small.status_code == 200, small.text
    assert large.status_code == 413 and large.json()["error"]["expected"] == "at most 5000 bytes", large.text
    assert (cwd / "flag-cache").is_dir() and not (cwd / "set-cache").exists()


@pytest.mark.parametrize(
    ("assignment", "says"),
    [
        ("server.limits.body_bytes=0", "server.limits.body_bytes: Input should be greater than or equal to 1"),
        ("server.limits.bodybytes=1", "server.limits.bodybytes: Extra inputs are not permitted"),
        ("teachers.mnist.temperature=hot", "teachers.mnist.temperature: Input should be a valid number"),
        ("server.limits", "--set expects key=value"),
        ("server.port.number=1", "server.port: Input should be a valid integer"),
    ],
)
def test_a_bad_akd_serve_set_is_one_line_and_exit_2(tmp_path, assignment, says):
    config = write_config(tmp_path / "t.toml", TEACHER, {"device": "cpu"})
    done = subprocess.run(
        [sys.executable, "-m", "akd", "serve", "--config", str(config), "--set", assignment],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**_environment(), "PYTHONPATH": str(REPO)},
        timeout=HANG_S,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("akd serve: ") and says in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_akd_serve_shows_the_notice_for_a_flat_key(tmp_path):
    """The notice reaches a user of the command line as one plain line, before anything else is said."""
    text = '[server]\ndevice = "cpu"\nmax_queue_rows = 0\n'
    (tmp_path / "t.toml").write_text(text + "[teachers.m]\nnum_classes = 10\n")
    done = subprocess.run(
        [sys.executable, "-m", "akd", "serve", "--config", str(tmp_path / "t.toml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**_environment(), "PYTHONPATH": str(REPO)},
        timeout=HANG_S,
    )
    notice, *_ = done.stderr.splitlines()
    assert done.returncode == 2 and notice == (
        f"config {tmp_path / 't.toml'}: [server] max_queue_rows is deprecated and goes in the next release; "
        "write it as [server.limits] queue_rows"
    )
