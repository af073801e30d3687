"""8. The cache at scale: what a service holding many more rows than its memory bound costs in memory and in speed,
and what each row format costs in served error.

1. Memory against rows stored. For stores of 1x, 10x, 100x ... the rows the chunk cache's bound (`[server.cache]
   memory_bytes`) holds, pre-filled with random keys and logits through `LogitCache`, a real `python -m
   teacher_service` process serves them: its resident set (VmRSS, /proc) after start-up, and its peak (VmHWM, reset
   after start-up) while every row is asked for by key (`POST /soft-targets/keys`, in stored order), then a random
   sample; against the bytes an in-memory mirror of the rows would hold. Every answer must be found and bit for bit
   the stored row, or the benchmark fails.
2. Hit rows/s, keys first: random batches over a store 10x the bound (rows read back from the store, mostly), over
   the same store under bounds that hold all of it (every chunk decoded in memory and the index resident: the
   mirror), and over half the rows the bound holds (a small hot set, every chunk held), alternated, each repeated
   until `min_seconds` are spent; then the teacher recomputing as many rows (`cache=bypass`), timed after them.
3. Bytes a row and served-probability error of each row format (`format_errors`, shared with
   scripts/store_error.py): each member's logits through the format's encode and decode, the ensemble's
   probabilities at each temperature, against the float32 ones.
"""

from __future__ import annotations

import shutil
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import tomli_w
import torch

from bench import servers
from bench.config import CacheScaleSpec, TeacherSpec
from bench.context import Context
from bench.sections import Section, Table, Target
from bench.timing import MAX_REPETITIONS, alternate, median
from shared import codec, protocol
from shared.configfile import merged
from shared.hashing import KEY_BYTES, file_version
from shared.models import build_model
from shared.protocol import CacheMode
from student_trainer.teacher_client import RemoteTeacher
from teacher_service.cache.row_formats import FLOAT32, RowFormat, row_format
from teacher_service.cache.rows import row_bytes
from teacher_service.cache.settings import RESIDENT_BYTES, CacheSettings
from teacher_service.cache.store import LogitCache
from teacher_service.ensemble import aggregate_probs

# targets: hit rows/s read back from the store at least half those of the mirror, and 20x PreActResNet-18 recomputing
TARGET_FROM_DISK = 0.5
TARGET_TEACHER, TARGET_SPEEDUP = "preact_resnet18", 20.0
# rows inserted at a time when pre-filling a store
FILL_BATCH = 4096
MIB = 1 << 20

COLUMNS = [
    "store",
    "rows",
    "mirror MiB",
    "index table MiB",
    "start-up s",
    "start-up peak MiB",
    "RSS after start-up MiB",
    "of it index MiB",
    "peak RSS MiB",
    "growth MiB",
    "of it anon MiB",
    "rows asked",
    "in order rows/s",
    "random rows/s",
]
HIT_COLUMNS = [
    "hits",
    "store rows",
    "batch",
    "requests",
    "ms a request",
    "middle half ms",
    "rows/s",
    "vs the mirror",
    "vs in memory",
    "vs recompute",
]
ERROR_COLUMNS = ["teacher", "format", "bytes a row", "temperature", "mean KL", "max KL", "max abs error"]


