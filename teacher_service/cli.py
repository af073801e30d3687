"""`akd serve`: run the teacher service under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shared.configfile import add_set_argument
from teacher_service.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("AKD_CONFIG"), help="teachers TOML (or $AKD_CONFIG)")
    parser.add_argument("--host", help="bind address (or [server].host, $AKD_HOST)")
    parser.add_argument("--port", type=int, help="bind port (or [server].port, $AKD_PORT)")
    parser.add_argument("--cache-dir", help="zarr cache store (or [server.cache] dir, $AKD_CACHE_DIR)")
    add_set_argument(
        parser,
        "override any config key, dotted from the config's root, e.g. --set server.limits.body_bytes=1048576 "
        "or --set teachers.mnist.temperature=2 (repeatable; over the file and the environment, under --host, "
        "--port and --cache-dir)",
    )


def run(args: argparse.Namespace) -> int:
    if not args.config:
        print("akd serve: --config (or AKD_CONFIG) is required", file=sys.stderr)
        return 2
    try:
        flags = {"host": args.host, "port": args.port, "cache.dir": args.cache_dir}
        config = load_config(args.config, overrides=flags, sets=args.sets)
    except ConfigError as exc:
        print(f"akd serve: {exc}", file=sys.stderr)
        return 2
    from teacher_service.app import create_app
    from teacher_service.cache.folder_lock import StoreLocked
    from teacher_service.server import serve

    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(config)
    except (ConfigError, StoreLocked) as exc:
        print(f"akd serve: {exc}", file=sys.stderr)
        return 2
    return serve(app, config.server, app.state.service.stop)


# for `akd serve` (akd/cli.py)
COMMANDS = {"serve": (add_arguments, run)}
