"""Bad input gets a clear 4xx JSON error (never a 500), and the service keeps serving.

One real server for the module (uvicorn on a loopback port, a zarr cache, a small body
limit); every bad request is followed by a good one that must still get correct
soft targets. A second small server checks the optional bearer token.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import struct
import time

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    export_member,
    live_server,
    metric,
    metric_series,
    mnist_teacher,
    random_inputs,
    raw_connect,
    raw_head,
    raw_response,
    save_member,
    write_config,
)
from safetensors.torch import save as st_save

from shared.codec import decode, encode_inputs
from shared.protocol import HEADER_CACHE_HITS, INPUT_DTYPES
from teacher_service import scrape

MAX_BODY = 200_000
MAX_ROWS = 64
EXPECTED_SHAPE = "(B, 1, 28, 28)"
SOFT_TARGETS = "/soft-targets"
MNIST = {"teacher": "mnist"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    return {
        "a": save_member(root / "a.pt", seed=1),
        "b": save_member(root / "b.pt", seed=2, epoch=7),
        "c": export_member(root / "c.pt2", seed=3),
    }


@pytest.fixture(scope="module")
def client(members, tmp_path_factory):
    """Two teachers (so `teacher` must be named), a cache, a 200 kB body limit, a 64-row queue."""
    root = tmp_path_factory.mktemp("bad_inputs")
    config = write_config(
        root / "teachers.toml",
        {
            "mnist": mnist_teacher([(members["a"], 1.0), (members["b"], 2.0), (members["c"], 1.0)]),
            "solo": mnist_teacher([(members["b"], 1.0)]),
        },
        server={
            "device": "cpu",
            "cache": {"dir": str(root / "cache"), "flush_s": 0.5},
            "limits": {"body_bytes": MAX_BODY, "queue_rows": MAX_ROWS},
        },
    )
    with live_server(config) as (base, _app), httpx.Client(base_url=base, timeout=HANG_S) as c:
        yield c


@pytest.fixture(scope="module")
def token_client(members, tmp_path_factory):
    root = tmp_path_factory.mktemp("token")
    config = write_config(
        root / "teachers.toml",
        {"mnist": mnist_teacher([(members["a"], 1.0), (members["c"], 1.0)])},
        server={"device": "cpu", "token": "s3cret"},
    )
    with live_server(config) as (base, _app), httpx.Client(base_url=base, timeout=HANG_S) as c:
        yield c


# --------------------------------------------------------------------------- helpers

_good_seed = iter(range(10_000, 20_000))


def assert_still_serving(client: httpx.Client, headers: dict | None = None, params: dict | None = None) -> None:
    """A fresh good request (bypassing the cache, so the models really run) gets correct probs."""
    x = random_inputs(3, seed=next(_good_seed))
    r = client.post(
        SOFT_TARGETS, params={**(params or MNIST), "cache": "bypass"}, content=encode_inputs(x), headers=headers
    )
    assert r.status_code == 200, r.text
    probs = decode(r.content)["probs"]
    assert probs.dtype == torch.float32
    assert probs.shape == (3, 10)
    assert bool(torch.isfinite(probs).all())
    assert torch.allclose(probs.sum(dim=-1), torch.ones(3), atol=1e-5)


def assert_error(r: httpx.Response, status: int, code: str, expected=(), received=(), message=()) -> dict:
    """A JSON error with this status and code whose `expected`/`received` mention the given strings."""
    assert r.status_code == status, f"{r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    err = body["error"]
    assert set(err) >= {"code", "message", "expected", "received"}
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["expected"], str) and err["expected"], err
    assert isinstance(err["received"], str) and err["received"], err
    for s in expected:
        assert s in err["expected"], (s, err)
    for s in received:
        assert s in err["received"], (s, err)
    for s in message:
        assert s in err["message"], (s, err)
    return err


def body_of(**tensors: torch.Tensor) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()})


def _with(value: float, dtype=torch.float32) -> torch.Tensor:
    x = random_inputs(2, seed=5).to(dtype)
    x[1, 0, 3, 4] = value
    return x


# --------------------------------------------------------------------------- the inputs tensor (422)

ALLOWED = list(INPUT_DTYPES)

TENSOR_CASES = [
    # id, tensors in the body, code, substrings of expected, substrings of received
    (
        "shape_28x27",
        lambda: {"inputs": torch.rand(2, 1, 28, 27)},
        "bad_shape",
        [EXPECTED_SHAPE],
        ["(2, 1, 28, 27)", "float32"],
    ),
    ("channels_3", lambda: {"inputs": torch.rand(2, 3, 28, 28)}, "bad_channels", [EXPECTED_SHAPE], ["(2, 3, 28, 28)"]),
    ("ndim_3", lambda: {"inputs": torch.rand(1, 28, 28)}, "bad_shape", [EXPECTED_SHAPE], ["(1, 28, 28)"]),
    ("ndim_5", lambda: {"inputs": torch.rand(2, 1, 1, 28, 28)}, "bad_shape", [EXPECTED_SHAPE], ["(2, 1, 1, 28, 28)"]),
    (
        "zero_rows",
        lambda: {"inputs": torch.rand(0, 1, 28, 28)},
        "bad_shape",
        [EXPECTED_SHAPE, "B >= 1"],
        ["(0, 1, 28, 28)"],
    ),
    ("dtype_int64", lambda: {"inputs": torch.randint(0, 2, (2, 1, 28, 28))}, "bad_dtype", ALLOWED, ["int64"]),
    (
        "dtype_float64",
        lambda: {"inputs": torch.rand(2, 1, 28, 28, dtype=torch.float64)},
        "bad_dtype",
        ALLOWED,
        ["float64"],
    ),
    ("dtype_bool", lambda: {"inputs": torch.zeros(2, 1, 28, 28, dtype=torch.bool)}, "bad_dtype", ALLOWED, ["bool"]),
    ("nan", lambda: {"inputs": _with(float("nan"))}, "not_finite", ["finite"], ["1 non-finite"]),
    ("pos_inf", lambda: {"inputs": _with(float("inf"))}, "not_finite", ["finite"], ["1 non-finite"]),
    ("neg_inf", lambda: {"inputs": _with(float("-inf"))}, "not_finite", ["finite"], ["1 non-finite"]),
    ("nan_float16", lambda: {"inputs": _with(float("nan"), torch.float16)}, "not_finite", ["finite"], ["1 non-finite"]),
    ("above_one", lambda: {"inputs": _with(1.5)}, "out_of_range", ["[0, 1]"], ["1.5"]),
    ("below_zero", lambda: {"inputs": _with(-0.25)}, "out_of_range", ["[0, 1]"], ["-0.25"]),
    ("above_one_float16", lambda: {"inputs": _with(2.0, torch.float16)}, "out_of_range", ["[0, 1]"], ["2"]),
    ("missing_inputs", lambda: {"images": torch.rand(2, 1, 28, 28)}, "missing_inputs", ["'inputs'"], ["'images'"]),
    ("no_tensors", lambda: {}, "missing_inputs", ["'inputs'"], ["no tensors"]),
]


@pytest.mark.parametrize(
    ("tensors", "code", "expected", "received"),
    [pytest.param(*case[1:], id=case[0]) for case in TENSOR_CASES],
)
def test_bad_inputs_tensor_is_422(client, tensors, code, expected, received):
    r = client.post(SOFT_TARGETS, params=MNIST, content=body_of(**tensors()))
    assert_error(r, 422, code, expected, received)
    assert_still_serving(client)


# --------------------------------------------------------------------------- bodies that are not safetensors (400)


def _valid_body() -> bytes:
    return encode_inputs(random_inputs(2, seed=7))


BODY_CASES = [
    ("random_bytes", lambda: os.urandom(4096)),
    ("truncated_half", lambda: (b := _valid_body())[: len(b) // 2]),
    ("truncated_last_byte", lambda: _valid_body()[:-1]),
    ("header_only_length", lambda: _valid_body()[:8]),
    ("tiny", lambda: b"\x01\x02\x03"),
    ("json_text", lambda: b'{"inputs": [[0.5]]}'),
]


@pytest.mark.parametrize("make_body", [pytest.param(f, id=i) for i, f in BODY_CASES])
def test_body_that_is_not_safetensors_is_400(client, make_body):
    body = make_body()
    r = client.post(SOFT_TARGETS, params=MNIST, content=body)
    assert_error(r, 400, "bad_body", ["safetensors"], [f"{len(body)} bytes"])
    assert_still_serving(client)


def test_empty_body_is_400(client):
    r = client.post(SOFT_TARGETS, params=MNIST, content=b"")
    assert_error(r, 400, "bad_body", ["safetensors"], ["0 bytes"], message=["empty"])
    assert_still_serving(client)


# --------------------------------------------------------------------------- query parameters


def test_unknown_teacher_is_404(client):
    r = client.post(SOFT_TARGETS, params={"teacher": "nope"}, content=_valid_body())
    assert_error(r, 404, "unknown_teacher", ["'mnist'", "'solo'"], ["'nope'"])
    assert_still_serving(client)


def test_unnamed_teacher_with_several_served_is_400(client):
    r = client.post(SOFT_TARGETS, content=_valid_body())
    assert_error(r, 400, "teacher_required", ["'mnist'", "'solo'"], ["no teacher"])
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("outputs", "received"),
    [("bogus", "'bogus'"), ("probs,bogus", "'probs,bogus'"), ("", "''"), (" , ", "' , '")],
    ids=["unknown", "one_unknown", "empty", "blank_items"],
)
def test_bad_outputs_is_400(client, outputs, received):
    r = client.post(SOFT_TARGETS, params={**MNIST, "outputs": outputs}, content=_valid_body())
    assert_error(r, 400, "bad_outputs", ["probs", "logits", "member_logits"], [received])
    assert_still_serving(client)


@pytest.mark.parametrize(
    "value",
    ["0", "-1", "abc", "inf", "nan", "-0.0", ""],
    ids=["zero", "minus_one", "abc", "inf", "nan", "neg_zero", "empty"],
)
def test_bad_temperature_is_400(client, value):
    """A wrong query parameter is the client's 400 (as docs/api.md and the OpenAPI spec say), not FastAPI's default
    422."""
    r = client.post(SOFT_TARGETS, params={**MNIST, "temperature": value}, content=_valid_body())
    assert_error(r, 400, "bad_parameter", received=[repr(value)], message=["temperature"])
    assert_still_serving(client)


def test_temperature_error_says_it_must_be_positive(client):
    r = client.post(SOFT_TARGETS, params={**MNIST, "temperature": "0"}, content=_valid_body())
    err = assert_error(r, 400, "bad_parameter", received=["'0'"], message=["temperature"])
    assert "greater than 0" in err["expected"]


def test_unknown_cache_mode_is_400(client):
    r = client.post(SOFT_TARGETS, params={**MNIST, "cache": "sometimes"}, content=_valid_body())
    assert_error(r, 400, "bad_parameter", ["use", "bypass", "refresh"], ["'sometimes'"], message=["cache"])
    assert_still_serving(client)


# --------------------------------------------------------------------------- too large (413)


def test_body_over_the_limit_with_content_length_is_413(client):
    # a valid body, just too big
    body = encode_inputs(torch.zeros(256, 1, 28, 28, dtype=torch.uint8))
    assert len(body) > MAX_BODY
    r = client.post(SOFT_TARGETS, params=MNIST, content=body)
    assert r.request.headers["content-length"] == str(len(body))
    assert_error(r, 413, "body_too_large", [f"at most {MAX_BODY} bytes"], [f"{len(body)} bytes"])
    assert_still_serving(client)


def test_streamed_body_over_the_limit_is_413(client):
    """Chunked transfer: no content-length, the server must stop reading past the limit."""
    chunk = b"\0" * 50_000

    def stream():
        # 300 kB, never declared up front
        for _ in range(6):
            yield chunk

    r = client.post(SOFT_TARGETS, params=MNIST, content=stream())
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "body_too_large", [f"at most {MAX_BODY} bytes"], [f"more than {MAX_BODY} bytes"])
    assert_still_serving(client)


def test_streamed_body_under_the_limit_is_served(client):
    """Chunked transfer of a good body works: the limit counts bytes, it does not need content-length."""
    x = random_inputs(2, seed=11)
    body = encode_inputs(x)

    def stream():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = client.post(SOFT_TARGETS, params=MNIST, content=stream())
    assert r.status_code == 200, r.text
    assert decode(r.content)["probs"].shape == (2, 10)


def test_too_many_rows_is_413(client):
    body = encode_inputs(torch.zeros(MAX_ROWS + 1, 1, 28, 28, dtype=torch.uint8))
    assert len(body) <= MAX_BODY
    r = client.post(SOFT_TARGETS, params=MNIST, content=body)
    assert_error(r, 413, "too_many_rows", [f"at most {MAX_ROWS} rows"], [f"{MAX_ROWS + 1} rows"])
    assert_still_serving(client)


def _header_of(body: bytes) -> bytes:
    """The safetensors header of a body: its 8-byte length and the JSON that declares dtype and shape."""
    (n,) = struct.unpack("<Q", body[:8])
    return body[: 8 + n]


HEADER_CASES = [
    # id, tensors, status, code, received
    (
        "too_many_rows",
        lambda: {"inputs": torch.zeros(MAX_ROWS + 1, 1, 28, 28, dtype=torch.uint8)},
        413,
        "too_many_rows",
        f"{MAX_ROWS + 1} rows",
    ),
    ("dtype_float64", lambda: {"inputs": torch.zeros(2, 1, 28, 28, dtype=torch.float64)}, 422, "bad_dtype", "float64"),
    (
        "shape",
        lambda: {"inputs": torch.zeros(2, 1, 28, 27)},
        422,
        "bad_shape",
        "float32 tensor of shape (2, 1, 28, 27)",
    ),
    (
        "channels",
        lambda: {"inputs": torch.zeros(2, 3, 28, 28, dtype=torch.uint8)},
        422,
        "bad_channels",
        "(2, 3, 28, 28)",
    ),
    ("missing_inputs", lambda: {"images": torch.zeros(2, 1, 28, 28)}, 422, "missing_inputs", "'images'"),
]


@pytest.mark.parametrize(
    ("tensors", "status", "code", "received"), [pytest.param(*c[1:], id=c[0]) for c in HEADER_CASES]
)
def test_refused_from_the_header_before_the_body_arrives(client, tensors, status, code, received):
    """The header (the first bytes) decides: the answer comes while the rest of the body was never sent."""
    body = body_of(**tensors())
    header = _header_of(body)
    assert len(header) < 200 < len(body) <= MAX_BODY
    with raw_connect(str(client.base_url)) as sock:
        sock.sendall(raw_head("POST", f"{SOFT_TARGETS}?teacher=mnist", {"Content-Length": len(body)}) + header)
        # without the rest of the body
        got, headers, payload = raw_response(sock)
    assert got == status, payload
    err = httpx.Response(got, headers=headers, content=payload).json()["error"]
    assert err["code"] == code and received in err["received"], err
    assert_still_serving(client)


def test_header_refusal_matches_the_refusal_of_a_whole_body(client):
    """Sent whole (so the header check and the decoded check both see it), each case gets the same error."""
    for _, tensors, status, code, received in HEADER_CASES:
        r = client.post(SOFT_TARGETS, params=MNIST, content=body_of(**tensors()))
        assert_error(r, status, code, received=[received])
    assert_still_serving(client)


ROUTING_REFUSALS = [
    ("GET", "/nope", 404, "not_found", None),
    ("POST", "/soft-targets/nope", 404, "not_found", None),
    ("GET", "/soft-targets", 405, "method_not_allowed", "POST"),
    ("PUT", "/soft-targets/keys", 405, "method_not_allowed", "POST"),
    ("DELETE", "/teachers", 405, "method_not_allowed", "GET"),
    ("POST", "/healthz", 405, "method_not_allowed", "GET"),
]


@pytest.mark.parametrize(("method", "path", "status", "code", "allow"), ROUTING_REFUSALS)
def test_unknown_path_and_wrong_method_get_the_error_shape(client, method, path, status, code, allow):
    """The router's own refusals (no such path, a method the path does not answer) are JSON of the documented
    shape too, with the right status and, for a 405, the Allow header naming what the path answers."""
    r = client.request(method, path, params=MNIST, content=_valid_body() if method in ("POST", "PUT") else None)
    err = assert_error(r, status, code, received=[f"{method} {path}"])
    assert "detail" not in r.json()
    if allow:
        assert allow in r.headers["allow"].split(", ") and allow in err["expected"], (r.headers, err)
        assert method not in r.headers["allow"]
    else:
        assert "allow" not in r.headers
        assert "GET /openapi.json lists them" in err["expected"], err
    assert_still_serving(client)


# --------------------------------------------------------------------------- the cache and the metrics


def _bad_requests(client: httpx.Client) -> list[int]:
    """One of every kind of bad request; the rows look like the cached ones where they can."""
    x = random_inputs(4, seed=321)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    good = encode_inputs(x)
    sent = [
        client.post(SOFT_TARGETS, params=MNIST, content=body_of(inputs=x.double())),
        client.post(SOFT_TARGETS, params=MNIST, content=body_of(inputs=nan)),
        client.post(SOFT_TARGETS, params=MNIST, content=body_of(inputs=x * 2)),
        client.post(SOFT_TARGETS, params=MNIST, content=body_of(inputs=x[:, :, :, :27])),
        client.post(SOFT_TARGETS, params=MNIST, content=body_of(inputs=x.expand(4, 3, 28, 28))),
        client.post(SOFT_TARGETS, params=MNIST, content=body_of(images=x)),
        client.post(SOFT_TARGETS, params=MNIST, content=good[: len(good) // 2]),
        client.post(SOFT_TARGETS, params=MNIST, content=os.urandom(1000)),
        client.post(SOFT_TARGETS, params=MNIST, content=b""),
        client.post(SOFT_TARGETS, params={"teacher": "nope"}, content=good),
        client.post(SOFT_TARGETS, params={**MNIST, "outputs": "bogus"}, content=good),
        client.post(SOFT_TARGETS, params={**MNIST, "temperature": "0"}, content=good),
        client.post(SOFT_TARGETS, params={**MNIST, "temperature": "-1"}, content=good),
        client.post(SOFT_TARGETS, params={**MNIST, "cache": "sometimes"}, content=good),
        client.post(SOFT_TARGETS, params=MNIST, content=b"\0" * (MAX_BODY + 1)),
        client.post(SOFT_TARGETS, params=MNIST, content=iter([b"\0" * 150_000] * 2)),
    ]
    statuses = [r.status_code for r in sent]
    assert all(400 <= s < 500 for s in statuses), statuses
    return statuses


def test_bad_requests_do_not_corrupt_the_cache(client):
    # the same rows that _bad_requests mangles
    x = random_inputs(4, seed=321)
    params = {**MNIST, "outputs": "probs,logits,member_logits"}
    first = client.post(SOFT_TARGETS, params=params, content=encode_inputs(x))
    assert first.status_code == 200, first.text
    cached = client.post(SOFT_TARGETS, params=params, content=encode_inputs(x))
    assert cached.status_code == 200
    assert cached.headers[HEADER_CACHE_HITS] == "4"
    assert cached.content == first.content

    _bad_requests(client)

    after = client.post(SOFT_TARGETS, params=params, content=encode_inputs(x))
    assert after.status_code == 200, after.text
    assert after.headers[HEADER_CACHE_HITS] == "4"
    assert after.content == cached.content
    out = decode(after.content)
    assert out["probs"].shape == (4, 10)
    assert out["logits"].shape == (4, 10)
    assert out["member_logits"].shape == (3, 4, 10)
    # and the uncached path agrees with what the cache returns
    fresh = client.post(SOFT_TARGETS, params={**params, "cache": "bypass"}, content=encode_inputs(x))
    assert fresh.headers[HEADER_CACHE_HITS] == "0"
    assert fresh.content == after.content


def test_metrics_count_the_errors_and_no_500(client):
    statuses = _bad_requests(client)
    assert_still_serving(client)
    r = client.get("/metrics")
    assert r.status_code == 200
    text = r.text
    assert 'status="500"' not in text
    assert not re.search(r'status="5\d\d"', text)
    counted = {int(labels["status"]) for labels, value in scrape.labelled(text, "akd_requests_total") if value > 0}
    assert set(statuses) <= counted, (set(statuses), counted)
    assert 200 in counted


def _series(text: str) -> set[str]:
    """Every metric series (name and labels) in a Prometheus text page."""
    return {name for name in metric_series(text) if name.startswith("akd_")}


def _count(text: str, status: int, teacher: str = "mnist") -> float:
    return metric(text, f'akd_requests_total{{status="{status}",teacher="{teacher}"}}', default=0.0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_client_hanging_up_mid_upload_is_a_499_not_a_500(client):
    """The client's doing: counted as 499, one log line and no traceback, and the server keeps serving."""
    records = _Records()
    # uvicorn's loggers do not propagate to the root
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    service_log = logging.getLogger("akd.service")
    level = service_log.level
    for lg in loggers:
        lg.addHandler(records)
    service_log.setLevel(logging.INFO)
    try:
        before = client.get("/metrics").text
        body = _valid_body()
        with raw_connect(str(client.base_url)) as sock:
            sock.sendall(
                raw_head("POST", f"{SOFT_TARGETS}?teacher=mnist", {"Content-Length": len(body)})
                + body[: len(body) // 2]
            )
        deadline = time.monotonic() + HANG_S
        while _count(text := client.get("/metrics").text, 499) == _count(before, 499):
            assert time.monotonic() < deadline, "the hang-up was never counted"
            time.sleep(0.05)
    finally:
        for lg in loggers:
            lg.removeHandler(records)
        service_log.setLevel(level)
    assert _count(text, 499) == _count(before, 499) + 1
    assert not re.search(r'status="5\d\d"', text)
    assert [r for r in records.records if r.exc_info] == []
    gone = [r.getMessage() for r in records.records if r.name == "akd.service" and "went away" in r.getMessage()]
    # how much of the half the app read before the hang-up showed depends on the scheduling: at most that half
    assert len(gone) == 1 and re.fullmatch(
        rf"POST /soft-targets: the client went away after \d+ of {len(body)} body bytes", gone[0]
    ), gone
    assert int(gone[0].split(" after ")[1].split()[0]) <= len(body) // 2
    assert_still_serving(client)


# --------------------------------------------------------------------------- the bearer token (401)


def test_token_missing_is_401(token_client):
    r = token_client.post(SOFT_TARGETS, content=_valid_body())
    assert_error(r, 401, "unauthorized", ["Authorization: Bearer"], ["no Authorization header"])
    assert r.headers["www-authenticate"] == "Bearer"
    assert "s3cret" not in r.text


@pytest.mark.parametrize(
    "header",
    ["Bearer nope", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer"],
    ids=["wrong", "prefix", "longer", "basic", "no_scheme", "scheme_only"],
)
def test_token_wrong_is_401(token_client, header):
    r = token_client.post(SOFT_TARGETS, content=_valid_body(), headers={"Authorization": header})
    assert_error(r, 401, "unauthorized", ["Authorization: Bearer"], ["a different token"])
    assert "s3cret" not in r.text


def test_token_right_is_200(token_client):
    assert_still_serving(token_client, headers={"Authorization": "Bearer s3cret"}, params={})


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR", "Bearer "], ids=["lower", "upper", "mixed", "2sp"])
def test_token_scheme_is_matched_in_any_case(token_client, scheme):
    """RFC 9110 (section 11.1): the auth scheme is case-insensitive, and one or more spaces may follow it."""
    headers = {"Authorization": f"{scheme} s3cret"}
    assert_still_serving(token_client, headers=headers, params={})
    assert token_client.get("/teachers", headers=headers).status_code == 200
    wrong = token_client.get("/teachers", headers={"Authorization": f"{scheme} s3creT"})
    assert_error(wrong, 401, "unauthorized", received=["a different token"])


def test_openapi_declares_the_bearer_token_and_healthz_stays_open(token_client):
    """The spec says what the service asks: an HTTP bearer scheme (what /docs' Authorize and OpenAPI tools send) on
    every operation but the probes (/healthz, /readyz), each with its 401; `teacher` is optional where one teacher is
    served."""
    spec = token_client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
    schemes = spec["components"]["securitySchemes"]
    assert [(s["type"], s["scheme"]) for s in schemes.values()] == [("http", "bearer")]
    (name,) = schemes
    operations = {(path, method): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert {
        ("post", "/soft-targets"),
        ("get", "/teachers"),
        ("get", "/metrics"),
        ("get", "/healthz"),
        ("get", "/readyz"),
    } <= {(m, p) for p, m in operations}
    for (path, method), op in operations.items():
        if path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert "security" not in op and "401" not in op["responses"], op
        else:
            assert op["security"] == [{name: []}], (path, method)
            # the Open Inference Protocol's routes refuse in its error shape
            shape = "/ErrorResponse" if path.startswith("/v2") else "/ErrorBody"
            assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith(shape)
    (teacher,) = [p for p in operations[("/soft-targets", "post")]["parameters"] if p["name"] == "teacher"]
    assert teacher["required"] is False and teacher["schema"]["enum"] == ["mnist"]
    # no global requirement that /healthz would inherit
    assert "security" not in spec
    assert token_client.get("/healthz").status_code == 200
    assert token_client.get("/readyz").status_code == 200


def test_token_is_checked_before_the_body(token_client):
    """An unauthenticated client learns nothing about its body: 401, not a 400/413."""
    r = token_client.post(SOFT_TARGETS, content=os.urandom(100))
    assert_error(r, 401, "unauthorized", received=["no Authorization header"])
    r = token_client.post(SOFT_TARGETS, params={"teacher": "nope"}, content=_valid_body())
    assert_error(r, 401, "unauthorized", received=["no Authorization header"])


@pytest.mark.parametrize("path", ["/teachers", "/metrics", "/openapi.json", "/docs"])
def test_token_guards_teachers_metrics_and_docs(token_client, path):
    assert_error(token_client.get(path), 401, "unauthorized", received=["no Authorization header"])
    assert_error(
        token_client.get(path, headers={"Authorization": "Bearer x"}),
        401,
        "unauthorized",
        received=["a different token"],
    )
    assert token_client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_docs_page_carries_the_spec_and_redoc_is_gone(token_client):
    """A browser sends no bearer token when the docs page fetches the spec, so the page holds it; /redoc is not
    served."""
    html = token_client.get("/docs", headers={"Authorization": "Bearer s3cret"}).text
    assert "SwaggerUIBundle" in html and '"/soft-targets"' in html and "safetensors" in html
    assert token_client.get("/redoc").status_code == 404
    assert token_client.get("/redoc", headers={"Authorization": "Bearer s3cret"}).status_code == 404


def test_random_teacher_names_add_no_metric_series(token_client):
    """Labels take only served teacher names: 200 unknown names, with and without the token, add no series."""
    auth = {"Authorization": "Bearer s3cret"}
    # one of each refusal first, so the fixed label's series exist
    for headers in (None, auth):
        token_client.post(SOFT_TARGETS, params={"teacher": "warm-up"}, content=_valid_body(), headers=headers)
    token_client.post(
        SOFT_TARGETS, params={"teacher": "warm-up", "temperature": "0"}, content=_valid_body(), headers=auth
    )
    before = _series(token_client.get("/metrics", headers=auth).text)
    names = [f"t{secrets.token_hex(6)}" for _ in range(200)]
    statuses = set()
    for i, name in enumerate(names):
        params = {"teacher": name, **({"temperature": "0"} if i % 4 == 3 else {})}
        statuses.add(
            token_client.post(
                SOFT_TARGETS, params=params, content=_valid_body(), headers=auth if i % 2 else None
            ).status_code
        )
    assert statuses == {400, 401, 404}
    text = token_client.get("/metrics", headers=auth).text
    assert _series(text) == before
    assert not any(name in text for name in names)
    assert (
        'akd_requests_total{status="401",teacher="-"}' in text
        and 'akd_requests_total{status="404",teacher="-"}' in text
    )


def test_healthz_needs_no_token(token_client):
    r = token_client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["teachers"] == ["mnist"]


def test_token_server_keeps_serving_after_401s(token_client):
    for _ in range(3):
        assert token_client.post(SOFT_TARGETS, content=_valid_body()).status_code == 401
    assert_still_serving(token_client, headers={"Authorization": "Bearer s3cret"}, params={})
    metrics = token_client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).text
    assert 'status="401"' in metrics
    assert 'status="500"' not in metrics
