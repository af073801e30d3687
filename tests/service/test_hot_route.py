"""POST /soft-targets, keys first and the v2 infer route served past FastAPI's per-request layers (the direct route,
teacher_service/framework.py): the same answers, the same refusals and the same metrics as FastAPI gives, and every
other request still FastAPI's.

Two real servers on the same teachers: one as `akd serve` runs it, one whose uvicorn calls FastAPI's own dispatch
(`FastAPI.__call__`), the way in the direct route skips. Each gets the same requests in the same order. And the
direct route, read from the route's declaration, refuses one it would serve otherwise than FastAPI.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import (
    HANG_S,
    live_server,
    metric_series,
    mnist_teacher,
    random_inputs,
    raw_connect,
    raw_head,
    raw_response,
    save_member,
    write_config,
)
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from safetensors.torch import load as st_load

from shared import codec, oip, protocol
from teacher_service.framework import BodyPieces, TeacherApp

TOKEN = "s3cret"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
BODY = codec.encode_inputs(random_inputs(5, seed=3))

# (what, query, body, headers): answers, and every kind of refusal the route's layers made
CASES = [
    ("probs, cached rows missing", {"teacher": "ens"}, BODY, GOOD),
    ("the same rows, now hits", {"teacher": "ens"}, BODY, GOOD),
    (
        "every output, a temperature",
        {"teacher": "ens", "outputs": "probs,logits,member_logits", "temperature": "2.5"},
        BODY,
        GOOD,
    ),
    ("bypass", {"teacher": "solo", "cache": "bypass"}, BODY, GOOD),
    ("a repeated name: its last value", [("teacher", "ens"), ("temperature", "0"), ("temperature", "4")], BODY, GOOD),
    ("the scheme in lower case", {"teacher": "ens"}, BODY, {"Authorization": f"bearer {TOKEN}"}),
    ("the scheme in upper case", {"teacher": "ens"}, BODY, {"Authorization": f"BEARER {TOKEN}"}),
    ("the scheme in mixed case, two spaces", {"teacher": "ens"}, BODY, {"Authorization": f"bEaReR  {TOKEN}"}),
    ("the right token in another scheme", {"teacher": "ens"}, BODY, {"Authorization": f"Basic {TOKEN}"}),
    ("no token", {"teacher": "ens"}, BODY, {}),
    ("a wrong token", {"teacher": "ens"}, BODY, {"Authorization": "Bearer nope"}),
    ("the token before the query", {"teacher": "ens", "temperature": "-1"}, BODY, {}),
    ("temperature 0", {"teacher": "ens", "temperature": "0"}, BODY, GOOD),
    ("temperature nan", {"teacher": "ens", "temperature": "nan"}, BODY, GOOD),
    ("an unknown cache mode", {"teacher": "ens", "cache": "sometimes"}, BODY, GOOD),
    ("an unknown output", {"teacher": "ens", "outputs": "probs,bogus"}, BODY, GOOD),
    ("an unknown teacher", {"teacher": "nope"}, BODY, GOOD),
    ("no teacher, two served", {}, BODY, GOOD),
    ("not safetensors", {"teacher": "ens"}, b"not a safetensors file", GOOD),
    ("the wrong shape", {"teacher": "ens"}, codec.encode_inputs(random_inputs(2, shape=(3, 28, 28))), GOOD),
    ("over the body limit", {"teacher": "ens"}, codec.encode_inputs(random_inputs(200, seed=4)), GOOD),
]
HEADERS = ["content-type", "www-authenticate", "retry-after", "x-cache-hits", "x-teacher", "x-teacher-versions"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("hot_route")
    a, b = save_member(root / "a.pt", seed=1), save_member(root / "b.pt", seed=2)
    teachers = {"ens": mnist_teacher([(a, 1.0), (b, 3.0)], temperature=2.0), "solo": mnist_teacher([(b, 1.0)])}
    return lambda name: write_config(
        root / f"{name}.toml",
        teachers,
        server={
            "device": "cpu",
            "token": TOKEN,
            "cache": {"dir": str(root / f"cache-{name}")},
            "limits": {"body_bytes": 300_000},
        },
    )


def answers(base: str) -> list[tuple]:
    return posted(base, [(protocol.SOFT_TARGETS_PATH, CASES)])


def posted(base: str, paths: list[tuple[str, list]]) -> list[tuple]:
    """Each path's cases posted in order: (what, status, the HEADERS kept, the answer's tensors or its error JSON),
    then the requests the service counted."""
    out = []
    with httpx.Client(base_url=base, timeout=HANG_S) as client:
        for path, cases in paths:
            for what, query, body, headers in cases:
                r = client.post(path, params=query, content=body, headers=headers)
                kept = {h: r.headers.get(h) for h in HEADERS}
                ok = r.status_code == 200
                content = {k: v.tolist() for k, v in st_load(r.content).items()} if ok else r.json()
                out.append((what, r.status_code, kept, content))
        metrics = client.get(protocol.METRICS_PATH, headers=GOOD).text
    requests = {k: v for k, v in metric_series(metrics).items() if k.startswith("akd_requests_total")}
    return out + [("requests counted", requests)]


def v2_request(x, parameters: dict | None = None, binary: bool = True) -> tuple[bytes, dict]:
    """A v2 infer body for rows `x` (FP32), binary or JSON, and its headers."""
    given = {"name": "inputs", "shape": list(x.shape), "datatype": "FP32"}
    request = {"inputs": [given], "outputs": [{"name": "probs"}], "parameters": parameters or {}}
    if not binary:
        given["data"] = x.reshape(-1).tolist()
        return json.dumps(request).encode(), {}
    given["parameters"] = {"binary_data_size": x.numel() * 4}
    request["outputs"][0]["parameters"] = {"binary_data": True}
    head = json.dumps(request).encode()
    return head + x.numpy().tobytes(), {oip.HEADER_INFER_LENGTH: str(len(head))}


ROWS = random_inputs(3, seed=6)
# (what, path, (body, headers), headers): the v2 infer route's answers and refusals
V2_CASES = [
    ("binary", "/v2/models/ens/infer", v2_request(ROWS), GOOD),
    ("json, a temperature, bypass", "/v2/models/solo/infer", v2_request(ROWS, {"temperature": 3.0}, False), GOOD),
    ("no token", "/v2/models/ens/infer", v2_request(ROWS), {}),
    ("an unknown teacher", "/v2/models/nope/infer", v2_request(ROWS), GOOD),
    ("a bad temperature", "/v2/models/ens/infer", v2_request(ROWS, {"temperature": -1}), GOOD),
    ("not json", "/v2/models/ens/infer", (b"{nope", {}), GOOD),
    ("the wrong shape", "/v2/models/ens/infer", v2_request(random_inputs(2, shape=(3, 28, 28))), GOOD),
    ("a percent-encoded name", "/v2/models/e%6Es/infer", v2_request(ROWS), GOOD),
    ("the versioned path", "/v2/models/ens/versions/1/infer", v2_request(ROWS), GOOD),
]


def v2_answers(base: str) -> list[tuple]:
    out = []
    with httpx.Client(base_url=base, timeout=HANG_S) as client:
        for what, path, (body, extra), headers in V2_CASES:
            r = client.post(path, content=body, headers={**headers, **extra})
            kept = {h: r.headers.get(h) for h in [*HEADERS, oip.HEADER_INFER_LENGTH.lower()]}
            out.append((what, r.status_code, kept, r.content))
        metrics = client.get(protocol.METRICS_PATH, headers=GOOD).text
    requests = {k: v for k, v in metric_series(metrics).items() if k.startswith("akd_requests_total")}
    return out + [("requests counted", requests)]


# (what, query, body, headers): keys first, after CASES stored BODY's rows under teacher "ens"
KEY_CASES = [
    ("found", {"teacher": "ens"}, codec.encode_keys(random_inputs(5, seed=3)), GOOD),
    ("none found", {"teacher": "ens", "outputs": "probs,logits"}, codec.encode_keys(random_inputs(4, seed=9)), GOOD),
    ("no token", {"teacher": "ens"}, codec.encode_keys(random_inputs(2, seed=3)), {}),
    ("an unknown teacher", {"teacher": "nope"}, codec.encode_keys(random_inputs(2, seed=3)), GOOD),
    ("an unknown output", {"teacher": "ens", "outputs": "bogus"}, codec.encode_keys(random_inputs(2, seed=3)), GOOD),
    ("not safetensors", {"teacher": "ens"}, b"not a safetensors file", GOOD),
    ("rows, not keys", {"teacher": "ens"}, BODY, GOOD),
]


def keys_answers(base: str) -> list[tuple]:
    """CASES, then KEY_CASES: keys first answers only what the rows stored."""
    return posted(base, [(protocol.SOFT_TARGETS_PATH, CASES), (protocol.SOFT_TARGET_KEYS_PATH, KEY_CASES)])


def test_keys_first_answers_and_refuses_as_fastapi_does(config):
    """POST /soft-targets/keys, served directly, answers and refuses exactly as FastAPI's own dispatch does."""
    served = served_both_ways(config, "keys", keys_answers)
    statuses = {what: status for what, status, *_ in served[len(CASES) : -1]}
    assert statuses == {
        "found": 200,
        "none found": 200,
        "no token": 401,
        "an unknown teacher": 404,
        "an unknown output": 400,
        "not safetensors": 400,
        "rows, not keys": 422,
    }
    found = {what: content for what, _, _, content in served[len(CASES) : len(CASES) + 2]}
    assert found["found"][protocol.FOUND_KEY] == [1] * 5 and len(found["found"]["probs"]) == 5
    assert found["none found"][protocol.FOUND_KEY] == [0] * 4


