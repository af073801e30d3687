"""0. The round trip: one request whose forward pass costs next to nothing, against the floors under it.

The service serves a teacher of arch `linear` (a few multiply-adds a row), so a request's time is everything around
the forward pass. Each candidate gets the same float32 body (CIFAR-shaped rows, `cache=bypass`) from one persistent
client, in alternated rounds:

- ours: POST /soft-targets through httpx.Client (the trainer's client library);
- ours, v2 binary: the Open Inference Protocol's infer route, Triton's binary request (bench/triton_client.py);
- ours, shared memory: the same route with the rows and the answer in one registered system shared-memory region,
  as the project's client does it on the service's host (shared/client/shared_memory.py): the request carries a few
  hundred bytes of JSON;
- the framework's floor: a minimal Starlette app on the same uvicorn, same client, reading the same body and
  answering as many bytes as ours (bench/floors.py);
- the machine's floor: the same bytes both ways through a raw loopback socket, no HTTP;
- Triton serving the same teacher (PyTriton, its Python backend), same client, binary tensors
  (bench/triton_client.py), where its environment is made (`make triton`).

Then keys first: the same rows cached, asked for by their keys (POST /soft-targets/keys), against the Starlette
floor with the same request and answer sizes. The client's own encode and decode, and the service's own time in
its batch (its akd_compute_seconds), say where the milliseconds go.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import torch

from bench import triton_client
from bench.context import Context
from bench.floors import STARLETTE_PATH, SocketClient
from bench.overhead import server_compute
from bench.sections import Section, Table, Target
from bench.servers import ServerProcess, triton_missing
from bench.timing import order
from bench.triton_client import TRITON
from shared import codec, oip, protocol
from shared.client.shared_memory import ClientRegion

# ours / the Starlette floor, by rows: at most 1.5x at 16 rows, 1.3x from 128 on
FLOOR_TARGETS = {16: 1.5, 128: 1.3, 512: 1.3}
KEYS_TARGET = 1.5
TRITON_TARGET = 0.8
# the Open Inference Protocol's routes: binary tensors within 10% of the native route; through shared memory, 128
# rows at most the socket floor, and 512 rows at most 20% more than 128
V2_BINARY, SHARED_MEMORY = "ours, v2 binary", "ours, shared memory"
V2_TARGET = 1.1
SHM_ROWS, SHM_GROWTH_TARGET = 128, 1.2


@dataclass
class Candidate:
    name: str
    call: Callable[[], object]
    # its server: its CPU is counted, and it is frozen while the others are timed (an idle server may poll)
    server: ServerProcess

    def cpu(self) -> float | None:
        return self.server.cpu_seconds()


def run(ctx: Context) -> Section:
    spec = ctx.cfg.round_trip
    shape = ctx.teacher(spec.teacher).input_shape
    section = Section(
        "round_trip",
        "0. The round trip against its floors",
        f"One request of float32 rows {tuple(shape)} to a teacher whose forward costs microseconds (`{spec.teacher}`), "
        "`cache=bypass`, `outputs=probs`, one persistent client; the Starlette floor and the socket floor move the "
        f"same bytes both ways. {spec.requests} calls per candidate per round, {ctx.cfg.repetitions} rounds in "
        "alternating order; ms = median of the rounds' medians; `rounds` lists each round's median. "
        "`client CPU ms` is the load generator's own CPU per call, `server CPU ms` the server process's.",
        ["rows", "body bytes", "candidate", "ms", "rounds", "client CPU ms", "server CPU ms", "ours / this"],
    )
    service = ctx.service()
    client = httpx.Client(timeout=60)
    sockets = SocketClient(urlsplit(ctx.floor("socket").url).port)
    starlette = ctx.floor("starlette")
    if why := triton_missing():
        section.notes.append(f"{TRITON} not run: {why}.")
    try:
        for rows in spec.rows:
            ctx.progress(f"round trip: {rows} rows")
            x = torch.rand(rows, *shape, generator=torch.Generator().manual_seed(rows))
            _measure_rows(ctx, section, client, sockets, starlette, service, x)
        _shm_growth_target(section)
        _measure_keys(ctx, section, client, starlette, service)
    finally:
        client.close()
        sockets.close()
        ctx.stop(f"triton-{spec.teacher}")
    return section


def _ours_url(ctx: Context, service, path: str, **query) -> str:
    params = {"teacher": ctx.cfg.round_trip.teacher, "outputs": "probs", **query}
    return str(httpx.URL(service.url + path, params=params))


def _measure_rows(ctx: Context, section: Section, client, sockets, starlette, service, x: torch.Tensor) -> None:
    spec, rows = ctx.cfg.round_trip, len(x)
    body = codec.encode_inputs(x)
    ours_url = _ours_url(ctx, service, protocol.SOFT_TARGETS_PATH, cache="bypass")
    answer_bytes = len(_posted(client, ours_url, body))
    floor_url = f"{starlette.url}{STARLETTE_PATH}?answer_bytes={answer_bytes}"
    region = ClientRegion(x.numel() * 4, rows * 10 * 4)
    try:
        candidates = [
            Candidate("ours", lambda: _posted(client, ours_url, body), service),
            _v2_binary(ctx, client, service, x),
            _shared_memory(ctx, client, service, x, region),
            Candidate("Starlette floor", lambda: _posted(client, floor_url, body), starlette),
            Candidate("socket floor", lambda: sockets.round_trip(body, answer_bytes), ctx.floor("socket")),
        ]
        if triton_missing() is None:
            candidates.append(_triton(ctx, client, x))
        before = server_compute(service.url, spec.teacher)
        results = _alternate(candidates, spec.requests, ctx.cfg.repetitions, ctx.cfg.warmup)
        after = server_compute(service.url, spec.teacher)
    finally:
        # the service drops a region whose segment is unlinked
        region.close()
    ours = results["ours"]
    for name, result in results.items():
        section.rows.append(_row(rows, len(body), name, result, ours))
    _floor_target(section, rows, results)
    _protocol_targets(section, rows, results)
    if TRITON in results:
        _triton_target(section, rows, results)
    section.notes.append(_where_it_goes(rows, results, body, x, (after[0] - before[0]) / max(after[1] - before[1], 1)))


def _measure_keys(ctx: Context, section: Section, client, starlette, service) -> None:
    """`keys_rows` cached rows asked for by key, against the Starlette floor with the same request and answer."""
    spec = ctx.cfg.round_trip
    shape = ctx.teacher(spec.teacher).input_shape
    rows = torch.randint(0, 256, (spec.keys_rows, *shape), generator=torch.Generator().manual_seed(7))
    rows = rows.to(torch.uint8)
    _posted(client, _ours_url(ctx, service, protocol.SOFT_TARGETS_PATH, cache="use"), codec.encode_inputs(rows))
    body = codec.encode_keys(rows)
    keys_url = _ours_url(ctx, service, protocol.SOFT_TARGET_KEYS_PATH)
    answer_bytes = len(_posted(client, keys_url, body))
    floor_url = f"{starlette.url}{STARLETTE_PATH}?answer_bytes={answer_bytes}"
    candidates = [
        Candidate("ours", lambda: _posted(client, keys_url, body), service),
        Candidate("Starlette floor", lambda: _posted(client, floor_url, body), starlette),
    ]
    results = _alternate(candidates, spec.requests, ctx.cfg.repetitions, ctx.cfg.warmup)
    table = Table(
        f"Keys first: {spec.keys_rows} cached rows asked for by key",
        ["candidate", "body bytes", "answer bytes", "ms", "rounds", "client CPU ms", "server CPU ms"],
    )
    for name, result in results.items():
        row = _row(spec.keys_rows, len(body), name, result, results["ours"])
        table.rows.append({**row, "answer bytes": answer_bytes})
    section.tables.append(table)
    ratio = results["ours"].ms / results["Starlette floor"].ms
    section.targets.append(
        Target(
            f"keys first, {spec.keys_rows} cached rows: ours / Starlette floor, same request size",
            "<=",
            KEYS_TARGET,
            ratio,
            f"{results['ours'].ms:.2f} vs {results['Starlette floor'].ms:.2f} ms; "
            f"{_round_ratios(results['ours'], results['Starlette floor'])}",
        )
    )


def _triton(ctx: Context, client: httpx.Client, x: torch.Tensor) -> Candidate:
    """Triton serving the same teacher, asked by the same client, the rows as one binary FP32 tensor."""
    teacher = ctx.cfg.round_trip.teacher
    server = ctx.triton(teacher)
    path, body, headers = triton_client.infer_request(teacher, x)
    return _binary_infer(TRITON, client, server, server.url + path, body, headers)


def _v2_binary(ctx: Context, client: httpx.Client, service, x: torch.Tensor) -> Candidate:
    """Ours through the Open Inference Protocol's infer route, the rows as one binary FP32 tensor: Triton's request."""
    path, body, headers = triton_client.infer_request(ctx.cfg.round_trip.teacher, x)
    # the cache mode travels as a request parameter
    body, headers = _with_parameters(body, headers, {"cache": "bypass"})
    return _binary_infer(V2_BINARY, client, service, service.url + path, body, headers)


def _binary_infer(name: str, client: httpx.Client, server, url: str, body: bytes, headers: dict) -> Candidate:
    """A candidate posting one binary infer request (bench/triton_client.py) and reading its `probs`."""

    def call() -> None:
        response = client.post(url, content=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{name} answered {response.status_code}: {response.text[:300]}")
        triton_client.read_probs(response.content, response.headers)

    return Candidate(name, call, server)


def _with_parameters(body: bytes, headers: dict[str, str], parameters: dict) -> tuple[bytes, dict[str, str]]:
    """A binary infer request with request `parameters` added to its JSON part."""
    length = int(headers[triton_client.HEADER_LENGTH])
    request = json.loads(body[:length])
    head = json.dumps({**request, "parameters": parameters}, separators=(",", ":")).encode()
    return head + body[length:], {**headers, triton_client.HEADER_LENGTH: str(len(head))}


def _shared_memory(ctx: Context, client: httpx.Client, service, x: torch.Tensor, region: ClientRegion) -> Candidate:
    """Ours through system shared memory, as the project's client does it: the rows written into one registered
    region, a request of a few hundred bytes of JSON, the answer read back out of the region."""
    rows = x.numpy()
    registered = client.post(
        f"{service.url}{oip.SHM_PATH}/region/{region.name}/register", content=json.dumps(region.registration())
    )
    if registered.status_code != 200:
        raise RuntimeError(f"registering a region answered {registered.status_code}: {registered.text[:300]}")
    url = f"{service.url}/v2/models/{ctx.cfg.round_trip.teacher}/infer"
    request = json.dumps(region.infer_request(rows, 10, {"cache": "bypass"})).encode()

    def call() -> None:
        region.write_rows(rows)
        response = client.post(url, content=request)
        if response.status_code != 200:
            raise RuntimeError(f"shared-memory infer answered {response.status_code}: {response.text[:300]}")
        region.read_answer(len(rows), 10)

    return Candidate(SHARED_MEMORY, call, service)


def _posted(client: httpx.Client, url: str, body: bytes) -> bytes:
    response = client.post(url, content=body)
    if response.status_code != 200:
        raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text[:300]}")
    return response.content


@dataclass
class Result:
    # each round's median, seconds
    rounds: list[float]
    client_cpu_s: float
    server_cpu_s: float | None

    @property
    def ms(self) -> float:
        return statistics.median(self.rounds) * 1e3


def _alternate(candidates: list[Candidate], calls: int, rounds: int, warmup: int) -> dict[str, Result]:
    """Each candidate `calls` times a round, rounds in alternating order; per call, the client's CPU and the
    server's."""
    for candidate in candidates:
        for _ in range(max(warmup, 1) * 10):
            candidate.call()
    medians = {c.name: [] for c in candidates}
    client_cpu = dict.fromkeys(medians, 0.0)
    server_cpu: dict[str, float | None] = dict.fromkeys(medians, 0.0)
    for r in range(rounds):
        for candidate in order(candidates, r):
            for other in candidates:
                if other.server is not candidate.server:
                    other.server.pause()
            candidate.server.resume()
            cpu_before, server_before = time.process_time(), candidate.cpu()
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                candidate.call()
                times.append(time.perf_counter() - started)
            client_cpu[candidate.name] += time.process_time() - cpu_before
            server_after = candidate.cpu()
            if server_before is None or server_after is None or server_cpu[candidate.name] is None:
                server_cpu[candidate.name] = None
            else:
                server_cpu[candidate.name] += server_after - server_before
            medians[candidate.name].append(statistics.median(times))
    for candidate in candidates:
        candidate.server.resume()
    total = calls * rounds
    return {
        name: Result(
            medians[name],
            client_cpu[name] / total,
            None if server_cpu[name] is None else server_cpu[name] / total,
        )
        for name in medians
    }


