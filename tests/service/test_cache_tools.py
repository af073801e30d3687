"""`akd cache stats|verify|gc` on caches a real service filled: what each namespace holds and who uses it, every row
checked, stale member versions deleted and nothing else, and nothing deleted under a running service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_S, REPO, live_server, mnist_teacher, post, random_inputs, save_member, write_config

from shared.hashing import file_version
from teacher_service.cache.rows import row_bytes

ROWS, CHUNK = 12, 8


def akd_cache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "akd", "cache", *args], cwd=REPO, capture_output=True, text=True, timeout=HANG_S
    )


def serve_once(config: Path) -> None:
    """A real service answers ROWS clean rows with cache=use, and shuts down (which writes them)."""
    with live_server(config) as (base, _):
        post(base, random_inputs(ROWS), cache="use")


@pytest.fixture
def cache(tmp_path):
    """A cache that served members a, b, then a and c: b's version is stale for the second config."""
    a, b, c = (save_member(tmp_path / f"{n}.pt", seed=s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    server = {"cache": {"dir": "cache", "chunk_rows": CHUNK}}
    first = write_config(tmp_path / "first.toml", {"ens": mnist_teacher([(a, 1.0), (b, 1.0)])}, server)
    second = write_config(tmp_path / "second.toml", {"ens": mnist_teacher([(a, 1.0), (c, 1.0)])}, server)
    serve_once(first)
    serve_once(second)
    versions = {name: file_version(path) for name, path in (("a", a), ("b", b), ("c", c))}
    return tmp_path / "cache", second, versions


def namespaces(done: subprocess.CompletedProcess) -> dict[str, dict]:
    assert done.returncode == 0, done.stderr
    [store] = json.loads(done.stdout)
    return {ns["version"]: ns for ns in store["namespaces"]}


def test_stats_shows_each_version_its_rows_and_which_are_stale(cache):
    folder, config, v = cache
    shown = namespaces(akd_cache("stats", "--config", str(config), "--json"))
    assert set(shown) == {v["a"], v["b"], v["c"]}
    assert all(ns["rows"] == ROWS and ns["num_classes"] == 10 and ns["problem"] is None for ns in shown.values())
    assert shown[v["a"]]["used_by"] == ["teachers.ens.members[0]"] and shown[v["c"]]["used_by"]
    # stale: the second config no longer serves b
    assert shown[v["b"]]["used_by"] == []
    # logits, key, checksum
    assert shown[v["a"]]["bytes"] == ROWS * (10 * 4 + 16 + 8)
    text = akd_cache("stats", "--config", str(config)).stdout
    assert f"{v['b']}" in text and "stale: no teacher of the config uses it" in text
    # no config: what is there, not who uses it
    plain = akd_cache("stats", "--cache-dir", str(folder))
    assert plain.returncode == 0 and "give --config" in plain.stdout


def test_stats_takes_each_versions_hit_rate_from_the_running_service(cache):
    folder, config, v = cache
    with live_server(config) as (base, _):
        # every row a hit, for a and for c
        post(base, random_inputs(ROWS), cache="use")
        # 4 misses each
        post(base, random_inputs(4, seed=7), cache="use")
        shown = namespaces(akd_cache("stats", "--config", str(config), "--url", base, "--json"))
        text = akd_cache("stats", "--config", str(config), "--url", base).stdout
    assert (shown[v["a"]]["hits"], shown[v["a"]]["misses"]) == (ROWS, 4)
    # not served
    assert (shown[v["b"]]["hits"], shown[v["b"]]["misses"]) == (0, 0)
    assert f"{ROWS / (ROWS + 4):.1%}" in text
    down = akd_cache("stats", "--config", str(config), "--url", base)
    assert down.returncode == 2 and "could not read its /metrics" in down.stderr


def test_verify_reads_every_row_and_names_what_fails(cache):
    folder, config, v = cache
    done = akd_cache("verify", "--cache-dir", str(folder))
    assert done.returncode == 0 and done.stdout.count(f"ok, {ROWS} rows verified") == 3, done.stdout
    chunk = folder / v["a"] / "logits" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    (folder / v["c"] / "zarr.json").write_text("{ not json")
    done = akd_cache("verify", "--cache-dir", str(folder))
    assert done.returncode == 1
    assert f"{folder}/{v['a']}: DAMAGED" in done.stdout and f"of {ROWS} rows fail" in done.stdout
    assert f"{folder}/{v['c']}: DAMAGED metadata" in done.stdout
    assert f"{folder}/{v['b']}: ok, {ROWS} rows verified" in done.stdout
    # verify only reads
    assert (folder / v["a"]).is_dir() and (folder / v["c"]).is_dir()


def test_gc_deletes_the_stale_versions_only_and_the_served_rows_still_hit(cache):
    folder, config, v = cache
    dry = akd_cache("gc", "--config", str(config), "--dry-run")
    assert dry.returncode == 0 and f"would delete {v['b']}" in dry.stdout and (folder / v["b"]).is_dir()
    done = akd_cache("gc", "--config", str(config))
    assert done.returncode == 0 and f"deleting {v['b']}" in done.stdout, done.stderr
    assert not (folder / v["b"]).exists() and (folder / v["a"]).is_dir() and (folder / v["c"]).is_dir()
    with live_server(config) as (base, _):
        assert post(base, random_inputs(ROWS), cache="use").headers["X-Cache-Hits"] == str(ROWS)


def test_gc_evicts_the_oldest_chunks_down_to_a_size_and_the_rest_still_hit(cache):
    folder, config, v = cache
    # a and c hold 12 rows each: one whole chunk of 8 must go
    bound = 16 * row_bytes(10)
    dry = akd_cache("gc", "--config", str(config), "--max-bytes", str(bound), "--dry-run")
    assert dry.returncode == 0 and "would evict at least" in dry.stdout, dry.stderr
    done = akd_cache("gc", "--config", str(config), "--max-bytes", str(bound))
    assert done.returncode == 0 and f"evicted {CHUNK} rows" in done.stdout, done.stdout + done.stderr
    shown = namespaces(akd_cache("stats", "--config", str(config), "--json"))
    assert shown[v["a"]]["rows"] + shown[v["c"]]["rows"] == 2 * ROWS - CHUNK
    # evicted, not damaged
    assert akd_cache("verify", "--config", str(config)).returncode == 0
    refused = akd_cache("gc", "--config", str(config), "--max-bytes", "-1")
    assert refused.returncode == 2 and "expected a size in bytes >= 0, got -1" in refused.stderr
    # the first 8 rows lost one member's copy: recomputed; the others hit
    with live_server(config) as (base, _):
        assert post(base, random_inputs(ROWS), cache="use").headers["X-Cache-Hits"] == str(ROWS - CHUNK)


def test_gc_refuses_under_a_running_service_and_for_a_config_that_uses_nothing(cache, tmp_path):
    folder, config, v = cache
    with live_server(config):
        done = akd_cache("gc", "--config", str(config))
        assert done.returncode == 2 and "in use by another teacher service" in done.stderr
        assert "stop the service first" in done.stderr
    assert (folder / v["b"]).is_dir()
    other = save_member(tmp_path / "other.pt", seed=9)
    unrelated = write_config(
        tmp_path / "unrelated.toml", {"x": mnist_teacher([(other, 1.0)])}, {"cache": {"dir": "cache"}}
    )
    done = akd_cache("gc", "--config", str(unrelated))
    assert done.returncode == 2 and "is it the config this cache serves" in done.stderr
    assert all((folder / version).is_dir() for version in v.values())


def test_a_folder_of_replica_caches_is_taken_replica_by_replica(cache, tmp_path):
    folder, config, v = cache
    replicas = tmp_path / "replicas"
    for i in range(2):
        shutil.copytree(folder, replicas / f"replica-{i}")
    done = akd_cache("stats", "--cache-dir", str(replicas), "--json")
    assert done.returncode == 0
    assert [s["folder"] for s in json.loads(done.stdout)] == [str(replicas / f"replica-{i}") for i in range(2)]


def test_bad_targets_fail_clearly(tmp_path):
    assert "does not exist" in akd_cache("stats", "--cache-dir", str(tmp_path / "nope")).stderr
    (tmp_path / "empty").mkdir()
    done = akd_cache("verify", "--cache-dir", str(tmp_path / "empty"))
    assert done.returncode == 2 and "is not an akd cache" in done.stderr
    done = akd_cache("gc", "--cache-dir", str(tmp_path / "empty"))
    assert done.returncode == 2 and "--config is required" in done.stderr
