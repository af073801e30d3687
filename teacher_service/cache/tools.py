"""`akd cache`: see, check and tidy a teacher service's zarr cache without running the service.

    akd cache stats  --config teachers.toml   # each namespace (member version): rows, bytes, the teachers using it
                                              # (--url of the running service adds each one's hit rate)
    akd cache verify --config teachers.toml   # read every committed row back and check its checksum
    akd cache gc     --config teachers.toml   # delete the namespaces no teacher of the config uses (stale versions)

`--cache-dir` names the store instead of the config's `[server.cache] dir` (stats and verify then need no config), in
any spelling the service takes (cache_location): every spelling of one folder is that folder, and gc takes its lock.
A folder of replica caches (`[server.cache] slots`: replica-0, replica-1, ...) is taken one replica at a time.
stats and verify only read, so they may run beside a service: its rows become visible (committed) only after
their data is written. gc deletes, so it takes the store's lock, which a running service holds: stop it first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.configfile import ConfigError
from teacher_service.cache.folder_lock import StoreLocked, lock_folder
from teacher_service.cache.layout import DAMAGED_DIR
from teacher_service.cache.location import cache_location
from teacher_service.cache.row_formats import row_format
from teacher_service.cache.rows import row_bytes
from teacher_service.cache.verify import NamespaceDamaged, count_verified, inspect_namespace, list_namespaces


@dataclass
class Namespace:
    """One member version's rows in one store, as its metadata says."""

    version: str
    rows: int = 0
    num_classes: int = 0
    # how its logits are stored
    dtype: str = "float32"
    # why its metadata fails its checks (the service sets it aside when it starts)
    problem: str | None = None
    # members of the config's teachers with this version
    used_by: list[str] = field(default_factory=list)
    # since the running service at --url started
    hits: float | None = None
    misses: float | None = None

    @property
    def nbytes(self) -> int:
        return self.rows * row_bytes(self.num_classes, row_format(self.dtype)) if self.problem is None else 0


@dataclass
class Store:
    # a local folder, or a store URL (s3://...)
    folder: Path | str
    namespaces: list[Namespace]
    # entries that are not namespaces: never touched
    foreign: list[str]
    # what the service set aside in .damaged/
    damaged_bytes: int

    def stale(self) -> list[Namespace]:
        return [ns for ns in self.namespaces if not ns.used_by]


def cache_folders(path: Path | str) -> list[Path | str]:
    """`path` itself when it is a cache (or a store URL), else its replica caches ([server.cache] slots)."""
    if isinstance(path, str) or (path / "zarr.json").is_file():
        return [path]
    replicas = sorted(p for p in path.glob("replica-*") if (p / "zarr.json").is_file())
    if not replicas:
        raise ConfigError(f"{path} is not an akd cache (no zarr.json in it) nor a folder of replica-<i> caches")
    return replicas


def survey(folder: Path | str, versions: dict[str, list[str]]) -> Store:
    """What the store at `folder` (or URL) holds, read-only."""
    import zarr

    root = zarr.open_group(str(folder), mode="r")
    names, foreign = list_namespaces(root)
    namespaces = []
    for name in names:
        try:
            header = inspect_namespace(root, name)
            namespaces.append(
                Namespace(name, header.live_rows, header.num_classes, header.fmt.name, used_by=versions.get(name, []))
            )
        except NamespaceDamaged as exc:
            namespaces.append(Namespace(name, exc.rows, problem=str(exc), used_by=versions.get(name, [])))
    # an object store keeps none aside
    damaged = Path(folder) / DAMAGED_DIR if isinstance(folder, Path) else None
    damaged_bytes = (
        sum(f.stat().st_size for f in damaged.rglob("*") if f.is_file()) if damaged and damaged.is_dir() else 0
    )
    return Store(folder, namespaces, foreign, damaged_bytes)


# -- the subcommands -------------------------------------------------------------------------------------------


def with_hit_rates(stores: list[Store], url: str, token: str | None) -> None:
    """Each namespace's hits and misses from a running service's /metrics (counted since it started)."""
    import httpx

    from shared import protocol
    from teacher_service import scrape

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url.rstrip("/") + protocol.METRICS_PATH, headers=headers, timeout=30)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(f"--url {url}: could not read its /metrics ({type(exc).__name__}: {exc})") from None
    for ns in (ns for store in stores for ns in store.namespaces):
        ns.hits = scrape.total(response.text, "akd_cache_hits_total", member=ns.version)
        ns.misses = scrape.total(response.text, "akd_cache_misses_total", member=ns.version)


