"""7. Scale out: a second device in one service, a second replica behind nginx, a second DDP rank, and a
replica killed under load.

Throughput is measured as in the sharing benchmark: closed-loop clients, float32 rows, `cache=bypass`, rounds that
alternate between the setups compared while every other server started here is frozen. On a machine without a
second GPU the "devices" and replicas share the same cores, so the ratios say what a second one buys here, not what
it buys on hardware that has one: the 1.8x target is judged only where there are two GPUs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from bench import servers
from bench.context import Context
from bench.load import LoadResult, Request, closed_loop
from bench.sections import Section, Target
from bench.servers import ServerProcess
from bench.sharing import Load, input_files, summary
from bench.timing import order, percentile
from shared import protocol
from student_trainer.teacher_client import RemoteTeacher, TeacherRequestError, TeacherUnavailable

# two GPUs in one service serve at least 1.8x the rows of one
TARGET_DEVICES = 1.8
COLUMNS = ["part", "setup", "rate", "vs 1", "p50 ms", "p99 ms", "max ms", "server cores", "sent", "failed"]
DEVICES, REPLICAS, DDP = "1. devices in one service (rows/s)", "2. replicas (rows/s)", "3. DDP ranks (steps/s)"
KILLED_NGINX, KILLED_CLIENT = "4a. replica killed, behind nginx", "4b. replica killed, RemoteTeacher failover"


@dataclass
class Setup:
    """One thing measured: where the clients send, and the processes that serve it (the rest are frozen)."""

    label: str
    url: str
    processes: list[ServerProcess]

    def cpu_seconds(self) -> float | None:
        spent = [p.cpu_seconds() for p in self.processes]
        return None if None in spent else sum(spent)


@dataclass
class Call:
    # when the call started, by time.perf_counter()
    started: float
    seconds: float
    ok: bool


def run(ctx: Context) -> Section:
    section = Section("scale_out", "7. Scale out", about(ctx), COLUMNS)
    devices(ctx, section)
    nginx = nginx_installed()
    if not nginx:
        section.notes.append(
            "nginx is not installed (Debian: apt-get install nginx-light): parts 2 and 4a, behind nginx, were not "
            "measured"
        )
    a, b = replica(ctx, "replica-a"), None
    try:
        b = replica(ctx, "replica-b")
        if nginx:
            replicas(ctx, section, a, b)
        ddp(ctx, section, a)
        if nginx:
            # kills a: the parts after it do without it
            killed_behind_nginx(ctx, section, a, b)
        client_failover(ctx, section, b)
    finally:
        for process in (a, b):
            if process is not None:
                process.stop()
    return section


def about(ctx: Context) -> str:
    spec = ctx.cfg.scale_out
    return (
        f"Teacher {spec.teacher}, {spec.clients} closed-loop clients x {spec.rows_per_client} float32 rows, "
        f"`cache=bypass`, {spec.requests_per_client} requests per client and round, rate = median over "
        f"{ctx.cfg.repetitions} alternating rounds; server cores = CPU seconds per second of the processes serving. "
        f"DDP: AKD training (`python -m student_trainer train`, `torchrun` for 2 ranks; {spec.dataset}, small_cnn "
        f"student, global batch {spec.train_batch}, {spec.train_rows} rows, PGD-{spec.train_attack_steps}) against "
        f"one replica (default threads), steps/s over {spec.train_epochs} timed epoch(s) (`epoch_time_s` of "
        "metrics.jsonl, after a warm-up epoch). Kill: `kill -9` of one of two replicas "
        f'{spec.kill_after_s:g} s into {spec.kill_load_s:g} s of load; "around the kill" = requests in flight at '
        f"it or sent within {spec.kill_window_s:g} s after."
    )


# 1. devices ----------------------------------------------------------------------------------------------------


def devices(ctx: Context, section: Section) -> None:
    """One service with one device worker vs two, by default and (on CPUs) with one torch thread per process."""
    spec, kind = ctx.cfg.scale_out, ctx.device.type
    gpus = torch.cuda.device_count() if kind == "cuda" else 0
    one, two = (f"{kind}:0", f"{kind}:0,{kind}:1") if gpus >= 2 else (kind, f"{kind},{kind}")
    variants = {"": {}}
    if kind == "cpu" and spec.one_thread:
        # torch's intra-op threads, per process
        variants[", OMP_NUM_THREADS=1"] = {"OMP_NUM_THREADS": "1"}
    started: list[ServerProcess] = []
    try:
        setups = []
        for suffix, env in variants.items():
            for label, devs in ((f"1 device ({one})", one), (f"2 devices ({two})", two)):
                name = f"devices-{devs.replace(',', '+')}{'-1-thread' if env else ''}"
                process = service(ctx, name, {"AKD_DEVICES": devs, **env})
                started.append(process)
                setups.append(Setup(label + suffix, process.url, [process]))
        results = throughput(ctx, "devices", setups)
    finally:
        for process in started:
            process.stop()
    ratios = []
    for i in range(0, len(setups), 2):
        base, more = results[setups[i].label], results[setups[i + 1].label]
        section.rows += [
            throughput_row(DEVICES, setups[i].label, base, base),
            throughput_row(DEVICES, setups[i + 1].label, more, base),
        ]
        ratios.append(more["rows/s"] / base["rows/s"])
    default, doubled = results[setups[0].label], results[setups[1].label]
    context = (
        f"{doubled['rows/s']:,.0f} vs {default['rows/s']:,.0f} rows/s, server {doubled['server cores']:.2f} vs "
        f"{default['server cores']:.2f} cores busy"
        + (f"; with OMP_NUM_THREADS=1 {ratios[1]:.2f}x" if len(ratios) > 1 else "")
    )
    if gpus >= 2:
        section.targets.append(
            Target(f"2 GPUs / 1 GPU rows/s, one service, {spec.teacher}", ">=", TARGET_DEVICES, ratios[0], context)
        )
    else:
        section.notes.append(
            f"Target 2 devices / 1 >= {TARGET_DEVICES:g}: n/a on {'one GPU' if gpus else 'CPU'}, "
            f"judged only with two GPUs. Measured {ratios[0]:.2f}x ({context}). Both device workers share "
            f"{ceiling_text(default, kind)}."
        )


def ceiling_text(one: dict, kind: str) -> str:
    """What a second worker on the same machine can add at most: the cores that one worker and the clients (on this
    machine too) leave idle."""
    cores = os.cpu_count() or 1
    server, clients = one["server cores"], one["client cores"]
    if kind != "cpu" or not server:
        return "one GPU: a second worker only overlaps the first one's host-side work"
    return (
        f"the same {cores} cores, of which one already keeps {server:.2f} busy and the clients {clients:.2f}: "
        f"the idle cores bound what a second one can add to about {min(2.0, cores / (server + clients)):.2f}x here"
    )


def service(ctx: Context, name: str, env: dict[str, str]) -> ServerProcess:
    """`akd serve` with batching and no cache (requests bypass it anyway)."""
    ctx.progress(f"starting {name}")
    return servers.teacher_service(
        name, ctx.service_config, ctx.workdir / "logs", ctx.device.type, True, None, extra_env=env
    )


def replica(ctx: Context, name: str) -> ServerProcess:
    return service(ctx, name, {})


# throughput, shared by parts 1 and 2 ----------------------------------------------------------------------------


def throughput(ctx: Context, what: str, setups: list[Setup]) -> dict[str, dict]:
    """Every setup under the same closed-loop load, `repetitions` rounds, alternating; summaries by label."""
    spec = ctx.cfg.scale_out
    shape = ctx.teacher(spec.teacher).input_shape
    requests = [soft_targets(ctx, body) for body in input_files(shape, Load(spec.clients, spec.rows_per_client))]
    everyone = [p for s in setups for p in s.processes]
    runs: dict[str, list[LoadResult]] = {s.label: [] for s in setups}
    for rep in range(ctx.cfg.repetitions):
        ctx.progress(f"scale out, {what}: round {rep + 1}/{ctx.cfg.repetitions}")
        for setup in order(setups, rep):
            with only(setup.processes, everyone):
                runs[setup.label].append(closed_loop(setup.url, requests, spec.requests_per_client, setup.cpu_seconds))
    return {
        label: {**summary(r), "max ms": max(s for x in r for s in x.latencies_s) * 1e3} for label, r in runs.items()
    }


def soft_targets(ctx: Context, body: bytes) -> Request:
    spec = ctx.cfg.scale_out
    params = {"teacher": spec.teacher, "outputs": "probs", "cache": "bypass"}
    return Request(protocol.SOFT_TARGETS_PATH, body, spec.rows_per_client, params)


@contextlib.contextmanager
def only(running: list[ServerProcess], everyone: list[ServerProcess]):
    """Freeze every process in `everyone` but `running` while the block runs."""
    frozen = list({id(p): p for p in everyone if all(p is not r for r in running)}.values())
    for process in frozen:
        process.pause()
    try:
        yield
    finally:
        for process in frozen:
            process.resume()


def throughput_row(part: str, label: str, s: dict, base: dict) -> dict:
    return {
        "part": part,
        "setup": label,
        "rate": s["rows/s"],
        "vs 1": s["rows/s"] / base["rows/s"],
        **{k: s[k] for k in ("p50 ms", "p99 ms", "max ms", "server cores", "rounds")},
    }


# 2. replicas ---------------------------------------------------------------------------------------------------


def nginx_installed() -> bool:
    """The lookup bench.servers.nginx_balancer makes: Debian's nginx lies outside users' PATH."""
    return shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is not None


def replicas(ctx: Context, section: Section, a: ServerProcess, b: ServerProcess) -> None:
    """One replica direct, one behind nginx (deploy/nginx.conf), two behind nginx."""
    logs = ctx.workdir / "logs"
    one = servers.nginx_balancer("nginx-1-replica", [a.url], logs)
    two = None
    try:
        two = servers.nginx_balancer("nginx-2-replicas", [a.url, b.url], logs)
        setups = [
            Setup("1 replica, direct", a.url, [a]),
            Setup("1 replica behind nginx", one.url, [one, a]),
            Setup("2 replicas behind nginx", two.url, [two, a, b]),
        ]
        # b stays frozen in every setup but the last
        results = throughput(ctx, "replicas", setups)
    finally:
        for process in (one, two):
            if process is not None:
                process.stop()
    base = results["1 replica behind nginx"]
    section.rows += [throughput_row(REPLICAS, s.label, results[s.label], base) for s in setups]
    direct = results["1 replica, direct"]
    section.notes.append(
        f"Replicas: 2 / 1 behind nginx {results['2 replicas behind nginx']['rows/s'] / base['rows/s']:.2f}x; "
        f"nginx's own cost: 1 replica behind it / direct {base['rows/s'] / direct['rows/s']:.2f}x. Two replicas on "
        f"this machine share {ceiling_text(direct, ctx.device.type)}."
    )


# 3. DDP --------------------------------------------------------------------------------------------------------


def ddp(ctx: Context, section: Section, teacher: ServerProcess) -> None:
    """The same AKD training (same global batches) on 1 rank, 1 rank with one thread, and 2 gloo ranks."""
    spec = ctx.cfg.scale_out
    kind = "cuda" if ctx.device.type == "cuda" and torch.cuda.device_count() >= 2 else "cpu"
    runs = {"1 rank": (1, {}), "1 rank, OMP_NUM_THREADS=1": (1, {"OMP_NUM_THREADS": "1"}), "2 ranks": (2, {})}
    if kind == "cuda" or not spec.one_thread:
        del runs["1 rank, OMP_NUM_THREADS=1"]
    measured = {}
    for label, (ranks, env) in runs.items():
        ctx.progress(f"scale out, DDP: {label}")
        out = ctx.workdir / "ddp" / f"{ranks}-ranks{'-1-thread' if env else ''}"
        # the timed epochs: the warm-up epoch and the validating one left out
        epochs = train(ctx, ranks, env, kind, teacher.url, out)[1:-1]
        steps = math.ceil(spec.train_rows / spec.train_batch) * len(epochs)
        measured[label] = {
            "part": DDP,
            "setup": f"{label} ({kind}{', gloo' if ranks > 1 and kind == 'cpu' else ''}, {threads(ranks, env)})",
            "rate": steps / sum(e["epoch_time_s"] for e in epochs),
            "world_size": epochs[0]["world_size"],
            "teacher_rows": epochs[0]["teacher_rows"],
        }
    base, two = measured["1 rank"]["rate"], measured["2 ranks"]["rate"]
    section.rows += [{**row, "vs 1": row["rate"] / base} for row in measured.values()]
    one_thread = measured.get("1 rank, OMP_NUM_THREADS=1")
    section.notes.append(
        f"DDP: 2 ranks / 1 rank {two / base:.2f}x steps/s"
        + (
            f", {two / one_thread['rate']:.2f}x against 1 rank with one thread, as torchrun runs each rank"
            if one_thread
            else ""
        )
        + f"; the teacher replica on the same machine, "
        f"{'the ranks on the same CPU cores' if kind == 'cpu' else 'one GPU per rank'}."
    )


def train(ctx: Context, ranks: int, env: dict[str, str], kind: str, teacher_url: str, out: Path) -> list[dict]:
    """`torchrun ... -m student_trainer train --set ...` (one rank: `python -m ...`, as the README's single-process
    run); its metrics.jsonl, one line per epoch."""
    spec = ctx.cfg.scale_out
    # the first warms up, the last validates: neither is timed
    epochs = spec.train_epochs + 2
    sets = [
        f"dataset={spec.dataset}",
        f"limit_train={spec.train_rows}",
        "val_size=32",
        f"batch_size={spec.train_batch}",
        f"attack.steps={spec.train_attack_steps}",
        f"epochs={epochs}",
        f"eval.every={epochs}",
        "schedule=constant",
        "track_dynamics=false",
        "method=akd",
        f"teacher.url={teacher_url}",
        f"teacher.name={spec.teacher}",
        f"device={kind}",
        f"out_dir={out}",
    ]
    command = [sys.executable]
    if ranks > 1:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command += ["-m", "student_trainer", "train", *[arg for s in sets for arg in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        raise RuntimeError(f"DDP training on {ranks} rank(s) failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def threads(ranks: int, env: dict[str, str]) -> str:
    """torch's intra-op threads per rank: OMP_NUM_THREADS if set, else torchrun sets 1 for several ranks."""
    n = env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    n = n or ("1" if ranks > 1 else str(torch.get_num_threads()))
    return f"{n} thread{'s' if n != '1' else ''} per rank"