def _row(rows: int, body_bytes: int, name: str, result: Result, ours: Result) -> dict:
    return {
        "rows": rows,
        "body bytes": body_bytes,
        "candidate": name,
        "ms": result.ms,
        "rounds": " ".join(f"{r * 1e3:.2f}" for r in result.rounds),
        "client CPU ms": result.client_cpu_s * 1e3,
        "server CPU ms": None if result.server_cpu_s is None else result.server_cpu_s * 1e3,
        "ours / this": ours.ms / result.ms,
    }


def _round_ratios(a: Result, b: Result) -> str:
    ratios = [x / y for x, y in zip(a.rounds, b.rounds, strict=True)]
    return f"round by round {min(ratios):.2f} to {max(ratios):.2f}"


def _floor_target(section: Section, rows: int, results: dict[str, Result]) -> None:
    ours, floor = results["ours"], results["Starlette floor"]
    threshold = FLOOR_TARGETS.get(rows, FLOOR_TARGETS[max(FLOOR_TARGETS)])
    section.targets.append(
        Target(
            f"round trip, {rows} float32 rows: ours / Starlette floor",
            "<=",
            threshold,
            ours.ms / floor.ms,
            f"{ours.ms:.2f} vs {floor.ms:.2f} ms; {_round_ratios(ours, floor)}",
        )
    )