def stats(stores: list[Store], config: str | None, as_json: bool) -> int:
    if as_json:
        print(json.dumps([_store_record(s) for s in stores], indent=2))
        return 0
    for store in stores:
        total_rows = sum(ns.rows for ns in store.namespaces if ns.problem is None)
        print(
            f"{store.folder}: {len(store.namespaces)} namespace(s), {total_rows:,} rows, "
            f"{_size(sum(ns.nbytes for ns in store.namespaces))}; {DAMAGED_DIR}/ holds {_size(store.damaged_bytes)}"
        )
        print(f"  {'member version':<18} {'rows':>12} {'classes':>8} {'bytes':>10} {'hit rate':>9}  used by")
        for ns in store.namespaces:
            used = (
                ", ".join(ns.used_by) if ns.used_by else ("stale: no teacher of the config uses it" if config else "-")
            )
            if ns.problem:
                used += f" [DAMAGED metadata: {ns.problem}]"
            print(
                f"  {ns.version:<18} {ns.rows:>12,} {ns.num_classes or '-':>8} {_size(ns.nbytes):>10} "
                f"{_hit_rate(ns):>9}  {used}"
            )
        if store.foreign:
            print(f"  not namespaces (left alone): {', '.join(store.foreign)}")
    if config is None:
        print("(give --config to tell the versions a config serves from stale ones)")
    if all(ns.hits is None for store in stores for ns in store.namespaces):
        print("(give --url of the running service for hit rates since it started)")
    return 0


def _hit_rate(ns: Namespace) -> str:
    if ns.hits is None or not (ns.hits + ns.misses):
        return "-"
    return f"{ns.hits / (ns.hits + ns.misses):.1%}"


def verify(stores: list[Store]) -> int:
    """Every committed row read back and checked; 1 when anything fails."""
    import zarr

    damaged = 0
    for store in stores:
        root = zarr.open_group(str(store.folder), mode="r")
        for ns in store.namespaces:
            where = f"{store.folder}/{ns.version}"
            if ns.problem is not None:
                damaged += 1
                print(f"{where}: DAMAGED metadata: {ns.problem}")
                continue
            good, problems = count_verified(ns.version, inspect_namespace(root, ns.version))
            bad = ns.rows - good
            if bad:
                damaged += 1
                print(f"{where}: DAMAGED: {bad:,} of {ns.rows:,} rows fail ({'; '.join(problems[:8])})")
            else:
                print(f"{where}: ok, {ns.rows:,} rows verified")
    if damaged:
        print(
            f"{damaged} namespace(s) damaged: the service sets them aside and recomputes their rows when it starts",
            file=sys.stderr,
        )
    return 1 if damaged else 0


def gc(stores: list[Store], dry_run: bool, damaged: bool, force: bool, max_bytes: int | None = None) -> int:
    """Delete the namespaces the config does not serve (and with `damaged`, what .damaged/ keeps); with `max_bytes`,
    then evict the oldest chunks of the served ones until the store holds at most that."""
    for store in stores:
        if not isinstance(store.folder, Path):
            raise ConfigError(
                f"gc deletes under the store's lock, which only a local folder has; {store.folder} is a URL"
            )
        stale = store.stale()
        if stale and len(stale) == len(store.namespaces) and not force:
            print(
                f"{store.folder}: no teacher of the config uses any of its {len(stale)} namespace(s); is it the config "
                "this cache serves? Nothing deleted (--force deletes them all)",
                file=sys.stderr,
            )
            return 2
        # raises StoreLocked while a service runs on the store
        lock = None if dry_run else lock_folder(store.folder)
        try:
            for ns in stale:
                print(
                    f"{store.folder}: {'would delete' if dry_run else 'deleting'} {ns.version} ({ns.rows:,} rows, "
                    f"{_size(ns.nbytes)})"
                )
                if not dry_run:
                    shutil.rmtree(store.folder / ns.version)
            if damaged and (store.folder / DAMAGED_DIR).is_dir():
                print(
                    f"{store.folder}: {'would delete' if dry_run else 'deleting'} {DAMAGED_DIR}/ "
                    f"({_size(store.damaged_bytes)})"
                )
                if not dry_run:
                    shutil.rmtree(store.folder / DAMAGED_DIR)
            freed = sum(ns.nbytes for ns in stale) + (store.damaged_bytes if damaged else 0)
            print(f"{store.folder}: {'would free' if dry_run else 'freed'} {_size(freed)}")
        finally:
            if lock is not None:
                os.close(lock)
        if max_bytes is not None:
            evict_down_to(store, max_bytes, dry_run)
    return 0