# 4. a replica killed under load ----------------------------------------------------------------------------------


def killed_behind_nginx(ctx: Context, section: Section, a: ServerProcess, b: ServerProcess) -> None:
    """Plain httpx clients (no retry of their own) through nginx to two replicas; `a` is killed meanwhile.

    deploy/nginx.conf streams bodies rather than buffering them, so a query `a` held when it died, or sent to it
    before nginx saw it fail, is answered 502 (nginx cannot send it again; the trainer's client does, part 4b): the
    failures counted around the kill are those. The target: every query sent once the window around the kill is
    over is answered (by `b`)."""
    spec = ctx.cfg.scale_out
    balancer = servers.nginx_balancer("nginx-kill", [a.url, b.url], ctx.workdir / "logs")
    clients = [httpx.Client(base_url=balancer.url, timeout=300) for _ in range(spec.clients)]
    try:
        shape = ctx.teacher(spec.teacher).input_shape
        bodies = input_files(shape, Load(spec.clients, spec.rows_per_client))
        calls = [plain_call(client, soft_targets(ctx, body)) for client, body in zip(clients, bodies)]
        ctx.progress(f"scale out: killing {a.name} behind nginx under load")
        made, started, killed = under_kill(ctx, calls, a)
        what = f"requests sent {spec.kill_window_s:g} s or more after the kill answered / sent"
        record(ctx, section, KILLED_NGINX, what, made, started, killed, judge_after_window=True)
    finally:
        for client in clients:
            client.close()
        balancer.stop()


