"""GET /teachers, /healthz, /metrics, and OpenAPI docs that describe the binary format."""

from __future__ import annotations

import httpx
import pytest
from conftest import HANG_S, live_server, mnist_teacher, random_inputs, write_config

from shared import codec
from shared.hashing import file_version
from shared.protocol import TeachersResponse


@pytest.fixture
def server(tmp_path, mnist_members):
    members = [(mnist_members["a"], 1.0), (mnist_members["b"], 3.0)]
    config = write_config(
        tmp_path / "t.toml",
        {
            "ens": mnist_teacher(members, aggregate="logits", temperature=3.0),
            "solo": mnist_teacher([(mnist_members["c"], 1.0)]),
        },
    )
    with live_server(config) as (base, _):
        yield base


def test_teachers_lists_members_versions_and_shapes(server, mnist_members):
    info = TeachersResponse.model_validate(httpx.get(f"{server}/teachers", timeout=HANG_S).json())
    teachers = {t.name: t for t in info.teachers}
    ens = teachers["ens"]
    assert (ens.num_classes, ens.input_shape, ens.aggregate.value, ens.temperature) == (10, (1, 28, 28), "logits", 3.0)
    assert [m.version for m in ens.members] == [file_version(mnist_members["a"]), file_version(mnist_members["b"])]
    assert [m.weight for m in ens.members] == [0.25, 0.75]
    assert ens.members[1].metadata == {"epoch": 7, "seed": 2} and ens.members[1].arch == "small_cnn"
    assert teachers["solo"].members[0].source == "export"


def test_teacher_is_required_when_several_are_served(server):
    r = httpx.post(f"{server}/soft-targets", content=codec.encode_inputs(random_inputs(1)), timeout=HANG_S)
    assert r.status_code == 400 and r.json()["error"]["code"] == "teacher_required"
    assert "ens" in r.json()["error"]["expected"]


def test_healthz_and_metrics(server):
    assert httpx.get(f"{server}/healthz", timeout=HANG_S).json() == {
        "status": "ok",
        "device": "cpu",
        "teachers": ["ens", "solo"],
    }
    httpx.post(
        f"{server}/soft-targets",
        params={"teacher": "solo"},
        content=codec.encode_inputs(random_inputs(3)),
        timeout=HANG_S,
    )
    text = httpx.get(f"{server}/metrics", timeout=HANG_S).text
    for name in (
        "akd_requests_total",
        "akd_rows_total",
        "akd_batch_rows_bucket",
        "akd_queue_wait_seconds_bucket",
        "akd_compute_seconds_bucket",
        "akd_cache_hits_total",
        "akd_cache_misses_total",
        "akd_queue_rows",
    ):
        assert name in text, name
    assert 'akd_requests_total{status="200",teacher="solo"} 1.0' in text
    assert 'akd_rows_total{teacher="solo"} 3.0' in text


def test_openapi_describes_the_binary_format(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=HANG_S).json()
    op = spec["paths"]["/soft-targets"]["post"]
    body = op["requestBody"]
    assert body["content"]["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    assert (
        "safetensors" in body["description"]
        and "uint8" in body["description"]
        and "(B, C, H, W)" in body["description"]
    )
    ok = op["responses"]["200"]
    assert "application/octet-stream" in ok["content"] and "member_logits" in ok["description"]
    assert {"X-Cache-Hits", "X-Teacher-Versions"} <= set(ok["headers"])
    params = {p["name"] for p in op["parameters"]}
    assert params == {"teacher", "temperature", "outputs", "cache"}
    # what a wrong query parameter gets (400) and what a wrong `inputs` tensor gets (422), as the service answers
    assert (
        "query parameter" in op["responses"]["400"]["description"]
        and "`inputs`" in op["responses"]["422"]["description"]
    )
    # FastAPI's default 422 for parameters is not what the service sends
    assert "HTTPValidationError" not in str(spec)
    r = httpx.post(
        f"{server}/soft-targets", params={"teacher": "solo", "temperature": "-1"}, content=b"", timeout=HANG_S
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_parameter"
    assert httpx.get(f"{server}/docs", timeout=HANG_S).status_code == 200


def test_openapi_requires_teacher_where_several_are_served_and_declares_no_token_unset(server):
    """The spec is true of this service: two teachers served, so `teacher` is required (one of their names) on both
    POST routes, and no token is set, so no security scheme and no 401 is promised."""
    spec = httpx.get(f"{server}/openapi.json", timeout=HANG_S).json()
    for path in ("/soft-targets", "/soft-targets/keys"):
        (teacher,) = [p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "teacher"]
        assert teacher["required"] is True, (path, teacher)
        assert teacher["schema"] == {"type": "string", "enum": ["ens", "solo"], "title": "Teacher"}
        assert "several" in teacher["description"]
    assert "securitySchemes" not in spec.get("components", {})
    operations = [op for ops in spec["paths"].values() for op in ops.values()]
    assert all("security" not in op and "401" not in op["responses"] for op in operations)
    # what the spec says is what the service does: no teacher named, a 400 that names the served ones
    r = httpx.post(f"{server}/soft-targets", content=codec.encode_inputs(random_inputs(1)), timeout=HANG_S)
    assert r.status_code == 400 and r.json()["error"]["code"] == "teacher_required"
