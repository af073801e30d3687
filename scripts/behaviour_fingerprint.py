"""What a checkout does, as hashes to compare before and after a change meant to keep behaviour: the service's
answers to a fixed set of requests, the cache files they leave, the answers served from an older checkout's cache,
and the checkpoints of a 1-epoch PGD-AT and a 1-epoch AKD run (their tensors and settings, not their timings).

    python scripts/behaviour_fingerprint.py OUT [--example DIR] [--old-cache DIR]   # OUT/fingerprint.json
    python scripts/behaviour_fingerprint.py --compare BEFORE/fingerprint.json AFTER/fingerprint.json

Run it from each checkout with the same interpreter. Give the second run `--example BEFORE/example` (a torch.export
file records its source's paths, so the teachers must be the same files) and `--old-cache BEFORE/cache`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

REPO = Path(__file__).resolve().parents[1]
# What a checkpoint records of where and how long it ran: not behaviour.
VOLATILE = {"epoch_time_s", "out_dir", "url"}
REQUESTS = [(torch.uint8, 4), (torch.float32, 16), (torch.float16, 7), (torch.uint8, 33)]


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_hash(path: Path) -> str:
    """Every tensor's bytes and every other value of a checkpoint, in a fixed order, VOLATILE keys left out."""
    digest = hashlib.sha256()

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                if key not in VOLATILE:
                    walk(value[key], f"{where}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(value, torch.Tensor):
            digest.update(where.encode() + value.detach().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{where}={value!r}".encode())

    walk(torch.load(path, weights_only=False), "")
    return digest.hexdigest()


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def serve(config: Path, cache: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = 18000 + os.getpid() % 1000
    command = [sys.executable, "-m", "teacher_service", "--config", str(config), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--cache-dir", str(cache)],
        env=environment(),
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the service ended: see {log}")
        time.sleep(0.2)
    raise SystemExit(f"the service did not start: see {log}")


def answers(url: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    found = {}
    for dtype, rows in REQUESTS:
        if dtype == torch.uint8:
            x = torch.randint(0, 256, (rows, 1, 28, 28), generator=generator, dtype=torch.uint8)
        else:
            x = torch.rand(rows, 1, 28, 28, generator=generator).to(dtype)
        for mode in ["use", "use", "bypass", "refresh"]:
            params = {"teacher": "mnist", "outputs": "probs,logits,member_logits", "temperature": 2.0, "cache": mode}
            r = httpx.post(f"{url}/soft-targets", params=params, content=save({"inputs": x}), timeout=600)
            found.setdefault(f"{dtype}-{rows}-{mode}", []).append(
                {
                    "status": r.status_code,
                    "sha256": hashlib.sha256(r.content).hexdigest(),
                    "hits": r.headers.get("x-cache-hits"),
                }
            )
    bad = httpx.post(f"{url}/soft-targets", params={"teacher": "mnist"}, content=b"not safetensors", timeout=600)
    found["refused"] = {"status": bad.status_code, "body": bad.json()}
    teachers = httpx.get(f"{url}/teachers").json()
    for teacher in teachers["teachers"]:
        for member in teacher["members"]:
            member.pop("path")
    found["teachers"] = teachers
    return found


def served(config: Path, cache: Path, log: Path) -> dict:
    process, url = serve(config, cache, log)
    try:
        return answers(url)
    finally:
        process.terminate()
        process.wait()


def trained(out: Path, method: str, url: str) -> dict:
    run = out / f"run-{method}"
    config = out / f"{method}.toml"
    config.write_text(
        f'dataset = "mnist5k"\narch = "small_cnn"\nmethod = "{method}"\nepochs = 1\nbatch_size = 128\nlr = 0.05\n'
        f'seed = 0\nout_dir = "{run}"\n[attack]\neps = 0.1\nsteps = 3\n[teacher]\nurl = "{url}"\nname = "mnist"\n'
    )
    command = [sys.executable, "-m", "student_trainer", "train", "--config", str(config)]
    subprocess.run(command, env=environment(), cwd=REPO, check=True)
    return {path.name: checkpoint_hash(path) for path in sorted(run.glob("*.pt"))}


def example_teachers(out: Path, example: Path | None) -> Path:
    folder = out / "example"
    if example is None:
        subprocess.run(
            [sys.executable, "scripts/make_example_teachers.py", str(folder)], env=environment(), cwd=REPO, check=True
        )
    else:
        shutil.copytree(example, folder)
    return folder / "teachers.toml"


def fingerprint(out: Path, example: Path | None, old_cache: Path | None) -> dict:
    out.mkdir(parents=True)
    config = example_teachers(out, example)
    result = {"answers": served(config, out / "cache", out / "serve.log")}
    cache = out / "cache"
    result["cache_files"] = {str(p.relative_to(cache)): file_hash(p) for p in sorted(cache.rglob("*")) if p.is_file()}
    if old_cache is not None:
        shutil.copytree(old_cache, out / "old-cache")
        result["answers_from_old_cache"] = served(config, out / "old-cache", out / "serve-old.log")
    process, url = serve(config, out / "cache-train", out / "serve-train.log")
    try:
        result["train"] = {method: trained(out, method, url) for method in ("at", "akd")}
    finally:
        process.terminate()
        process.wait()
    return result


def compare(before: dict, after: dict) -> int:
    """Each part the same or not; the old cache's answers must equal the fresh ones, every `use` a hit."""
    differ = 0
    for part in ("answers", "cache_files", "train"):
        same = before.get(part) == after.get(part)
        differ += not same
        print(f"{part}: {'same' if same else 'DIFFERENT'}")
    if "answers_from_old_cache" in after:
        old, fresh = after["answers_from_old_cache"], after["answers"]
        same = all(
            [a["sha256"] for a in old[key]] == [a["sha256"] for a in fresh[key]]
            for key in fresh
            if isinstance(fresh[key], list)
        )
        hits = all(a["hits"] != "0" for key, calls in old.items() if key.endswith("-use") for a in calls)
        differ += not (same and hits)
        print(f"answers from the older cache: {'same, every use a hit' if same and hits else 'DIFFERENT'}")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--example", type=Path, help="the teachers of an earlier run (its OUT/example)")
    parser.add_argument("--old-cache", type=Path, help="a cache an earlier checkout wrote (its OUT/cache)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(path.read_text()) for path in args.compare)
        return compare(before, after)
    if args.out is None or args.out.exists():
        parser.error("OUT: a folder that does not exist yet")
    result = fingerprint(args.out.resolve(), args.example, args.old_cache)
    (args.out / "fingerprint.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out / 'fingerprint.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