def plain_call(client: httpx.Client, request: Request) -> Callable[[], None]:
    def call() -> None:
        client.post(request.path, content=request.content, params=request.params).raise_for_status()

    return call


def client_failover(ctx: Context, section: Section, survivor: ServerProcess) -> None:
    """The trainer's own client over two replicas, no balancer; one of them is killed meanwhile."""
    spec = ctx.cfg.scale_out
    victim = replica(ctx, "replica-c")
    teachers = [
        RemoteTeacher([survivor.url, victim.url], spec.teacher, temperature=1.0, give_up_after_s=60.0)
        for _ in range(spec.clients)
    ]
    try:
        shape = ctx.teacher(spec.teacher).input_shape
        xs = [
            torch.rand(spec.rows_per_client, *shape, generator=torch.Generator().manual_seed(c))
            for c in range(len(teachers))
        ]
        calls = [teacher_call(t, x) for t, x in zip(teachers, xs)]
        ctx.progress(f"scale out: killing {victim.name} under RemoteTeacher's load")
        record(ctx, section, KILLED_CLIENT, "calls answered / made", *under_kill(ctx, calls, victim))
    finally:
        for t in teachers:
            t.close()
        victim.stop()


def teacher_call(teacher: RemoteTeacher, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        # adversarial rows: cache=bypass, as in the other parts
        teacher(x, adversarial=True)

    return call


def under_kill(ctx: Context, calls: list[Callable[[], None]], victim: ServerProcess) -> tuple[list[Call], float, float]:
    """Each call in a closed loop on its own thread for `kill_load_s`, and until it has started one call after the
    window around the kill (so that there are calls to judge there, however slow the machine); `victim` is sent
    SIGKILL `kill_after_s` in. Returns every call made, when the load started and when the kill came."""
    spec = ctx.cfg.scale_out
    for call in calls:
        # untimed: connections open before the clock starts
        call()
    made: list[Call] = []
    lock = threading.Lock()
    started = time.perf_counter()
    deadline = started + spec.kill_load_s
    # when the window around the kill ends, once the kill has come
    window_over = [math.inf]

    def loop(call: Callable[[], None]) -> None:
        late = False
        while time.perf_counter() < deadline or not late:
            t0 = time.perf_counter()
            late = late or t0 > window_over[0]
            try:
                call()
                ok = True
            except (httpx.HTTPError, TeacherUnavailable, TeacherRequestError):
                ok = False
            with lock:
                made.append(Call(t0, time.perf_counter() - t0, ok))

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(loop, call) for call in calls]
        time.sleep(spec.kill_after_s)
        # kill -9 of the replica's process
        victim.process.kill()
        killed = time.perf_counter()
        window_over[0] = killed + spec.kill_window_s
        for future in futures:
            future.result()
    return made, started, killed


