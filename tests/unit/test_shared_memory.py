"""The registry of system shared-memory regions (teacher_service/shared_memory.py) on real POSIX segments.

Each segment is made as tritonclient makes one (multiprocessing.shared_memory: shm_open, the file /dev/shm/<key>),
or as a plain file in a temporary shm folder where the test needs a symlink, a folder or a shrunk file; each is a few
pages, and removed after. One test starts a small Python child that maps a segment and is killed. Cheap: about a
second in all.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import subprocess
import sys
import uuid
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from teacher_service.errors import ServiceError
from teacher_service.shared_memory import SharedMemoryRegions, check_segment, mapped_elsewhere

PAGE = os.sysconf("SC_PAGE_SIZE")
SHM = Path("/dev/shm")
# A process of the service's user that created a segment, mapped it and waits to be killed: a client that dies
# without unregistering. It maps the segment with os and mmap, not multiprocessing, whose resource tracker would
# unlink the segment when the child dies (then the test would see an unlinked segment, not a dead client).
CLIENT = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
os.ftruncate(fd, int(sys.argv[2]))
mapped = mmap.mmap(fd, int(sys.argv[2]))
print("ready", flush=True)
time.sleep(600)
"""


def unique(prefix: str = "akd-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def segments():
    """make(size) -> a new segment in /dev/shm, its creator's handle (the client's mapping); all unlinked after."""
    made = []

    def make(size: int = 2 * PAGE) -> shared_memory.SharedMemory:
        made.append(shared_memory.SharedMemory(unique(), create=True, size=size))
        return made[-1]

    yield make
    for segment in made:
        segment.close()
        if (SHM / segment.name).exists():
            segment.unlink()


@pytest.fixture
def regions():
    table = SharedMemoryRegions(max_regions=8, max_bytes=1 << 20)
    yield table
    table.close()


def key(segment: shared_memory.SharedMemory) -> str:
    return "/" + segment.name


def mapped_here(path: Path) -> bool:
    """Whether this process maps `path` (its device and inode) anywhere: /proc/self/maps, as the kernel has it."""
    info = path.stat()
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x} {info.st_ino} "
    return wanted in Path("/proc/self/maps").read_text()


def refused(call, *args, status: int = 400) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        call(*args)
    assert caught.value.status == status, caught.value.detail
    return caught.value


def test_regions_register_list_and_unregister_in_triton_s_shape(regions, segments):
    segment = segments()
    regions.register("output", key(segment), PAGE, 64)
    regions.register("input", segment.name, 0, 128)
    assert regions.status() == [
        {"name": "input", "key": segment.name, "offset": 0, "byte_size": 128},
        {"name": "output", "key": key(segment), "offset": PAGE, "byte_size": 64},
    ]
    assert regions.status("output") == [regions.status()[1]]
    assert (regions.count, regions.registered_bytes) == (2, 192)
    regions.unregister("output")
    assert refused(regions.status, "output", status=404).detail.code == "region_not_found"
    # unknown: no error, as Triton has it
    regions.unregister("output")
    regions.unregister()
    assert (regions.count, regions.registered_bytes, regions.status()) == (0, 0, [])


def test_bytes_written_through_a_use_are_the_client_s_and_back(regions, segments):
    segment = segments()
    segment.buf[PAGE + 100 : PAGE + 164] = bytes(range(64))
    regions.register("r", key(segment), PAGE + 100, 64)
    with regions.use("r", 8, 16) as held:
        assert held.live and bytes(held.buffer) == bytes(range(8, 24))
        held.buffer[:4] = b"\xff\xfe\xfd\xfc"
    assert bytes(segment.buf[PAGE + 108 : PAGE + 112]) == b"\xff\xfe\xfd\xfc"
    with regions.use("r", 64, 0) as held:
        assert len(held.buffer) == 0


@pytest.mark.parametrize("name", ["", "a" * 129, "a/b", "a b", "é", "a\n", 5, None])
def test_a_name_outside_its_grammar_is_refused(regions, segments, name):
    error = refused(regions.register, name, key(segments()), 0, 8)
    assert error.detail.code == "bad_region_name" and regions.count == 0


@pytest.mark.parametrize(
    "bad", ["", "/", "//x", "../etc/passwd", "/../etc/passwd", "..", "/..", ".", "/.", "a" * 256, "a\n", "a/b", 7]
)
def test_a_key_that_is_not_one_file_name_is_refused(regions, bad):
    error = refused(regions.register, "r", bad, 0, 8)
    assert error.detail.code == "bad_region_key" and regions.count == 0