def _protocol_targets(section: Section, rows: int, results: dict[str, Result]) -> None:
    """The v2 binary route within 10% of the native one; through shared memory, at most the socket floor (at the
    target's rows)."""
    ours, v2, shm, socket = (results[n] for n in ("ours", V2_BINARY, SHARED_MEMORY, "socket floor"))
    section.targets.append(
        Target(
            f"round trip, {rows} float32 rows: v2 binary / ours",
            "<=",
            V2_TARGET,
            v2.ms / ours.ms,
            f"{v2.ms:.2f} vs {ours.ms:.2f} ms; {_round_ratios(v2, ours)}",
        )
    )
    if rows == SHM_ROWS:
        section.targets.append(
            Target(
                f"round trip, {rows} float32 rows: shared memory / socket floor",
                "<=",
                1.0,
                shm.ms / socket.ms,
                f"{shm.ms:.2f} vs {socket.ms:.2f} ms; {_round_ratios(shm, socket)}",
            )
        )


def _shm_growth_target(section: Section) -> None:
    """Through shared memory, 4x the rows costs at most 20% more: what a request carries no longer grows with them."""
    ms = {row["rows"]: row["ms"] for row in section.rows if row["candidate"] == SHARED_MEMORY}
    if SHM_ROWS in ms and 4 * SHM_ROWS in ms:
        more, base = ms[4 * SHM_ROWS], ms[SHM_ROWS]
        section.targets.append(
            Target(
                f"shared memory: {4 * SHM_ROWS} rows / {SHM_ROWS} rows",
                "<=",
                SHM_GROWTH_TARGET,
                more / base,
                f"{more:.2f} vs {base:.2f} ms",
            )
        )


