"""A damaged cache store is never served and never stops the service: damaged rows are recomputed,
damaged namespaces are set aside (kept for inspection) and rebuilt, and /metrics and the log say so.

Each case builds a real cache through the real service, damages the files on disk the way a flipped
bit, a lost or swapped chunk, a power loss (empty or torn files) or a bad edit would, and restarts.
"""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import zarr
from conftest import (
    HANG_S,
    export_member,
    gauge,
    live_server,
    mnist_teacher,
    post,
    random_inputs,
    save_member,
    write_config,
)

from shared import codec
from shared.hashing import file_version
from teacher_service.cache import durable
from teacher_service.cache.budget import out_of_space
from teacher_service.cache.layout import COMMITTED, DAMAGED_DIR, FORMAT
from teacher_service.cache.settings import CacheSettings
from teacher_service.cache.store import LogitCache
from teacher_service.config import load_config

# chunks 0 and 1 whole, chunk 2 holds rows 16-19
ROWS, CHUNK = 20, 8


def ask_row_by_row(base: str, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Member logits (M, B, K) and X-Cache-Hits per row, one row per request.

    One row at a time, every row is computed alone, whether to fill the cache or because it missed:
    so a recomputed row equals the first computation bit for bit, and each row's hit is told apart.
    """
    answers = [post(base, x[i : i + 1], outputs="member_logits") for i in range(len(x))]
    return torch.cat([codec.decode(a.content)["member_logits"] for a in answers], dim=1), [
        int(a.headers["X-Cache-Hits"]) for a in answers
    ]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor, list[str]]:
    """A teacher of two members, a cache of 20 rows each, and the member logits first served (computed fresh)."""
    home = tmp_path_factory.mktemp("pristine")
    members = [save_member(home / "a.pt", seed=1), export_member(home / "b.pt2", seed=3)]
    config = write_config(
        home / "teachers.toml",
        {"ens": mnist_teacher([(p, 1.0) for p in members])},
        {"cache": {"dir": "cache", "chunk_rows": CHUNK}},
    )
    x = random_inputs(ROWS, dtype=torch.uint8, seed=5)
    with live_server(config) as (base, _):
        fresh, hits = ask_row_by_row(base, x)
    assert hits == [0] * ROWS
    return home, x, fresh, [file_version(p) for p in members]


def flip_bit(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def truncate(path: Path, fraction: float) -> None:
    path.write_bytes(path.read_bytes()[: int(len(path.read_bytes()) * fraction)])


def set_attr(path: Path, **attrs) -> None:
    meta = json.loads(path.read_text())
    meta["attributes"].update(attrs)
    path.write_text(json.dumps(meta))


CHUNK_0, CHUNK_1, TAIL, ALL = set(range(8)), set(range(8, 16)), set(range(16, 20)), set(range(ROWS))
# case: (damage to member a's namespace folder, rows no longer served from the cache, akd_cache_damaged_rows_total,
# namespace set aside). Chunks are stored raw (10 float32 logits a row: 40 bytes), so a flipped bit costs exactly the
# row it lands in.
DAMAGE = {
    "bit flipped in a logits chunk's data": (lambda ns: flip_bit(ns / "logits/c/1/0", 0.6), {12}, 1, True),
    "bit flipped in a logits chunk's first byte": (lambda ns: flip_bit(ns / "logits/c/1/0", 0.0), {8}, 1, True),
    "logits chunk deleted (reads as zeros)": (lambda ns: (ns / "logits/c/1/0").unlink(), CHUNK_1, 8, True),
    "checks chunk deleted": (lambda ns: (ns / "checks/c/0").unlink(), CHUNK_0, 8, True),
    "two logits chunks swapped": (
        lambda ns: swap(ns / "logits/c/0/0", ns / "logits/c/1/0"),
        CHUNK_0 | CHUNK_1,
        16,
        True,
    ),
    "tail logits chunk truncated to 0 bytes": (lambda ns: truncate(ns / "logits/c/2/0", 0), TAIL, 4, True),
    "keys chunk truncated to half": (lambda ns: truncate(ns / "keys/c/0/0", 0.5), CHUNK_0, 8, True),
    "namespace zarr.json unreadable": (
        lambda ns: (ns / "zarr.json").write_text('{"zarr_format": 3, "node'),
        ALL,
        0,
        True,
    ),
    "logits zarr.json empty": (lambda ns: (ns / "logits/zarr.json").write_bytes(b""), ALL, ROWS, True),
    "committed_rows -1": (lambda ns: set_attr(ns / "zarr.json", **{COMMITTED: -1}), ALL, 0, True),
    "committed_rows a string": (lambda ns: set_attr(ns / "zarr.json", **{COMMITTED: "20"}), ALL, 0, True),
    "committed_rows past the arrays": (lambda ns: set_attr(ns / "zarr.json", **{COMMITTED: 10**6}), ALL, 0, True),
    "old format without checksums": (
        lambda ns: (set_attr(ns / "zarr.json", format="akd-logit-cache/1"), shutil.rmtree(ns / "checks")),
        ALL,
        ROWS,
        True,
    ),
    "root zarr.json unreadable": (lambda ns: (ns.parent / "zarr.json").write_text("not json"), set(), 0, False),
}


def scrape(base: str) -> str:
    return httpx.get(f"{base}/metrics", timeout=HANG_S).text


def member(metric: str, version: str) -> str:
    return f'{metric}{{member="{version}"}}'


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_store_is_never_served_and_never_stops_the_service(case, pristine, tmp_path, caplog):
    home, x, reference, (version_a, version_b) = pristine
    shutil.copytree(home, tmp_path / "run")
    damage, lost, damaged_rows, set_aside = DAMAGE[case]
    damage(tmp_path / "run" / "cache" / version_a)

    with (
        caplog.at_level(logging.WARNING, logger="akd.cache"),
        live_server(tmp_path / "run" / "teachers.toml") as (base, _),
    ):
        # the service started, and answers
        served, hits = ask_row_by_row(base, x)
        metrics = scrape(base)
    missed = {i for i, hit in enumerate(hits) if not hit}
    assert missed == lost, "a damaged row was served as a hit, or a sound one was not"
    assert torch.equal(served, reference), "a response differs from the freshly computed one"
    assert gauge(metrics, member("akd_cache_damaged_rows_total", version_a)) == damaged_rows
    assert gauge(metrics, member("akd_cache_damaged_namespaces_total", version_a)) == int(set_aside)
    assert gauge(metrics, member("akd_cache_misses_total", version_a)) == len(lost)
    assert gauge(metrics, member("akd_cache_hits_total", version_b)) == ROWS, "the other member's namespace was harmed"
    assert gauge(metrics, member("akd_cache_damaged_namespaces_total", version_b)) == 0

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    kept = sorted(p.name for p in (tmp_path / "run" / "cache" / DAMAGED_DIR).iterdir())
    assert len(kept) == 1, kept
    if set_aside:
        assert kept[0].startswith(f"{version_a}-")
        assert (tmp_path / "run" / "cache" / DAMAGED_DIR / kept[0] / "logits").is_dir(), (
            "the damaged namespace is kept whole"
        )
        assert any(version_a in w and kept[0] in w for w in warnings), warnings
    else:
        assert (
            kept[0].startswith("root-")
            and (tmp_path / "run" / "cache" / DAMAGED_DIR / kept[0] / "zarr.json").read_text() == "not json"
        )
        assert any("root zarr.json" in w and kept[0] in w for w in warnings), warnings

    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="akd.cache"),
        live_server(tmp_path / "run" / "teachers.toml") as (base, _),
    ):
        # the rebuilt namespace: verified rows and recomputed ones, all stored
        again, hits = ask_row_by_row(base, x)
        metrics = scrape(base)
    assert hits == [1] * ROWS
    assert torch.equal(again, reference)
    assert gauge(metrics, member("akd_cache_damaged_rows_total", version_a)) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class TestDurableCommits:
    def test_chunks_are_fsynced_before_the_commit_and_the_commit_after(self, tmp_path, monkeypatch):
        # (path below the store, committed_rows on disk at that moment)
        synced: list[tuple[str, int]] = []
        store = tmp_path / "store"
        real_fsync = durable.fsync

        def recording_fsync(path: Path, directory: bool = False) -> None:
            real_fsync(path, directory)
            meta = json.loads((store / "v1" / "zarr.json").read_text()) if (store / "v1" / "zarr.json").exists() else {}
            synced.append((str(Path(path).relative_to(store)), meta.get("attributes", {}).get(COMMITTED)))

        monkeypatch.setattr(durable, "fsync", recording_fsync)
        cache = LogitCache(str(store), CacheSettings(max_bytes=1 << 20, chunk_rows=4, durable=True))
        ns = cache.namespace("v1", num_classes=3)
        synced.clear()
        ns.insert([bytes([i]) * 16 for i in range(1, 7)], np.arange(18, dtype=np.float32).reshape(6, 3))
        # one whole chunk of 4 rows
        cache.drain()
        chunk_files = {"v1/keys/c/0/0", "v1/logits/c/0/0", "v1/checks/c/0"}
        assert chunk_files <= {p for p, _ in synced}
        assert all(committed == 0 for p, committed in synced if p in chunk_files), "a chunk was synced after its commit"
        assert synced[-2:] == [("v1/zarr.json", 4), ("v1", 4)], "the commit is synced last"
        # the tail chunk of 2 rows
        cache.close()
        assert synced[-2:] == [("v1/zarr.json", 6), ("v1", 6)]

    def test_without_it_nothing_is_fsynced(self, tmp_path, monkeypatch):
        monkeypatch.setattr(durable, "fsync", lambda *a, **k: pytest.fail("fsync without cache.durable"))
        cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 20, chunk_rows=2))
        cache.namespace("v1", 2).insert([b"a" * 16, b"b" * 16, b"c" * 16], np.ones((3, 2), np.float32))
        cache.close()

    def test_the_server_option_reaches_the_cache(self, cached_config_durable):
        assert load_config(cached_config_durable, environ={"AKD_CACHE_DURABLE": "1"}).server.cache.durable is True
        assert load_config(cached_config_durable, environ={}).server.cache.durable is False
        with live_server(cached_config_durable, overrides={"cache.durable": True}) as (base, app):
            x = random_inputs(5, seed=3)
            post(base, x)
            assert app.state.service.cache.durable
        with live_server(cached_config_durable) as (base, _):
            assert post(base, x).headers["X-Cache-Hits"] == "5"


@pytest.fixture
def cached_config_durable(tmp_path, mnist_members):
    return write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(mnist_members["a"], 1.0)])},
        {"cache": {"dir": "cache", "chunk_rows": 4}},
    )


def test_a_full_disk_shows_in_cache_full(tmp_path, mnist_members, monkeypatch, caplog):
    """A real full disk cannot be made here (no tmpfs mount without privileges): zarr's local-store write
    function raises what a full disk raises, OSError(ENOSPC), for chunk files, after start-up."""
    import zarr.storage._local as local_store

    config = write_config(
        tmp_path / "t.toml",
        {"m": mnist_teacher([(mnist_members["a"], 1.0)])},
        {"cache": {"dir": "cache", "chunk_rows": 4}},
    )
    real_put = local_store._put

    def full_disk(path, value, exclusive=False):
        if "/c/" in Path(path).as_posix():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive=exclusive)

    with caplog.at_level(logging.WARNING, logger="akd.cache"), live_server(config) as (base, app):
        assert gauge(scrape(base), "akd_cache_full") == 0
        monkeypatch.setattr(local_store, "_put", full_disk)
        x = random_inputs(6, seed=2)
        # 6 rows: one whole chunk of 4 goes to the writer, and fails
        post(base, x)
        app.state.service.cache.drain()
        metrics = scrape(base)
        # still served; new rows are no longer stored
        again = post(base, torch.cat([x, random_inputs(8, seed=3)]))
        rows_after = sum(ns.rows for ns in app.state.service.cache.namespaces)
    assert gauge(metrics, "akd_cache_full") == 1
    assert gauge(metrics, f'akd_cache_write_errors_total{{member="{file_version(mnist_members["a"])}"}}') == 1
    assert again.headers["X-Cache-Hits"] == "6" and rows_after == 6
    assert sum("out of disk space" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("wrap", ["plain", "cause", "context", "group"])
def test_out_of_space_is_recognised_however_it_is_wrapped(wrap):
    full = OSError(errno.ENOSPC, "No space left on device")
    if wrap == "plain":
        exc = full
    elif wrap == "group":
        group = getattr(builtins, "ExceptionGroup", None)
        if group is None:
            pytest.skip("ExceptionGroup is Python 3.11+")
        exc = group("writes", [ValueError("x"), full])
    else:
        exc = RuntimeError("chunk write failed")
        setattr(exc, f"__{wrap}__", full)
    assert out_of_space(exc)
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))


def write_root_metadata(store, data: bytes) -> None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore

    target = FsspecStore.from_url(store, read_only=False) if isinstance(store, str) else store
    sync(target.set("zarr.json", default_buffer_prototype().buffer.from_bytes(data)))


@pytest.mark.parametrize("kind", ["zarr store object", "store URL"])
def test_a_store_other_than_a_folder_deletes_what_it_cannot_keep_aside(kind, tmp_path, caplog):
    """No folder to move things into: a damaged namespace or root metadata is deleted and rebuilt, and the log says
    so."""
    from zarr.storage import MemoryStore

    # fsspec's in-process file system
    store = MemoryStore() if kind == "zarr store object" else f"memory://{tmp_path.name}"
    cache = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=2))
    cache.namespace("v1", 2).insert([b"a" * 16, b"b" * 16, b"c" * 16], np.ones((3, 2), np.float32))
    cache.namespace("v2", 2).insert([b"a" * 16], np.ones((1, 2), np.float32))
    cache.close()
    root = zarr.open_group(store, mode="a")
    # rows 0 and 1 no longer match their checksums
    root["v1"]["logits"][0:2] = np.full((2, 2), 7, np.float32)
    root["v2"].attrs[COMMITTED] = "1"
    with caplog.at_level(logging.WARNING, logger="akd.cache"):
        reopened = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=2))
        v1, v2 = reopened.namespace("v1", 2), reopened.namespace("v2", 2)
    assert v1.rows == 1 and list(v1.lookup([b"a" * 16, b"b" * 16, b"c" * 16])) == [-1, -1, 0]
    assert v2.rows == 0
    assert reopened.damage_counts() == {"v1": (2, 1), "v2": (0, 1)}
    messages = [r.getMessage() for r in caplog.records]
    assert any("v1" in m and "rows 0-1 fail their checksum" in m and "deleted" in m for m in messages), messages
    assert any("v2" in m and "committed_rows is '1'" in m and "deleted" in m for m in messages), messages
    reopened.close()
    write_root_metadata(store, b"{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="akd.cache"):
        again = LogitCache(store, CacheSettings(max_bytes=1 << 20, chunk_rows=2))
    assert any("root zarr.json unreadable" in r.getMessage() and "deleted" in r.getMessage() for r in caplog.records)
    # the namespaces, as rebuilt, are sound
    assert again.namespace("v1", 2).rows == 1 and again.damage_counts() == {"v1": (0, 0)}
    again.close()
    assert zarr.open_group(store, mode="r").attrs["format"] == FORMAT