def test_a_missing_key_is_refused(regions):
    assert refused(regions.register, "r", "/" + unique(), 0, 8).detail.code == "region_key_not_found"


def test_a_symlink_a_folder_and_a_fifo_are_not_segments(tmp_path):
    table = SharedMemoryRegions(max_regions=8, max_bytes=1 << 20, shm_dir=tmp_path)
    (tmp_path / "real").write_bytes(bytes(PAGE))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "folder", "fifo"):
        error = refused(table.register, "r", "/" + name, 0, 8)
        assert error.detail.code == "region_key_not_a_segment", name
    table.register("r", "/real", 0, 8)
    assert table.count == 1
    table.close()


def test_a_segment_of_another_user_is_refused(regions, segments):
    """As root the service could open it: the owner check alone refuses it (403)."""
    segment = segments()
    try:
        os.chown(SHM / segment.name, 65534, 65534)
    except PermissionError:
        # not root: the check on what fstat says of such a segment
        info = os.stat_result((0o100600, 1, 1, 1, 65534, 65534, PAGE, 0, 0, 0))
        error = refused(check_segment, info, key(segment), status=403)
    else:
        error = refused(regions.register, "r", key(segment), 0, 8, status=403)
    assert error.detail.code == "region_key_forbidden" and "65534" in error.detail.received
    assert regions.count == 0


@pytest.mark.parametrize(
    ("offset", "byte_size", "shown"),
    [
        (-1, 8, "-1"),
        (0, 0, "0"),
        (0, 2 * PAGE + 1, f"{2 * PAGE + 1}"),
        (2 * PAGE, 1, f"{2 * PAGE + 1}"),
        (True, 8, "True"),
        (0, 8.0, "8.0"),
    ],
)
def test_a_range_not_within_the_segment_is_refused_naming_its_numbers(regions, segments, offset, byte_size, shown):
    error = refused(regions.register, "r", key(segments()), offset, byte_size)
    assert error.detail.code == "bad_region_range" and shown in error.detail.message
    assert regions.count == 0


def test_a_name_registered_already_is_refused_and_kept_as_it_was(regions, segments):
    first, second = segments(), segments()
    regions.register("r", key(first), 0, 8)
    assert refused(regions.register, "r", key(second), 0, 16).detail.code == "region_exists"
    assert regions.status() == [{"name": "r", "key": key(first), "offset": 0, "byte_size": 8}]


def test_overlapping_ranges_of_one_segment_are_refused_and_disjoint_ones_kept(regions, segments):
    segment, other = segments(), segments()
    regions.register("a", key(segment), 0, 64)
    # the same file however the key is spelt
    for spelling, offset in ((key(segment), 32), (segment.name, 63), (key(segment), 0)):
        error = refused(regions.register, "b", spelling, offset, 64)
        assert error.detail.code == "region_overlaps" and "'a'" in error.detail.message
    regions.register("b", segment.name, 64, 64)
    regions.register("c", key(other), 0, 64)
    assert [row["name"] for row in regions.status()] == ["a", "b", "c"]


def test_past_the_bounds_registering_is_429(segments):
    table = SharedMemoryRegions(max_regions=2, max_bytes=100)
    segment = segments()
    table.register("a", key(segment), 0, 60)
    error = refused(table.register, "b", key(segment), 60, 41, status=429)
    assert error.detail.code == "regions_too_large" and "40" in error.detail.expected
    table.register("b", key(segment), 60, 40)
    assert refused(table.register, "c", key(segment), 100, 1, status=429).detail.code == "too_many_regions"
    assert (table.count, table.registered_bytes) == (2, 100)
    table.close()


def test_a_use_outside_a_registered_region_is_refused(regions, segments):
    regions.register("r", key(segments()), 0, 64)
    assert refused(regions.use("nope", 0, 8).__enter__).detail.code == "region_not_found"
    error = refused(regions.use("r", 60, 8).__enter__)
    assert error.detail.code == "bad_region_range" and "68" in error.detail.received and "64" in error.detail.message
    assert refused(regions.use("r", -1, 8).__enter__).detail.code == "bad_region_range"
    # no use left behind by a refusal: unregistering unmaps at once
    regions.unregister("r")
    assert regions.count == 0