def test_the_v2_infer_route_answers_and_refuses_as_fastapi_does(config):
    """POST /v2/models/{model}/infer, served directly (its path parameter read from the route's pattern), answers
    and refuses exactly as FastAPI's own dispatch does, byte for byte."""
    served = served_both_ways(config, "v2", v2_answers)
    statuses = {what: status for what, status, *_ in served[:-1]}
    assert [statuses[w] for w in ("binary", "no token", "an unknown teacher", "the wrong shape")] == [
        200,
        401,
        404,
        422,
    ]
    assert statuses["a percent-encoded name"] == 200


def served_both_ways(config, name: str, collect) -> list[tuple]:
    """`collect`'s answers from the app as `akd serve` runs it, checked equal to those from FastAPI's own dispatch (two
    fresh servers, same config)."""
    with live_server(config(f"{name}-hot")) as (hot, _app):
        served = collect(hot)
    with live_server(config(f"{name}-fastapi"), asgi=through_fastapi) as (slow, _app):
        reference = collect(slow)
    # status by status first: a clear diff
    assert [case[:2] for case in served] == [case[:2] for case in reference]
    assert served == reference
    return served


def through_fastapi(app: FastAPI):
    """The app as FastAPI itself dispatches every request, POST /soft-targets too."""

    async def asgi(scope, receive, send):
        await FastAPI.__call__(app, scope, receive, send)

    return asgi


