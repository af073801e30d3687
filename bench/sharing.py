"""3. Sharing one teacher: concurrent trainer-like clients, dynamic batching on and off.

Each client sends small batches (16 rows, float32, `cache=bypass`) in a closed loop, through bench/load.py's load
generator, so the clients take little of the CPU they share with the server; the yardstick is one client sending
batch 128. Rounds alternate between the servers compared (the one not measured is frozen) and repeat; rows/s are
medians over rounds, latency percentiles pool every request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.config import LoadSpec
from bench.context import Context
from bench.load import LoadResult, Request, closed_loop
from bench.sections import Section, Target
from bench.servers import ServerProcess
from bench.timing import median, order, percentile
from shared import codec, protocol

TARGET_FRACTION = 0.85


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
                    results.setdefault((server.label, load), []).append(
                        closed_loop(server.url, requests, count, server.process.cpu_seconds)
                    )
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
        f"(max_wait_ms = {ctx.cfg.max_wait_ms:g}) and without; rows/s = median over rounds; "
        "server/client cores = CPU seconds per second the server's processes / all the clients spent.",
        [
            "teacher",
            "load",
            "batching",
            "rows/s",
            "p50 ms",
            "p99 ms",
            "server cores",
            "client cores",
            f"vs {reference} (same server)",
        ],
    )
    processes = {"on": ctx.service(batching=True), "off": ctx.service(batching=False)}
    for teacher in spec.teachers:
        servers = [ours(label, process, teacher) for label, process in processes.items()]
        results = measure(ctx, spec, teacher, servers)
        for server in servers:
            base = summary(results[(server.label, reference)])["rows/s"]
            for load in loads(spec):
                s = summary(results[(server.label, load)])
                section.rows.append(
                    {
                        "teacher": teacher,
                        "load": str(load),
                        "batching": server.label,
                        **s,
                        f"vs {reference} (same server)": s["rows/s"] / base,
                    }
                )
        busiest = Load(max(spec.clients), spec.rows_per_client)
        shared, alone = summary(results[("on", busiest)]), summary(results[("on", reference)])
        off = summary(results[("off", busiest)])["rows/s"]
        paired = [a / b for a, b in zip(shared["rounds"], alone["rounds"])]
        section.targets.append(
            Target(
                f"{busiest} with batching / {reference} rows/s, {teacher}",
                ">=",
                TARGET_FRACTION,
                shared["rows/s"] / alone["rows/s"],
                f"{shared['rows/s']:,.0f} vs {alone['rows/s']:,.0f} rows/s, round by round {min(paired):.2f} to "
                f"{max(paired):.2f}; "
                f"server {cores_text(shared['server cores'])} vs {cores_text(alone['server cores'])} cores, clients "
                f"{cores_text(shared['client cores'])} vs {cores_text(alone['client cores'])}; without batching "
                f"{off:,.0f} rows/s ({off / alone['rows/s']:.2f}x)",
            )
        )
    ctx.stop("service-no-batching")
    return section


def cores_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