def test_a_shrunk_segment_is_refused_not_faulted(tmp_path):
    table = SharedMemoryRegions(max_regions=8, max_bytes=1 << 20, shm_dir=tmp_path)
    (tmp_path / "seg").write_bytes(bytes(2 * PAGE))
    table.register("r", "/seg", PAGE, 64)
    os.truncate(tmp_path / "seg", PAGE)
    assert refused(table.use("r", 0, 8).__enter__).detail.code == "region_segment_shrunk"
    table.close()


def test_unregistering_during_a_use_keeps_its_memory_until_the_use_ends(regions, segments):
    segment = segments()
    regions.register("r", key(segment), 0, 64)
    with regions.use("r", 0, 64) as held:
        regions.unregister("r")
        assert not held.live and regions.count == 0
        assert refused(regions.use("r", 0, 8).__enter__).detail.code == "region_not_found"
        held.buffer[:3] = b"abc"
        assert bytes(held.buffer[:3]) == b"abc"
        assert regions.status() == []
    assert bytes(segment.buf[:3]) == b"abc"
    segment.close()
    assert not mapped_here(SHM / segment.name)


def test_a_view_kept_past_its_use_neither_raises_nor_loses_its_memory(regions, segments, caplog):
    segment = segments()
    segment.buf[:4] = b"keep"
    regions.register("r", key(segment), 0, 64)
    with regions.use("r", 0, 64) as held:
        # each holds a memoryview of its own on the mapping, which cannot be unmapped under it
        kept, exported = np.frombuffer(held.buffer, dtype=np.uint8), (ctypes.c_ubyte * 64).from_buffer(held.buffer)
    regions.unregister("r")
    segment.close()
    assert "outlived its use" in caplog.text
    # still mapped for the view that outlived its use, unmapped once that view goes
    assert kept[:4].tobytes() == bytes(exported[:4]) == b"keep" and mapped_here(SHM / segment.name)
    del kept, exported, held
    gc.collect()
    assert not mapped_here(SHM / segment.name)


def test_unregistering_and_closing_leave_no_mapping(regions, segments):
    first, second = segments(), segments()
    regions.register("a", key(first), 0, 8)
    regions.register("b", key(second), PAGE, 8)
    first.close()
    second.close()
    assert mapped_here(SHM / first.name) and mapped_here(SHM / second.name)
    regions.unregister("a")
    assert not mapped_here(SHM / first.name) and mapped_here(SHM / second.name)
    regions.close()
    assert not mapped_here(SHM / second.name) and regions.count == 0


def test_a_sweep_drops_a_region_whose_segment_was_unlinked(regions, segments):
    segment = segments()
    regions.register("gone", key(segment), 0, 8)
    regions.register("kept", key(segments()), 0, 8)
    # only this process maps it: no client seen, kept by the sweep
    assert regions.sweep() == []
    segment.close()
    segment.unlink()
    assert regions.sweep() == ["gone"]
    assert [row["name"] for row in regions.status()] == ["kept"]


def test_a_sweep_drops_the_region_of_a_client_that_was_killed(regions):
    name, size = unique(), 2 * PAGE
    path = SHM / name
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(path), str(size)], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        regions.register("r", "/" + name, PAGE, 64)
        assert regions.sweep() == [] and mapped_here(path)
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=60)
        assert regions.sweep() == ["r"]
        assert not mapped_here(path) and regions.count == 0
    finally:
        client.kill()
        client.wait(timeout=60)
        client.stdout.close()
        path.unlink(missing_ok=True)


def test_the_scan_skips_what_it_cannot_read(tmp_path):
    """Odd lines, a process without maps, a name that is no pid, and this process itself: none breaks the scan."""
    wanted = {(0, 26, 4242), (0, 26, 7)}
    (tmp_path / "100").mkdir()
    (tmp_path / "100" / "maps").write_text(
        "garbage\n7f00-7f10 rw-s 00000000 zz:1a 4242 /dev/shm/x\n\n"
        "7f10-7f20 rw-s 00000000 00:1a 4242 /dev/shm/x (deleted)\n"
    )
    (tmp_path / "101").mkdir()
    (tmp_path / "self").mkdir()
    (tmp_path / str(os.getpid())).mkdir()
    (tmp_path / str(os.getpid()) / "maps").write_text("7f10-7f20 rw-s 00000000 00:1a 7 /dev/shm/y\n")
    assert mapped_elsewhere(wanted, tmp_path) == {(0, 26, 4242)}
    assert mapped_elsewhere(set(), tmp_path) == set()
    assert mapped_elsewhere(wanted, tmp_path / "absent") == set()
