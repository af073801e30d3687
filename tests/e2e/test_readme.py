"""The docs stay true: the configuration reference's block validates with the real defaults, the README's serving
example validates, and `make serve`'s teachers serve."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import httpx
import torch
from conftest import HANG_S, REPO, live_server, random_inputs

from shared import codec
from teacher_service.config import FLAT_NAMES, ServerConfig, ServiceConfig


def first_toml_block(path: str) -> dict:
    return tomllib.loads(re.search(r"```toml\n(.*?)```", (REPO / path).read_text(), re.S).group(1))


def test_the_configuration_reference_shows_the_defaults():
    raw = first_toml_block("docs/configuration.md")
    flat = {key for key, value in raw["server"].items() if not isinstance(value, dict)} & set(FLAT_NAMES)
    assert not flat, f"docs/configuration.md shows deprecated flat keys: {sorted(flat)}"
    config = ServiceConfig.model_validate(raw)
    defaults = _dotted(ServerConfig().model_dump())
    for field, value in _dotted(config.server.model_dump()).items():
        if field not in ("token", "cache.dir"):
            assert value == defaults[field], f"the reference shows {field} = {value}, the default is {defaults[field]}"


def test_the_readmes_serving_example_is_a_valid_config():
    ServiceConfig.model_validate(first_toml_block("README.md"))


def _dotted(table: dict, prefix: str = "") -> dict:
    """{"cache": {"dir": x}} -> {"cache.dir": x}."""
    out = {}
    for key, value in table.items():
        out.update(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_example_teachers_of_the_main_job_serve(tmp_path):
    out = tmp_path / "example"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_example_teachers.py"), str(out)], check=True, cwd=REPO)
    with live_server(out / "teachers.toml", overrides={"port": 0}) as (base, _):
        r = httpx.post(
            f"{base}/soft-targets",
            content=codec.encode_inputs(random_inputs(3, dtype=torch.uint8)),
            params={"outputs": "member_logits"},
            timeout=HANG_S,
        )
    assert r.status_code == 200 and codec.decode(r.content)["member_logits"].shape == (2, 3, 10)
    # cache.dir relative to the config's folder
    assert (out / "cache" / "zarr.json").exists()
