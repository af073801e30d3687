"""The cache in an S3-compatible object store (`[server.cache] dir = "s3://bucket/prefix"`, zarr's fsspec store through
s3fs), against a real S3 server: moto's, started as its own process on a loopback port (no cloud is reachable
here, and moto in server mode answers the S3 HTTP API as a service would). Rows survive a restart and hit;
a damaged object is never served, and its namespace is rebuilt; `akd cache stats` and `verify` read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import HANG_S, free_port, live_server, mnist_teacher, post, random_inputs, write_config
from test_cache_tools import akd_cache

from shared import codec
from shared.hashing import file_version

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed: pip install -e .[test]")
pytest.importorskip("moto.server", reason="moto's server is not installed: pip install -e .[test]")

BUCKET = "akd-cache"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on a free loopback port, with the environment every S3 client here reads."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_S
    while True:
        try:
            httpx.get(url, timeout=5)
            break
        except httpx.TransportError:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(timeout=HANG_S)


def objects(prefix: str) -> list[str]:
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture
def s3_config(s3_server, tmp_path, mnist_members, request):
    prefix = f"{request.node.name}"
    teacher = mnist_teacher([(mnist_members["a"], 1.0), (mnist_members["c"], 3.0)])
    config = write_config(
        tmp_path / "t.toml", {"ens": teacher}, {"cache": {"dir": f"s3://{BUCKET}/{prefix}", "chunk_rows": 8}}
    )
    return config, prefix, [file_version(mnist_members["a"]), file_version(mnist_members["c"])]


def member_logits(base: str, x: torch.Tensor, **params) -> tuple[torch.Tensor, int]:
    answer = post(base, x, outputs="member_logits", **params)
    return codec.decode(answer.content)["member_logits"], int(answer.headers["X-Cache-Hits"])


def test_rows_stored_in_s3_survive_a_restart_and_hit(s3_config):
    config, prefix, versions = s3_config
    x = random_inputs(20)
    with live_server(config) as (base, _):
        first, hits = member_logits(base, x, cache="use")
        assert hits == 0
    # in the bucket
    assert any(key.startswith(f"{prefix}/{versions[0]}/logits/") for key in objects(prefix))
    with live_server(config) as (base, _):
        again, hits = member_logits(base, x, cache="use")
    assert hits == 20
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_a_damaged_object_is_never_served_and_its_namespace_is_rebuilt(s3_config):
    config, prefix, versions = s3_config
    x = random_inputs(20)
    with live_server(config) as (base, _):
        first, _ = member_logits(base, x, cache="use")
    import boto3

    chunk = f"{prefix}/{versions[0]}/logits/c/0/0"
    assert chunk in objects(prefix)
    boto3.client("s3").put_object(Bucket=BUCKET, Key=chunk, Body=b"not a chunk any more")
    with live_server(config) as (base, _):
        again, hits = member_logits(base, x, cache="use")
        metrics = httpx.get(base + "/metrics", timeout=HANG_S).text
    # recomputed, not read from the damaged chunk
    torch.testing.assert_close(again, first, rtol=0, atol=1e-6)
    # the 8 rows of the damaged chunk were computed again (for member a)
    assert hits == 20 - 8
    assert f'akd_cache_damaged_rows_total{{member="{versions[0]}"}} 8.0' in metrics


def test_akd_cache_stats_and_verify_read_an_object_store(s3_config):
    config, prefix, versions = s3_config
    with live_server(config) as (base, _):
        post(base, random_inputs(12), cache="use")
    stats = akd_cache("stats", "--config", str(config), "--json")
    assert stats.returncode == 0, stats.stderr
    [store] = json.loads(stats.stdout)
    assert store["folder"] == f"s3://{BUCKET}/{prefix}"
    assert {ns["version"]: ns["rows"] for ns in store["namespaces"]} == {v: 12 for v in versions}
    verify = akd_cache("verify", "--config", str(config))
    assert verify.returncode == 0 and verify.stdout.count("ok, 12 rows verified") == 2, verify.stdout + verify.stderr
    gc = akd_cache("gc", "--config", str(config))
    assert gc.returncode == 2 and "only a local folder has" in gc.stderr


def test_eviction_deletes_the_evicted_chunks_objects(s3_server):
    """Past its bound, a bucket cache evicts like a folder: the chunk's objects go, its record stays."""
    import numpy as np

    from teacher_service.cache.rows import row_bytes
    from teacher_service.cache.settings import CacheSettings
    from teacher_service.cache.store import LogitCache

    store = f"s3://{BUCKET}/eviction"
    cache = LogitCache(store, CacheSettings(max_bytes=2 * 4 * row_bytes(10), chunk_rows=4, when_full="evict"))
    ns = cache.namespace("v1", 10)
    rng = np.random.default_rng(0)
    keys = [k.tobytes() for k in rng.integers(0, 256, (12, 16), dtype=np.uint8)]
    logits = rng.standard_normal((12, 10)).astype(np.float32)
    for start in range(0, 12, 4):
        ns.insert(keys[start : start + 4], logits[start : start + 4])
        cache.drain()
    cache.close()
    chunks = {key.split("/c/")[1].split("/")[0] for key in objects("eviction/v1/logits/c/")}
    assert chunks == {"1", "2"}, "chunk 0 was evicted: its objects should be gone, the others kept"
    reopened = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=4))
    found, got = reopened.namespace("v1", 10).get(keys)
    assert found.tolist() == [False] * 4 + [True] * 8 and np.array_equal(got, logits[4:])
    assert reopened.damage_counts()["v1"] == (0, 0)
    reopened.close()