def record(
    ctx: Context,
    section: Section,
    part: str,
    what: str,
    calls: list[Call],
    started: float,
    killed: float,
    judge_after_window: bool = False,
) -> None:
    """Rows for the calls before the kill, around it, and all of them; the target: every call answered, or, with
    `judge_after_window`, every call started once the window around the kill is over (a call in flight on the killed
    replica, or sent to it before nginx has seen it fail, may fail: nginx cannot resend a streamed body)."""
    spec = ctx.cfg.scale_out
    window = killed + spec.kill_window_s
    phases = {
        f"before the kill (the first {killed - started:.1f} s)": [c for c in calls if c.started + c.seconds < killed],
        "around the kill": [c for c in calls if c.started + c.seconds >= killed and c.started <= window],
        f"whole run ({spec.kill_load_s:g} s, {spec.clients} clients)": calls,
    }
    rows = [latency_row(part, label, phase) for label, phase in phases.items()]
    section.rows += rows
    before, around, whole = rows
    judged = [c for c in calls if c.started > window] if judge_after_window else calls
    failed = sum(not c.ok for c in judged)
    section.targets.append(
        Target(
            f"{what}, {part.split('. ', 1)[1]} (kill -9 under load)",
            ">=",
            1.0,
            (len(judged) - failed) / len(judged),
            f"{failed} of {len(judged)} failed ({whole['failed']} of {whole['sent']} in all); max latency "
            f"{before['max ms']:.0f} ms before the kill, {around['max ms']:.0f} ms around it",
        )
    )


def latency_row(part: str, label: str, calls: list[Call]) -> dict:
    seconds = [c.seconds for c in calls]
    return {
        "part": part,
        "setup": label,
        "p50 ms": percentile(seconds, 50) * 1e3,
        "p99 ms": percentile(seconds, 99) * 1e3,
        "max ms": max(seconds, default=math.nan) * 1e3,
        "sent": len(calls),
        "failed": sum(not c.ok for c in calls),
    }