def run(ctx: Context) -> Section:
    spec = ctx.cfg.cache_scale
    classes = ctx.teacher(spec.teacher).num_classes
    bound_rows = spec.memory_bytes // row_bytes(classes)
    section = Section("cache_scale", "8. The cache at scale", about(spec, classes), COLUMNS)
    stores = ctx.workdir / "cache-scale"
    config = service_config(ctx, stores / "teacher.toml")
    version = file_version(Path(tomllib.loads(config.read_text())["teachers"][spec.teacher]["members"][0]["path"]))
    # multiple -> its service and rows, for part 2
    kept: dict[int, tuple[servers.ServerProcess, int]] = {}
    try:
        for multiple in sorted(spec.multiples):
            rows = multiple * bound_rows
            folder = stores / f"{multiple}x"
            ctx.progress(f"cache_scale: filling a store of {rows:,} rows ({multiple}x the bound)")
            fill_s = fill_store(folder, version, classes, rows, spec.chunk_rows, seed=multiple)
            server, row = memory_row(ctx, config, folder, multiple, rows, classes, fill_s)
            section.rows.append(row)
            if multiple in (1, spec.disk_multiple):
                kept[multiple] = (server, rows)
            else:
                server.stop()
                # the larger stores take much disk: each is removed once measured
                shutil.rmtree(folder, ignore_errors=True)
        mirror = mirror_service(ctx, stores, spec.disk_multiple, kept[spec.disk_multiple][1], classes)
        kept[0] = (mirror, kept[spec.disk_multiple][1])
        hits(ctx, section, kept[1], kept[spec.disk_multiple], mirror, classes)
    finally:
        for server, _ in kept.values():
            server.stop()
        shutil.rmtree(stores, ignore_errors=True)
    section.tables.append(Table("Bytes a row and served-probability error, per row format", ERROR_COLUMNS))
    for teacher in spec.error_teachers:
        ctx.progress(f"cache_scale: row formats, {teacher.arch} with {teacher.num_classes} classes")
        section.tables[-1].rows += error_rows(teacher, spec.formats, spec.temperatures, spec.error_rows)
    section.notes += [
        "index table: the key index's file-backed table (unlinked temporary files beside the store, 64 to 128 bytes a "
        "row); 'of it index' is how much of it was resident after start-up (/proc/<pid>/smaps). A table up to "
        f"`[server.cache] index_memory_bytes` ({index_bound(spec) / MIB:g} MiB here) stays resident; a larger one "
        "hands its pages back to the page cache after batches.",
        "start-up peak: VmHWM when the service was up (start-up verifies every row and builds the index). growth: "
        "the peak while serving over the resident set after start-up; the chunk cache fills to its bound "
        f"({spec.memory_bytes / MIB:g} MiB) in it; 'of it anon' is the growth of RssAnon (polled after each request), "
        "the process's own memory, apart from file pages it maps (the index table's are page cache the kernel can "
        f"reclaim). in order / random rows/s: the keys-first requests of that store, {spec.sweep_batch:,} keys each, "
        f"in stored order (about {-(-spec.sweep_batch // spec.chunk_rows)} chunks a request) / at random positions "
        "(a chunk read for nearly every row once the store is past the bound).",
        f"Row formats: every teacher has random weights, {spec.error_rows:,} random inputs, one member: the bench "
        "context has no trained teachers. Random weights give logits near 0, so these errors say little about a "
        "trained teacher's; `scripts/store_error.py` measures trained checkpoints with the same code "
        "(`format_errors`). KL = KL(float32 || served), both normalised in float64.",
    ]
    return section


def about(spec: CacheScaleSpec, classes: int) -> str:
    sampled = (
        f" (a store past {spec.sweep_max_rows:,} rows: {spec.sweep_max_rows:,} of them, in requests spread evenly "
        "over it)"
        if spec.sweep_max_rows
        else ""
    )
    return (
        f"Teacher {spec.teacher} ({classes} classes: {row_bytes(classes)} bytes a float32 row with its key and "
        f"checksum) over stores pre-filled with random rows through `LogitCache` (chunks of {spec.chunk_rows:,} "
        f"rows); chunk cache bound `[server.cache] memory_bytes` = {spec.memory_bytes / MIB:g} MiB = "
        f"{spec.memory_bytes // row_bytes(classes):,} rows; `[server.cache] index_memory_bytes` = "
        f"{index_bound(spec) / MIB:g} MiB. Memory: a fresh `python -m teacher_service` per store, "
        "its RSS from /proc (VmRSS after start-up; the peak is VmHWM, reset after start-up) while every row is asked "
        f"for by key, {spec.sweep_batch:,} keys a request in stored order{sampled}, then {spec.sample_rows:,} random "
        "rows; growth = peak - after start-up; mirror = the rows' bytes, what an in-memory mirror of them held. "
        "Every answer is checked: found, and bit for bit the stored row. Hits: keys first, "
        f"{spec.hit_batch} random rows a request (`outputs=member_logits`): the {spec.disk_multiple}x store under "
        "these bounds (from the store), a copy of it under bounds that hold all of it, every chunk read once (the "
        "mirror), and a small hot set, alternated among themselves (a fresh random batch each request); then "
        f"{spec.recompute_teacher} recomputing {spec.hit_batch} uint8 rows (`cache=bypass`). The store's files are "
        "wherever the kernel keeps them: on this machine, with memory to spare, in its page cache, so 'from the "
        "store' means read back from the store's files (a row at a time by byte range, past the chunk cache), not "
        "from the device."
    )