def test_the_hot_route_answers_and_refuses_as_fastapi_does(config):
    served = served_both_ways(config, "native", answers)
    # and the cases are what they say: answers, hits, and each refusal
    statuses = {what: status for what, status, *_ in served[:-1]}
    assert [statuses[w] for w in ("probs, cached rows missing", "every output, a temperature", "no token")] == [
        200,
        200,
        401,
    ]
    assert served[1][2]["x-cache-hits"] == "5" and served[0][2]["x-cache-hits"] == "0"
    # the scheme is matched in any case (RFC 9110 section 11.1), the token exactly
    assert [statuses[w] for w in statuses if w.startswith("the scheme in")] == [200, 200, 200]
    assert statuses["the right token in another scheme"] == 401
    assert {statuses[w] for w in ("temperature 0", "an unknown cache mode", "an unknown output")} == {400}
    assert (statuses["the wrong shape"], statuses["over the body limit"], statuses["an unknown teacher"]) == (
        422,
        413,
        404,
    )


def test_the_hot_route_serves_soft_targets_and_fastapi_every_other_request(config, monkeypatch):
    """FastAPI's dispatch, watched: it never sees POST /soft-targets, and sees every other request (the path's other
    methods, /healthz, /teachers), which it answers as before."""
    dispatched = []
    fastapi_call = FastAPI.__call__

    async def watched(app, scope, receive, send):
        if scope["type"] == "http":
            dispatched.append((scope["method"], scope["path"]))
        await fastapi_call(app, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", watched)
    with live_server(config("watched")) as (base, _app), httpx.Client(base_url=base, timeout=HANG_S) as client:
        r = client.post(protocol.SOFT_TARGETS_PATH, params={"teacher": "ens"}, content=BODY, headers=GOOD)
        assert r.status_code == 200, r.text
        assert codec.decode(r.content)["probs"].shape == (5, 10)
        assert client.get(protocol.SOFT_TARGETS_PATH, headers=GOOD).status_code == 405
        assert {t["name"] for t in client.get(protocol.TEACHERS_PATH, headers=GOOD).json()["teachers"]} == {
            "ens",
            "solo",
        }
        keys = client.post(
            protocol.SOFT_TARGET_KEYS_PATH,
            params={"teacher": "ens"},
            content=codec.encode_keys(random_inputs(5, seed=3)),
            headers=GOOD,
        )
        assert keys.status_code == 200, keys.text
    assert ("POST", protocol.SOFT_TARGETS_PATH) not in dispatched and (
        "POST",
        protocol.SOFT_TARGET_KEYS_PATH,
    ) not in dispatched
    assert {("GET", protocol.SOFT_TARGETS_PATH), ("GET", protocol.TEACHERS_PATH), ("GET", protocol.HEALTH_PATH)} <= set(
        dispatched
    )


async def a_check(request: Request) -> None:
    return None


def a_sync_check(request: Request) -> None:
    return None


def refusal(router: APIRouter, endpoint, prefix: str = "") -> str:
    """Why the direct route refuses `endpoint`'s route, as the app includes `router` under `prefix`."""
    app = TeacherApp()
    app.include_router(router, prefix=prefix)
    with pytest.raises(TypeError) as refused:
        app.serve_directly(router, endpoint)
    return str(refused.value)


def test_the_direct_route_refuses_at_start_up_a_declaration_it_would_serve_otherwise_than_fastapi():
    checked = APIRouter(dependencies=[Depends(a_check)])

    @checked.post("/body")
    async def body(request: Request, n: int) -> Response: ...

    @checked.post("/items/{item}")
    async def item(item: int) -> Response: ...

    @checked.post("/things/{thing}")
    async def thing(request: Request) -> Response: ...

    @checked.post("/twice")
    async def twice(request: Request, again: None = Depends(a_check)) -> Response: ...

    @checked.post("/prefixed")
    async def prefixed(request: Request) -> Response: ...

    threaded = APIRouter(dependencies=[Depends(a_sync_check)])

    @threaded.post("/threaded")
    async def on_a_thread(request: Request) -> Response: ...

    assert "parameter 'n'" in refusal(checked, body)
    assert "parameter 'item'" in refusal(checked, item)
    assert "`str` parameters of its own" in refusal(checked, thing)
    assert "repeated dependency" in refusal(checked, twice)
    assert "without a prefix" in refusal(checked, prefixed, prefix="/v1")
    assert "async def f(request: Request)" in refusal(threaded, on_a_thread)


def test_a_body_in_pieces_reaches_the_route_whole_and_in_order(config):
    """The parser's pieces of a body (framework.BodyPieces, in place of uvicorn's bytearray) are handed over whole and
    in order, whether one piece waits at a receive or several: the answer is the one to the body sent at once."""
    body = codec.encode_inputs(random_inputs(40, seed=5))
    query = f"{protocol.SOFT_TARGETS_PATH}?teacher=solo&cache=bypass"
    head = raw_head("POST", query, {**GOOD, "Content-Length": str(len(body))})
    with live_server(config("pieces")) as (base, _app):
        whole = httpx.post(base + query, content=body, headers=GOOD, timeout=HANG_S)
        assert whole.status_code == 200, whole.text
        with raw_connect(base) as sock:
            sock.sendall(head)
            # odd-sized pieces, some sent back to back (several wait at one receive), some after a pause
            for i, at in enumerate(range(0, len(body), 7_777)):
                sock.sendall(body[at : at + 7_777])
                if i % 3 == 2:
                    time.sleep(0.01)
            status, _headers, answer = raw_response(sock)
    assert status == 200
    assert answer == whole.content


def test_body_pieces_hand_one_piece_over_as_it_is_and_join_several():
    one, two = b"abc", b"defg"
    pieces = BodyPieces()
    assert bytes(pieces) == b"" and len(pieces) == 0
    pieces += one
    assert bytes(pieces) is one and len(pieces) == 3
    pieces += two
    assert bytes(pieces) == b"abcdefg" and len(pieces) == 7
