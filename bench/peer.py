"""6. Peers: the same teacher behind LitServe and behind Triton Inference Server, each with its own dynamic batching,
under the load of benchmark 3.

Every server batches with the same window (max_wait_ms: LitServe's batch_timeout, Triton's max queue delay);
LitServe's batch holds up to as many requests as there are clients, Triton's up to max_rows rows, as ours. Only the
serving framework differs: same checkpoint, forward pass, formula and tensors, and the same load generator for all
three (Triton's requests in its binary-tensor protocol, bench/triton_client.py). A peer that is not installed is
left out, and the section says why.
"""

from __future__ import annotations

from bench import sharing
from bench.context import Context
from bench.litserve_app import PREDICT_PATH, request_json
from bench.load import Request
from bench.sections import Section, Target
from bench.servers import ServerProcess, triton_missing
from bench.sharing import Load, Server, cores_text, loads, measure, summary
from bench.triton_client import TRITON

TARGET_RATIO = 1.0
LITSERVE = "LitServe"
PEERS = (LITSERVE, TRITON)


def litserve_server(process: ServerProcess) -> Server:
    import json

    def request(body: bytes, rows: int) -> Request:
        return Request(
            PREDICT_PATH, json.dumps(request_json(body)).encode(), rows, headers={"content-type": "application/json"}
        )

    return Server(LITSERVE, process, request)


def litserve_missing() -> str | None:
    try:
        import litserve  # noqa: F401
    except ImportError:
        return "LitServe is not installed (`pip install -e .[bench]`)"
    return None


def run(ctx: Context) -> Section:
    spec = ctx.cfg.peer
    section = Section(
        "peer",
        "6. Peers: LitServe and Triton",
        "The load of benchmark 3 against `akd serve` (batching on), against LitServe serving the same teacher "
        f"(max_batch_size = {max(spec.clients)} requests, batch_timeout = {ctx.cfg.max_wait_ms:g} ms, one worker) "
        "and against Triton Inference Server 2.51 through PyTriton 0.7 (dynamic batcher: max_batch_size = the "
        f"service's max_rows rows, max queue delay = {ctx.cfg.max_wait_ms:g} ms; FP32 binary tensors); rounds "
        "alternate between the three, those not measured frozen (SIGSTOP: LitServe's idle workers poll, about 20% "
        "of a core here); rows/s = median over rounds.",
        [
            "teacher",
            "load",
            "ours rows/s",
            *(f"{p} rows/s" for p in PEERS),
            *(f"ours / {p}" for p in PEERS),
            "ours p50/p99 ms",
            *(f"{p} p50/p99 ms" for p in PEERS),
            f"server cores: ours / {' / '.join(PEERS)}",
        ],
    )
    missing = {LITSERVE: litserve_missing(), TRITON: triton_missing()}
    section.notes += [f"{peer} not run: {why}." for peer, why in missing.items() if why]
    peers = [p for p in PEERS if not missing[p]]
    if not peers:
        return section
    for teacher in spec.teachers:
        servers = [sharing.ours("ours", ctx.service(), teacher)]
        if LITSERVE in peers:
            servers.append(litserve_server(ctx.litserve(teacher, max_batch_size=max(spec.clients))))
        if TRITON in peers:
            servers.append(sharing.triton(TRITON, ctx.triton(teacher), teacher))
        results = measure(ctx, spec, teacher, servers)
        for server in servers[1:]:
            ctx.stop(server.process.name)
        rows = [_row(teacher, load, results, peers) for load in loads(spec)]
        section.rows += rows
        section.targets += [_target(teacher, peer, rows, spec) for peer in peers]
    return section


def _row(teacher: str, load: Load, results: dict, peers: list[str]) -> dict:
    """One load's row: each measured server's summary under its label, and the columns drawn from them."""
    measured = {label: summary(results[(label, load)]) for label in ("ours", *peers)}
    ours = measured["ours"]
    row = {"teacher": teacher, "load": str(load), "ours rows/s": ours["rows/s"], **measured}
    row["ours p50/p99 ms"] = _latency(ours)
    for peer in peers:
        theirs = measured[peer]
        row[f"{peer} rows/s"] = theirs["rows/s"]
        row[f"ours / {peer}"] = ours["rows/s"] / theirs["rows/s"]
        row[f"{peer} p50/p99 ms"] = _latency(theirs)
    row[f"server cores: ours / {' / '.join(PEERS)}"] = " / ".join(
        cores_text(measured[label]["server cores"]) if label in measured else "-" for label in ("ours", *PEERS)
    )
    return row


def _target(teacher: str, peer: str, rows: list[dict], spec) -> Target:
    busiest = str(Load(max(spec.clients), spec.rows_per_client))
    row = next(r for r in rows if r["load"] == busiest)
    worst = min(rows, key=lambda r: r[f"ours / {peer}"])
    paired = [a / b for a, b in zip(row["ours"]["rounds"], row[peer]["rounds"])]
    return Target(
        f"ours / {peer} rows/s, {teacher}, {busiest}",
        ">=",
        TARGET_RATIO,
        row[f"ours / {peer}"],
        f"{row['ours rows/s']:,.0f} vs {row[f'{peer} rows/s']:,.0f} rows/s; round by round "
        f"{min(paired):.2f} to {max(paired):.2f}; lowest ratio over all loads {worst[f'ours / {peer}']:.2f} "
        f"at {worst['load']}",
    )


def _latency(summary: dict) -> str:
    return f"{summary['p50 ms']:.1f} / {summary['p99 ms']:.1f}"