def _triton_target(section: Section, rows: int, results: dict[str, Result]) -> None:
    ours, triton = results["ours"], results[TRITON]
    section.targets.append(
        Target(
            f"round trip, {rows} float32 rows: ours / Triton",
            "<=",
            TRITON_TARGET,
            ours.ms / triton.ms,
            f"{ours.ms:.2f} vs {triton.ms:.2f} ms; {_round_ratios(ours, triton)}",
        )
    )


def _where_it_goes(rows: int, results: dict[str, Result], body: bytes, x: torch.Tensor, batch_s: float) -> str:
    """One line splitting ours' time: the socket floor, what HTTP adds, the service's batch, the rest of its path;
    and the client's own encode and decode, which the timed calls do not include."""
    socket_ms, floor_ms, ours_ms = (results[n].ms for n in ("socket floor", "Starlette floor", "ours"))
    batch_ms = batch_s * 1e3
    encode_ms = _seconds(lambda: codec.encode_inputs(x)) * 1e3
    answer = codec.encode({"probs": torch.rand(rows, 10)})
    decode_ms = _seconds(lambda: codec.decode(answer)) * 1e3
    return (
        f"{rows} rows ({len(body):,} bytes): {ours_ms:.2f} ms = the bytes through the kernel {socket_ms:.2f} "
        f"+ uvicorn and Starlette reading them {floor_ms - socket_ms:.2f} + the service's batch (forward, "
        f"cache steps, its thread) {batch_ms:.2f} + the rest of its path (decode, checks, hand-offs, answer) "
        f"{ours_ms - floor_ms - batch_ms:.2f}. Not timed above: the client's encode {encode_ms:.2f} ms and "
        f"decode of the answer {decode_ms:.3f} ms."
    )


def _seconds(fn: Callable[[], object], calls: int = 20) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
