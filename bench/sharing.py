"""3. Sharing one teacher: concurrent trainer-like clients, dynamic batching on and off.

Each client sends small batches (16 rows, float32, `cache=bypass`) in a closed loop, through bench/load.py's load
generator, so the clients take little of the CPU they share with the server; the yardstick is one client sending
batch 128. Triton Inference Server serving the same teacher with its own dynamic batcher, where its environment is
installed (`make triton`), gets the same loads from the same load generator. Rounds alternate between the servers
compared (those not measured are frozen) and repeat; rows/s are medians over rounds, latency percentiles pool every
request.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import torch

from bench import triton_client
from bench.config import LoadSpec
from bench.context import Context
from bench.load import LoadResult, Request, closed_loop
from bench.sections import Section, Target
from bench.servers import ServerProcess, triton_missing
from bench.timing import median, order, percentile
from bench.triton_client import TRITON
from shared import codec, oip, protocol
from shared.client.shared_memory import ClientRegion

TARGET_FRACTION = 0.85
# ours with batching on, the rows in shared memory: its label, in the `batching` column
SHARED_MEMORY = "on, shared memory"


@dataclass(frozen=True)
class Load:
    clients: int
    rows: int

    def __str__(self) -> str:
        return f"{self.clients} x {self.rows}"


@dataclass
class Server:
    label: str
    process: ServerProcess
    # (safetensors input file, rows) -> what a client posts
    request: Callable[[bytes, int], Request]
    # after each load: what its requests held is let go (shared-memory regions)
    release: Callable[[], None] = lambda: None

    @property
    def url(self) -> str:
        return self.process.url


@contextlib.contextmanager
def alone(server: Server, servers: list[Server]):
    """Measure `server` with the others frozen, however little they do when idle."""
    others = [s.process for s in servers if s.process is not server.process]
    for other in others:
        other.pause()
    try:
        yield
    finally:
        for other in others:
            other.resume()


def loads(spec: LoadSpec) -> list[Load]:
    return [Load(n, spec.rows_per_client) for n in spec.clients] + [Load(1, spec.reference_rows)]


def input_files(shape: tuple[int, int, int], load: Load) -> list[bytes]:
    """One float32 input file per client, distinct rows per client."""
    return [
        codec.encode_inputs(torch.rand(load.rows, *shape, generator=torch.Generator().manual_seed(c)))
        for c in range(load.clients)
    ]


def ours(label: str, process: ServerProcess, teacher: str) -> Server:
    params = {"teacher": teacher, "outputs": "probs", "cache": "bypass"}
    return Server(label, process, lambda body, rows: Request(protocol.SOFT_TARGETS_PATH, body, rows, params))


def ours_shared_memory(label: str, process: ServerProcess, teacher: str, classes: int) -> Server:
    """Ours with each client's rows and answers in a shared-memory region of its own, registered before the load, as
    the project's client keeps one (shared/client/shared_memory.py): a request is a few hundred bytes of JSON. The
    rows are written into the region once, as a load generator builds its bodies before the clock starts."""
    held: list[ClientRegion] = []

    def request(body: bytes, rows: int) -> Request:
        x = codec.decode(body)[codec.INPUTS_KEY].numpy()
        region = ClientRegion(x.nbytes, rows * classes * 4)
        held.append(region)
        path = f"{oip.SHM_PATH}/region/{region.name}/register"
        answer = httpx.post(process.url + path, content=json.dumps(region.registration()), timeout=60)
        if answer.status_code != 200:
            raise RuntimeError(f"registering a region answered {answer.status_code}: {answer.text[:300]}")
        region.write_rows(x)
        content = json.dumps(region.infer_request(x, classes, {"cache": "bypass"})).encode()
        return Request(f"/v2/models/{teacher}/infer", content, rows, headers={"content-type": "application/json"})

    def release() -> None:
        # unlinked: the service drops their regions
        while held:
            held.pop().close()

    return Server(label, process, request, release)


def triton(label: str, process: ServerProcess, teacher: str) -> Server:
    """Triton's model `teacher`: the same rows as ours get, sent as Triton's binary-tensor infer request
    (bench/triton_client.py), by the same load generator."""

    def request(body: bytes, rows: int) -> Request:
        path, content, headers = triton_client.infer_request(teacher, codec.decode(body)[codec.INPUTS_KEY])
        return Request(path, content, rows, headers=headers)

    return Server(label, process, request)


def measure(
    ctx: Context, spec: LoadSpec, teacher: str, servers: list[Server]
) -> dict[tuple[str, Load], list[LoadResult]]:
    """Every load on every server, `repetitions` rounds, servers alternating within each round."""
    shape = ctx.teacher(teacher).input_shape
    files = {load: input_files(shape, load) for load in loads(spec)}
    results: dict[tuple[str, Load], list[LoadResult]] = {}
    for rep in range(ctx.cfg.repetitions):
        ctx.progress(f"{teacher}: round {rep + 1}/{ctx.cfg.repetitions} of {', '.join(s.label for s in servers)}")
        for server in order(servers, rep):
            with alone(server, servers):
                for load in loads(spec):
                    count = max(1, spec.round_rows(teacher) // (load.clients * load.rows))
                    requests = [server.request(body, load.rows) for body in files[load]]
                    try:
                        results.setdefault((server.label, load), []).append(
                            closed_loop(server.url, requests, count, server.process.cpu_seconds)
                        )
                    finally:
                        server.release()
    return results


def summary(runs: list[LoadResult]) -> dict:
    """Median rows/s over rounds, latency percentiles over every request, and the cores each side kept busy."""
    latencies = [s for r in runs for s in r.latencies_s]
    seconds = sum(r.seconds for r in runs)
    server_cpu = [r.server_cpu_s for r in runs]
    return {
        "rows/s": median([r.rows_per_s for r in runs]),
        "p50 ms": percentile(latencies, 50) * 1e3,
        "p99 ms": percentile(latencies, 99) * 1e3,
        "server cores": sum(server_cpu) / seconds if None not in server_cpu else None,
        "client cores": sum(r.client_cpu_s for r in runs) / seconds,
        "rounds": [r.rows_per_s for r in runs],
    }


def run(ctx: Context) -> Section:
    spec = ctx.cfg.sharing
    reference = Load(1, spec.reference_rows)
    section = Section(
        "sharing",
        "3. Sharing one teacher",
        f"{', '.join(map(str, loads(spec)))} (clients x rows per request): closed-loop clients, each with its own "
        "connection, writing requests built before the clock starts (bench/load.py), float32 inputs, "
        f"`cache=bypass`; the service with dynamic batching "
        f"(max_wait_ms = {ctx.cfg.max_wait_ms:g}) and without, and Triton Inference Server serving the same teacher "
        "with its dynamic batcher (the same window and max_rows; the same rows, as Triton's binary-tensor requests, "
        "from the same load generator); rows/s = median over rounds; "
        "server/client cores = CPU seconds per second the server's processes / all the clients spent.",
        [
            "teacher",
            "load",
            "server",
            "batching",
            "rows/s",
            "p50 ms",
            "p99 ms",
            "server cores",
            "client cores",
            f"vs {reference} (same server)",
        ],
    )
    missing = triton_missing()
    if missing:
        section.notes.append(f"Triton not run: {missing}.")
    processes = {"on": ctx.service(batching=True), "off": ctx.service(batching=False)}
    for teacher in spec.teachers:
        servers = [ours(label, process, teacher) for label, process in processes.items()]
        classes = ctx.teacher(teacher).num_classes
        servers.append(ours_shared_memory(SHARED_MEMORY, processes["on"], teacher, classes))
        if not missing:
            servers.append(triton(TRITON, ctx.triton(teacher), teacher))
        results = measure(ctx, spec, teacher, servers)
        if not missing:
            ctx.stop(f"triton-{teacher}")
        for server in servers:
            base = summary(results[(server.label, reference)])["rows/s"]
            for load in loads(spec):
                s = summary(results[(server.label, load)])
                section.rows.append(
                    {
                        "teacher": teacher,
                        "load": str(load),
                        "server": TRITON if server.label == TRITON else "ours",
                        "batching": "Triton's" if server.label == TRITON else server.label,
                        **s,
                        f"vs {reference} (same server)": s["rows/s"] / base,
                    }
                )
        section.targets.append(_target(spec, teacher, results, with_triton=not missing))
    ctx.stop("service-no-batching")
    return section


def _target(spec: LoadSpec, teacher: str, results: dict, with_triton: bool) -> Target:
    reference, busiest = Load(1, spec.reference_rows), Load(max(spec.clients), spec.rows_per_client)
    shared, alone = summary(results[("on", busiest)]), summary(results[("on", reference)])
    off = summary(results[("off", busiest)])["rows/s"]
    paired = [a / b for a, b in zip(shared["rounds"], alone["rounds"])]
    context = (
        f"{shared['rows/s']:,.0f} vs {alone['rows/s']:,.0f} rows/s, round by round {min(paired):.2f} to "
        f"{max(paired):.2f}; "
        f"server {cores_text(shared['server cores'])} vs {cores_text(alone['server cores'])} cores, clients "
        f"{cores_text(shared['client cores'])} vs {cores_text(alone['client cores'])}; without batching "
        f"{off:,.0f} rows/s ({off / alone['rows/s']:.2f}x)"
    )
    if with_triton:
        theirs, theirs_alone = summary(results[(TRITON, busiest)]), summary(results[(TRITON, reference)])
        context += (
            f"; Triton {theirs['rows/s']:,.0f} vs {theirs_alone['rows/s']:,.0f} rows/s "
            f"({theirs['rows/s'] / theirs_alone['rows/s']:.2f}x), server {cores_text(theirs['server cores'])} cores"
        )
    return Target(
        f"{busiest} with batching / {reference} rows/s, {teacher}",
        ">=",
        TARGET_FRACTION,
        shared["rows/s"] / alone["rows/s"],
        context,
    )


def cores_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
