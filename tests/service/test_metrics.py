"""/metrics follows Prometheus's conventions: every series belongs to a declared family, a count that only grows is a
counter named `_total`, a level a gauge, histograms whole; the process's series and `akd_build_info` are there; and
no counter ever goes down. A real service with a real cache, scraped before and after real queries; the text is
read by prometheus_client's parser and by the small one here, which checks what that parser lets pass."""

from __future__ import annotations

import platform
import re

import httpx
import pytest
import torch
from conftest import HANG_S, live_server, mnist_teacher, random_inputs, write_config
from prometheus_client.parser import text_string_to_metric_families

from shared import codec
from shared.version import VERSION

# Every family the service writes, by the name its TYPE line gives, and its type (process_max_fds and
# process_virtual_memory_bytes are the process collector's too).
FAMILIES = {
    "akd_shm_regions": "gauge",
    "akd_shm_bytes": "gauge",
    "akd_requests_total": "counter",
    "akd_rows_total": "counter",
    "akd_device_batches_total": "counter",
    "akd_cache_hits_total": "counter",
    "akd_cache_misses_total": "counter",
    "akd_nonfinite_rows_total": "counter",
    "akd_cache_write_errors_total": "counter",
    "akd_cache_evicted_rows_total": "counter",
    "akd_cache_damaged_rows_total": "counter",
    "akd_cache_damaged_namespaces_total": "counter",
    "akd_batch_rows": "histogram",
    "akd_queue_wait_seconds": "histogram",
    "akd_compute_seconds": "histogram",
    "akd_batch_rows_max": "gauge",
    "akd_queue_rows": "gauge",
    "akd_inflight_bytes": "gauge",
    "akd_cache_rows": "gauge",
    "akd_cache_committed_rows": "gauge",
    "akd_cache_bytes": "gauge",
    "akd_cache_max_bytes": "gauge",
    "akd_cache_full": "gauge",
    "akd_build_info": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
}
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)")
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def family_of(types: dict[str, str], name: str) -> str:
    """The declared family a sample name belongs to: its own name, or a histogram's less its part's suffix."""
    if name in types:
        return name
    family = next((name.removesuffix(part) for part in HISTOGRAM_PARTS if name.endswith(part)), None)
    assert types.get(family) == "histogram", f"{name} is no series of a declared family"
    return family


def parse(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """({family: type} from the TYPE lines, {series with its labels: value}), checking that every family is declared
    once, before its samples, and that each sample is a series of its family's type."""
    types: dict[str, str] = {}
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types, f"{name} declared twice"
            types[name] = kind
        elif line and not line.startswith("#"):
            name, labels, value = SAMPLE.fullmatch(line).groups()
            family_of(types, name)
            series[name + (labels or "")] = float(value)
    return types, series


@pytest.fixture
def scrape(tmp_path, mnist_members):
    config = write_config(
        tmp_path / "teachers.toml",
        {"ens": mnist_teacher([(mnist_members["a"], 1.0), (mnist_members["b"], 1.0)])},
        server={"device": "cpu", "cache": {"dir": str(tmp_path / "cache")}},
    )
    with live_server(config) as (base, _):

        def scraped(queries: int = 0) -> str:
            for seed in range(queries):
                body = codec.encode_inputs(random_inputs(4, seed=seed))
                assert httpx.post(f"{base}/soft-targets", content=body, timeout=HANG_S).status_code == 200
            return httpx.get(f"{base}/metrics", timeout=HANG_S).text

        yield scraped


def test_every_family_has_the_conventional_type_and_name(scrape):
    text = scrape(queries=2)
    # prometheus_client's parser reads it whole
    assert list(text_string_to_metric_families(text))
    types, series = parse(text)
    created = {name: kind for name, kind in types.items() if name.endswith("_created")}
    # prometheus_client's creation times of its counters and histograms: gauges, one per family that has them
    assert set(created.values()) == {"gauge"}
    assert {name: kind for name, kind in types.items() if name not in created} == FAMILIES
    assert all((kind == "counter") == name.endswith("_total") for name, kind in types.items())
    for name in ("akd_batch_rows", "akd_compute_seconds"):
        assert series[f'{name}_bucket{{le="+Inf",teacher="ens"}}'] == series[f'{name}_count{{teacher="ens"}}'] > 0
    build = f'akd_build_info{{python="{platform.python_version()}",torch="{torch.__version__}",version="{VERSION}"}}'
    assert series[build] == 1
    assert series["process_resident_memory_bytes"] > 0 and series["process_open_fds"] > 0
    assert series["process_cpu_seconds_total"] > 0 and series["process_start_time_seconds"] > 0


def test_counters_only_go_up(scrape):
    before = parse(scrape(queries=1))
    after = parse(scrape(queries=2))
    monotonic = {name for name, kind in before[0].items() if kind in ("counter", "histogram")}
    counted = {key: value for key, value in before[1].items() if family_of(before[0], key.split("{")[0]) in monotonic}
    assert counted and all(after[1][key] >= value for key, value in counted.items())
    assert (
        after[1]['akd_requests_total{status="200",teacher="ens"}']
        == before[1]['akd_requests_total{status="200",teacher="ens"}'] + 2
    )
    # every member's cache counters are series from the start
    assert sum(1 for key in counted if key.startswith("akd_cache_write_errors_total{")) == 2