def index_bound(spec: CacheScaleSpec) -> int:
    return RESIDENT_BYTES if spec.index_memory_bytes is None else spec.index_memory_bytes


def service_config(ctx: Context, path: Path, memory_bytes: int | None = None) -> Path:
    """The bench's service TOML with only the served teacher and this benchmark's cache settings; with
    `memory_bytes` (the mirror), that chunk bound and the index's default bound instead of the spec's."""
    spec = ctx.cfg.cache_scale
    base = tomllib.loads(ctx.service_config.read_text())
    cache = {
        "memory_bytes": spec.memory_bytes if memory_bytes is None else memory_bytes,
        "chunk_rows": spec.chunk_rows,
        # the size bound plays no part here
        "max_bytes": 1 << 40,
    }
    if spec.index_memory_bytes is not None and memory_bytes is None:
        cache["index_memory_bytes"] = spec.index_memory_bytes
    server = merged(
        base["server"], {"cache": cache, "limits": {"queue_rows": max(16384, spec.sweep_batch, spec.hit_batch)}}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({"server": server, "teachers": {spec.teacher: base["teachers"][spec.teacher]}}))
    return path


# ---------------------------------------------------------------------------------------------- the stores' rows

_M = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64, so distinct inputs give distinct outputs."""
    with np.errstate(over="ignore"):
        z = x + _M(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _M(30))) * _M(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _M(27))) * _M(0x94D049BB133111EB)
        return z ^ (z >> _M(31))


def stored_rows(positions: np.ndarray, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The key (N, 16) uint8 and logits (N, classes) float32 of the rows at `positions` of a store filled with `seed`:
    random-looking, every key distinct, computed from the position alone so any row is checked without the store."""
    at = np.asarray(positions, np.uint64) + _M(seed << 40)
    keys = np.stack([_mix(at * _M(2)), _mix(at * _M(2) + _M(1))], axis=1).view(np.uint8).reshape(len(at), KEY_BYTES)
    bits = _mix((at[:, None] * _M(classes) + np.arange(classes, dtype=np.uint64)) ^ _M(0x5EED5EED5EED5EED))
    # uniform in [-4, 4)
    logits = (bits >> _M(40)).astype(np.float32) * np.float32(8 / (1 << 24)) - np.float32(4)
    return keys, logits


