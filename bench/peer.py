"""6. A peer: the same teacher behind LitServe, with its own dynamic batching, under the load of benchmark 3.

Both servers batch with the same window (max_wait_ms / LitServe's batch_timeout);
LitServe's batch holds up to as many requests as there are clients. Only the
serving framework differs: same checkpoint, forward pass, formula and tensors.
"""

from __future__ import annotations

from bench import sharing
from bench.context import Context
from bench.litserve_app import PREDICT_PATH, request_json
from bench.load import Request
from bench.sections import Section, Target
from bench.servers import ServerProcess
from bench.sharing import Load, Server, cores_text, loads, measure, summary

TARGET_RATIO = 1.0


def litserve_server(process: ServerProcess) -> Server:
    import json

    def request(body: bytes, rows: int) -> Request:
        return Request(
            PREDICT_PATH, json.dumps(request_json(body)).encode(), rows, headers={"content-type": "application/json"}
        )

    return Server("LitServe", process, request)


def run(ctx: Context) -> Section:
    spec = ctx.cfg.peer
    section = Section(
        "peer",
        "6. A peer: LitServe",
        "The load of benchmark 3 against `akd serve` (batching on) and against LitServe serving the same teacher "
        f"(max_batch_size = {max(spec.clients)} requests, batch_timeout = {ctx.cfg.max_wait_ms:g} ms, one worker); "
        "rounds alternate between the two, the one not measured frozen (SIGSTOP: LitServe's idle workers poll, "
        "about 20% of a core here); rows/s = median over rounds.",
        [
            "teacher",
            "load",
            "ours rows/s",
            "LitServe rows/s",
            "ours / LitServe",
            "ours p50/p99 ms",
            "LitServe p50/p99 ms",
            "ours / LitServe server cores",
        ],
    )
    try:
        import litserve  # noqa: F401
    except ImportError:
        section.notes.append("Not run: LitServe is not installed (`pip install -e .[bench]`).")
        return section
    for teacher in spec.teachers:
        peer = ctx.litserve(teacher, max_batch_size=max(spec.clients))
        servers = [sharing.ours("ours", ctx.service(), teacher), litserve_server(peer)]
        results = measure(ctx, spec, teacher, servers)
        ctx.stop(peer.name)
        for load in loads(spec):
            a, b = summary(results[("ours", load)]), summary(results[("LitServe", load)])
            section.rows.append(
                {
                    "teacher": teacher,
                    "load": str(load),
                    "ours rows/s": a["rows/s"],
                    "LitServe rows/s": b["rows/s"],
                    "ours / LitServe": a["rows/s"] / b["rows/s"],
                    "ours p50/p99 ms": f"{a['p50 ms']:.1f} / {a['p99 ms']:.1f}",
                    "LitServe p50/p99 ms": f"{b['p50 ms']:.1f} / {b['p99 ms']:.1f}",
                    "ours / LitServe server cores": _pair(a["server cores"], b["server cores"]),
                    "ours": a,
                    "LitServe": b,
                }
            )
        busiest = str(Load(max(spec.clients), spec.rows_per_client))
        row = next(r for r in section.rows if r["teacher"] == teacher and r["load"] == busiest)
        worst = min((r for r in section.rows if r["teacher"] == teacher), key=lambda r: r["ours / LitServe"])
        paired = [a / b for a, b in zip(row["ours"]["rounds"], row["LitServe"]["rounds"])]
        section.targets.append(
            Target(
                f"ours / LitServe rows/s, {teacher}, {busiest}",
                ">=",
                TARGET_RATIO,
                row["ours / LitServe"],
                f"{row['ours rows/s']:,.0f} vs {row['LitServe rows/s']:,.0f} rows/s; round by round "
                f"{min(paired):.2f} to {max(paired):.2f}; lowest ratio over all loads {worst['ours / LitServe']:.2f} "
                f"at {worst['load']}",
            )
        )
    return section


def _pair(a: float | None, b: float | None) -> str:
    return f"{cores_text(a)} / {cores_text(b)}"