def evict_down_to(store: Store, max_bytes: int, dry_run: bool) -> None:
    """The service's own eviction, run on a stopped store: oldest chunks first (a service's recency is not kept on
    disk, so age stands for it); the store's lock is taken by the cache itself."""
    from teacher_service.cache.settings import CacheSettings
    from teacher_service.cache.store import LogitCache

    served = [ns for ns in store.namespaces if ns.used_by and ns.problem is None]
    held = sum(ns.nbytes for ns in served)
    if held <= max_bytes:
        print(f"{store.folder}: its served versions hold {_size(held)}, within {_size(max_bytes)}: nothing to evict")
        return
    if dry_run:
        print(f"{store.folder}: would evict at least {_size(held - max_bytes)}, the oldest whole chunks first")
        return
    cache = LogitCache(store.folder, CacheSettings(max_bytes=max_bytes, when_full="evict"))
    try:
        rows = {ns.version: cache.namespace(ns.version, ns.num_classes, ns.dtype) for ns in served}
        freed = cache.evict_down_to(max_bytes)
        evicted = sum(ns.evicted_rows for ns in rows.values())
        print(f"{store.folder}: evicted {evicted:,} rows ({_size(freed)}), the oldest whole chunks first")
    finally:
        cache.close()


# -- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["stats", "verify", "gc"], help="what to do")
    parser.add_argument("--config", help="the service's teachers TOML: its cache.dir, and the versions it serves")
    parser.add_argument("--cache-dir", help="the cache folder (instead of the config's server.cache.dir)")
    parser.add_argument("--json", action="store_true", help="stats: as JSON")
    parser.add_argument("--url", help="stats: the running service, for each version's hit rate since it started")
    parser.add_argument("--token", help="stats: the service's token, if it has one")
    parser.add_argument("--dry-run", action="store_true", help="gc: say what would be deleted, delete nothing")
    parser.add_argument("--damaged", action="store_true", help=f"gc: also delete what {DAMAGED_DIR}/ keeps")
    parser.add_argument("--force", action="store_true", help="gc: delete even when the config uses no namespace")
    parser.add_argument(
        "--max-bytes", type=int, help="gc: then evict the served versions' oldest chunks until the store fits this"
    )


def run(args: argparse.Namespace) -> int:
    try:
        folder, versions = _target(args)
        stores = [survey(f, versions) for f in cache_folders(folder)]
        if args.action == "stats" and args.url:
            with_hit_rates(stores, args.url, args.token)
        if args.action == "stats":
            return stats(stores, args.config, args.json)
        if args.action == "verify":
            return verify(stores)
        if args.max_bytes is not None and args.max_bytes < 0:
            raise ConfigError(f"--max-bytes: expected a size in bytes >= 0, got {args.max_bytes}")
        return gc(stores, args.dry_run, args.damaged, args.force, args.max_bytes)
    except (ConfigError, StoreLocked) as exc:
        message = str(exc) + (" (stop the service first)" if isinstance(exc, StoreLocked) else "")
        print(f"akd cache {args.action}: {message}", file=sys.stderr)
        return 2


def _target(args: argparse.Namespace) -> tuple[Path | str, dict[str, list[str]]]:
    """The cache folder, and the member versions the config serves ({} without a config)."""
    if args.action == "gc" and not args.config:
        raise ConfigError("--config is required: gc keeps the versions the config's teachers use")
    versions: dict[str, list[str]] = {}
    store = args.cache_dir
    if args.config:
        from teacher_service.config import load_config
        from teacher_service.registry import member_versions

        config = load_config(args.config, overrides={"cache.dir": args.cache_dir})
        store, versions = config.server.cache.dir, member_versions(config)
    if not store:
        raise ConfigError("no cache: give --cache-dir, or --config with a server.cache.dir")
    # every spelling of a folder resolves to the real folder, as the service resolves it
    folder = cache_location(store, Path.cwd())
    if isinstance(folder, str):
        # an object store: zarr reads it (stats, verify)
        return folder, versions
    if not folder.is_dir():
        raise ConfigError(f"cache folder {folder} does not exist")
    return folder, versions


def _store_record(store: Store) -> dict:
    return {
        "folder": str(store.folder),
        "namespaces": [{**asdict(ns), "bytes": ns.nbytes} for ns in store.namespaces],
        "foreign": store.foreign,
        "damaged_bytes": store.damaged_bytes,
    }


def _size(nbytes: int) -> str:
    if nbytes < 1000:
        return f"{nbytes} B"
    size = nbytes / 1000
    for unit in ("KB", "MB"):
        if size < 1000:
            return f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} GB"


# for `akd cache` (akd/cli.py)
COMMANDS = {"cache": (add_arguments, run)}