def fill_store(folder: Path, version: str, classes: int, rows: int, chunk_rows: int, seed: int) -> float:
    """Seconds to write `rows` rows into a fresh store's float32 namespace `version` through LogitCache."""
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    cache = LogitCache(str(folder), CacheSettings(max_bytes=1 << 40, chunk_rows=chunk_rows, memory_bytes=0))
    ns = cache.namespace(version, classes)
    for i, start in enumerate(range(0, rows, FILL_BATCH)):
        keys, logits = stored_rows(np.arange(start, min(rows, start + FILL_BATCH)), classes, seed)
        if ns.insert([k.tobytes() for k in keys], logits) != len(keys):
            raise RuntimeError(f"cache_scale: the store took {ns.rows} of {rows} rows")
        if i % 64 == 63:
            # chunks wait in memory until written: keep the writer close behind
            cache.drain()
    cache.close()
    if ns.committed != rows:
        raise RuntimeError(f"cache_scale: {ns.committed} of {rows} rows were committed")
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- 1. memory


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def index_mappings_kib(pid: int, folder: Path) -> tuple[int, int]:
    """(size, resident) of the process's mappings of unlinked files in `folder`: the cache's key index tables (and
    nothing else: the store's own files are read, never mapped)."""
    size = rss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        # a mapping's header: range perms offset dev inode path
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5].startswith(f"{folder}/") and line.endswith("(deleted)")
        elif inside and fields[0] == "Size:":
            size += int(fields[1])
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1])
    return size, rss


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its VmRSS (Linux's clear_refs 5); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class KeysClient:
    """Keys-first requests for rows of one store, each answer checked: every row found, bit for bit as stored."""

    def __init__(self, url: str, teacher: str, classes: int, seed: int):
        self.client = httpx.Client(base_url=url, timeout=300)
        self.teacher, self.classes, self.seed = teacher, classes, seed

    def body(self, positions: np.ndarray) -> tuple[bytes, np.ndarray]:
        keys, logits = stored_rows(positions, self.classes, self.seed)
        return codec.encode({protocol.KEYS_KEY: torch.from_numpy(keys)}), logits

    def ask(self, body: bytes, expected: np.ndarray) -> int:
        """Rows found (all of them, or RuntimeError)."""
        response = self.client.post(
            protocol.SOFT_TARGET_KEYS_PATH,
            content=body,
            params={"teacher": self.teacher, "outputs": "member_logits"},
        )
        response.raise_for_status()
        answer = codec.decode(response.content)
        found = answer[protocol.FOUND_KEY].numpy().astype(bool)
        if not found.all():
            raise RuntimeError(f"cache_scale invalid: {int((~found).sum())} of {len(found)} stored rows not found")
        if not np.array_equal(answer["member_logits"][0].numpy(), expected):
            raise RuntimeError("cache_scale invalid: a hit differs from the row stored")
        return len(found)

    def close(self) -> None:
        self.client.close()


def sweep_positions(rows: int, batch: int, max_rows: int | None) -> list[np.ndarray]:
    """Every row in stored order, `batch` a request; past `max_rows`, that many in requests spread evenly."""
    starts = np.arange(0, rows, batch)
    if max_rows is not None and rows > max_rows:
        starts = np.unique(np.linspace(0, len(starts) - 1, max(1, max_rows // batch)).round().astype(int)) * batch
    return [np.arange(s, min(rows, s + batch)) for s in starts]


def memory_row(
    ctx: Context, config: Path, folder: Path, multiple: int, rows: int, classes: int, fill_s: float
) -> tuple[servers.ServerProcess, dict]:
    """Start a service over the store, ask for its rows, and measure its resident set; the service is left running."""
    spec = ctx.cfg.cache_scale
    ctx.progress(f"cache_scale: starting a service over {rows:,} rows")
    started = time.perf_counter()
    server = servers.teacher_service(
        f"cache-scale-{multiple}x",
        config,
        ctx.workdir / "logs",
        ctx.device.type,
        True,
        folder,
        # start-up verifies every row
        start_timeout_s=servers.START_TIMEOUT_S + rows / 20_000,
    )
    startup_s = time.perf_counter() - started
    pid = server.process.pid
    try:
        time.sleep(0.5)
        after_start, startup_peak = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        anon_after_start = peak_anon = status_kib(pid, "RssAnon")
        index_size, index_after_start = index_mappings_kib(pid, folder)
        peak_reset = reset_peak(pid)
        peak = after_start
        client = KeysClient(server.url, spec.teacher, classes, seed=multiple)
        sample = np.random.default_rng(multiple).integers(0, rows, spec.sample_rows)
        parts = {
            "in order": sweep_positions(rows, spec.sweep_batch, spec.sweep_max_rows),
            "random": np.array_split(sample, max(1, -(-len(sample) // spec.sweep_batch))),
        }
        asked = found = 0
        spent = {part: 0.0 for part in parts}
        try:
            for part, requests in parts.items():
                ctx.progress(f"cache_scale: asking for {sum(len(r) for r in requests):,} rows by key, {part}")
                for positions in requests:
                    body, expected = client.body(positions)
                    t = time.perf_counter()
                    found += client.ask(body, expected)
                    spent[part] += time.perf_counter() - t
                    asked += len(positions)
                    peak = max(peak, status_kib(pid, "VmRSS"))
                    peak_anon = max(peak_anon, status_kib(pid, "RssAnon"))
        finally:
            client.close()
        if peak_reset:
            peak = max(peak, status_kib(pid, "VmHWM"))
        index_at_end = index_mappings_kib(pid, folder)[1]
    except BaseException:
        server.stop()
        raise
    mirror = rows * row_bytes(classes)
    return server, {
        "store": f"{multiple}x",
        "rows": rows,
        "mirror MiB": mirror / MIB,
        "store MiB": folder_bytes(folder) / MIB,
        "index table MiB": index_size / 1024,
        "fill s": fill_s,
        "start-up s": startup_s,
        "RSS after start-up MiB": after_start / 1024,
        "of it index MiB": index_after_start / 1024,
        "start-up peak MiB": startup_peak / 1024,
        "peak RSS MiB": peak / 1024,
        "peak from": "VmHWM" if peak_reset else "VmRSS after each request",
        "growth MiB": (peak - after_start) / 1024,
        "growth / bound": (peak - after_start) * 1024 / spec.memory_bytes,
        "of it anon MiB": (peak_anon - anon_after_start) / 1024,
        "index at end MiB": index_at_end / 1024,
        "rows asked": asked,
        "rows found": found,
        "in order rows/s": sum(len(r) for r in parts["in order"]) / spent["in order"],
        "random rows/s": len(sample) / spent["random"],
    }


# ---------------------------------------------------------------------------------------------- 2. hit rows/s


def mirror_service(ctx: Context, stores: Path, multiple: int, rows: int, classes: int) -> servers.ServerProcess:
    """A service over a copy of the `multiple`x store (a folder takes one service) whose bounds hold all of it, every
    chunk read once before it is returned: the mirror, every row held decoded in the service's memory."""
    spec = ctx.cfg.cache_scale
    folder = stores / f"{multiple}x-mirror"
    shutil.copytree(stores / f"{multiple}x", folder)
    # ChunkLines' bytes a row, with room
    whole = 2 * rows * (row_bytes(classes) + 1)
    config = service_config(ctx, stores / "mirror.toml", memory_bytes=whole)
    ctx.progress(f"cache_scale: a service holding all {rows:,} rows in memory (the mirror), every chunk read once")
    server = servers.teacher_service(
        f"cache-scale-{multiple}x-mirror",
        config,
        ctx.workdir / "logs",
        ctx.device.type,
        True,
        folder,
        start_timeout_s=servers.START_TIMEOUT_S + rows / 20_000,
    )
    client = KeysClient(server.url, spec.teacher, classes, seed=multiple)
    try:
        for positions in sweep_positions(rows, spec.sweep_batch, None):
            client.ask(*client.body(positions))
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()
    return server


def hits(
    ctx: Context,
    section: Section,
    in_memory: tuple[servers.ServerProcess, int],
    from_disk: tuple[servers.ServerProcess, int],
    mirror: servers.ServerProcess,
    classes: int,
) -> None:
    spec = ctx.cfg.cache_scale
    batch = spec.hit_batch
    # a fresh random batch every call
    calls = MAX_REPETITIONS + ctx.cfg.warmup + 1
    hot_rows = max(batch, from_memory_rows(spec.memory_bytes, spec.chunk_rows, classes) // 2)
    rng = np.random.default_rng(0)
    clients = {
        "in memory": KeysClient(in_memory[0].url, spec.teacher, classes, seed=1),
        "mirror": KeysClient(mirror.url, spec.teacher, classes, seed=spec.disk_multiple),
        "from disk": KeysClient(from_disk[0].url, spec.teacher, classes, seed=spec.disk_multiple),
    }
    pools = {"in memory": hot_rows, "mirror": from_disk[1], "from disk": from_disk[1]}
    batches = {
        what: [client.body(rng.integers(0, pools[what], batch)) for _ in range(calls)]
        for what, client in clients.items()
    }
    ctx.progress(f"cache_scale: every chunk of the {hot_rows:,} rows in memory read once")
    for positions in sweep_positions(hot_rows, spec.sweep_batch, None):
        clients["in memory"].ask(*clients["in memory"].body(positions))
    name = spec.recompute_teacher
    shape = ctx.teacher(name).input_shape
    images = torch.randint(0, 256, (batch, *shape), generator=torch.Generator().manual_seed(batch), dtype=torch.uint8)
    x = (images.float() / 255).to(ctx.device)
    recompute = RemoteTeacher(ctx.service().url, name, temperature=1.0, clean_cache=CacheMode.bypass)

    def asker(what: str) -> Callable[[], int]:
        queue = iter(batches[what])
        return lambda: clients[what].ask(*next(queue))

    ctx.progress(f"cache_scale: hits in memory vs the mirror vs from the store, {batch} rows, alternated")
    try:
        # The hits are alternated among themselves only: another process's long forward pass in the same round
        # chills the CPU caches for whichever hit comes next, and in ABBA order that is always the same one.
        times = alternate(
            {"in memory": asker("in memory"), "mirror": asker("mirror"), "from disk": asker("from disk")},
            ctx.cfg.repetitions,
            ctx.cfg.warmup,
            ctx.device,
            ctx.cfg.min_seconds,
        )
        ctx.progress(f"cache_scale: {name} recomputing {batch} rows")
        times |= alternate({"recompute": lambda: recompute(x)}, ctx.cfg.repetitions, ctx.cfg.warmup, ctx.device)
    finally:
        recompute.close()
        for client in clients.values():
            client.close()
    seconds = {what: median(samples) for what, samples in times.items()}
    labels = {
        "in memory": f"in memory: random rows of {hot_rows:,}, every chunk in the chunk cache",
        "mirror": f"the mirror: random rows of {from_disk[1]:,}, all held in memory (bounds that hold them all)",
        "from disk": f"from the store: random rows of {from_disk[1]:,} ({spec.disk_multiple}x the bound)",
        "recompute": f"recomputed: {name}, `cache=bypass`, uint8 rows",
    }
    table = Table(f"Hit rows/s, keys first, {batch} rows a request, vs recomputing", HIT_COLUMNS)
    for what, s in seconds.items():
        table.rows.append(
            {
                "hits": labels[what],
                "store rows": pools.get(what),
                "batch": batch,
                "requests": len(times[what]),
                "ms a request": s * 1e3,
                "middle half ms": "{:.2f} - {:.2f}".format(*np.percentile(np.array(times[what]) * 1e3, [25, 75])),
                "rows/s": batch / s,
                "vs in memory": seconds["in memory"] / s,
                "vs the mirror": seconds["mirror"] / s,
                "vs recompute": seconds["recompute"] / s,
                "samples": times[what],
            }
        )
    section.tables.append(table)
    disk, memory, mirrored, again = (batch / seconds[w] for w in ("from disk", "in memory", "mirror", "recompute"))
    section.targets.append(
        Target(
            f"hit rows/s from the store / the mirror, {batch} random rows of the same store, {spec.disk_multiple}x "
            "the chunk cache",
            ">=",
            TARGET_FROM_DISK,
            disk / mirrored,
            f"{disk:,.0f} vs {mirrored:,.0f} rows/s; a small hot set held in memory: {memory:,.0f} rows/s "
            f"({disk / memory:.2f} of it)",
        )
    )
    if name == TARGET_TEACHER:
        section.targets.append(
            Target(
                f"hit rows/s from the store / recompute, {name}, batch {batch}",
                ">=",
                TARGET_SPEEDUP,
                disk / again,
                f"{disk:,.0f} vs {again:,.0f} rows/s; held in memory: {memory / again:,.0f}x",
            )
        )


def from_memory_rows(memory_bytes: int, chunk_rows: int, classes: int) -> int:
    """Rows of the whole chunks the chunk cache's bound holds."""
    return memory_bytes // (chunk_rows * row_bytes(classes)) * chunk_rows


# ---------------------------------------------------------------------------------------------- 3. row formats


def member_logits(models: list[torch.nn.Module], x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(members, N, K): each model's logits for `x`."""
    with torch.inference_mode():
        return torch.stack([torch.cat([m(x[i : i + batch]) for i in range(0, len(x), batch)]) for m in models])


def served(logits: torch.Tensor, fmt: RowFormat) -> torch.Tensor:
    """Each member's rows as a cache hit gives them back: the format's own encode and decode (row_formats)."""
    k = logits.shape[-1]
    return torch.stack([torch.from_numpy(fmt.decode(fmt.encode(m.numpy()), k)) for m in logits])


def format_errors(logits: torch.Tensor, fmt: RowFormat, temperature: float) -> tuple[float, float, float]:
    """(mean KL(exact || served), max KL, max |p - p_served|) of the equally weighted ensemble's probabilities: the
    service serves a hit as aggregate_probs(decode(encode(logits))), so this is the error a hit adds."""
    weights = torch.full((len(logits),), 1 / len(logits))
    exact = aggregate_probs(logits, weights, temperature).double()
    rounded = aggregate_probs(served(logits, fmt), weights, temperature).double()
    # float32 probabilities sum to 1 only within rounding, which alone can make a KL of the order of 1e-8 negative:
    # each is normalised in float64 for the divergence (the absolute error is of the probabilities as served)
    p, q = exact / exact.sum(1, keepdim=True), rounded / rounded.sum(1, keepdim=True)
    kl = (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(1)
    return float(kl.mean()), float(kl.max()), float((exact - rounded).abs().max())


def usable_formats(names: list[str], num_classes: int) -> list[RowFormat]:
    """float32 and the named formats that can hold `num_classes` (a top-k needs more than k classes)."""
    formats = [FLOAT32] + [row_format(n) for n in names if n != FLOAT32.name]
    return [f for f in formats if getattr(f, "k", 0) < num_classes]


def error_rows(teacher: TeacherSpec, formats: list[str], temperatures: list[float], rows: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(teacher.arch, teacher.num_classes, teacher.input_shape).eval()
    x = torch.rand(rows, *teacher.input_shape, generator=torch.Generator().manual_seed(1))
    logits = member_logits([model], x)
    label = (
        f"{teacher.arch}, {teacher.num_classes} classes, random weights "
        f"(logits in [{float(logits.min()):.2f}, {float(logits.max()):.2f}])"
    )
    out = []
    for fmt in usable_formats(formats, teacher.num_classes):
        for t in temperatures:
            mean_kl, max_kl, max_abs = format_errors(logits, fmt, t)
            out.append(
                {
                    "teacher": label,
                    "format": fmt.name,
                    "bytes a row": row_bytes(teacher.num_classes, fmt),
                    "temperature": float(t),
                    "mean KL": mean_kl,
                    "max KL": max_kl,
                    "max abs error": max_abs,
                }
            )
    skipped = [n for n in formats if getattr(row_format(n), "k", 0) >= teacher.num_classes]
    if skipped:
        out.append({"teacher": label, "format": f"{', '.join(skipped)}: cannot hold {teacher.num_classes} classes"})
    return out
