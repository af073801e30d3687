"""`[teachers.X] store = "float16"`: member rows cached at half the bytes, in their own namespace, checked and
restored like float32 ones; hits serve each logit rounded to float16 (and nothing else); a logit float16 cannot hold
is never stored. A real service, a real zarr store."""

from __future__ import annotations

import json

import httpx
import numpy as np
import torch
import zarr
from conftest import (
    HANG_S,
    MNIST_SHAPE,
    live_server,
    mnist_teacher,
    post,
    random_inputs,
    seeded_model,
    write_config,
)
from test_cache_tools import akd_cache

from shared import codec
from shared.checkpoint import Checkpoint, save_checkpoint
from shared.hashing import file_version
from teacher_service.cache import row_bytes


def member_logits(base: str, x: torch.Tensor, teacher: str) -> tuple[torch.Tensor, int]:
    answer = post(base, x, teacher=teacher, outputs="member_logits,probs", cache="use")
    return codec.decode(answer.content)["member_logits"], int(answer.headers["X-Cache-Hits"])


def test_float16_rows_are_half_the_bytes_and_serve_the_rounded_logits(tmp_path, mnist_members):
    member = mnist_members["a"]
    teachers = {
        "exact": mnist_teacher([(member, 1.0)]),
        "half": mnist_teacher([(member, 1.0)], store="float16"),
    }
    config = write_config(tmp_path / "t.toml", teachers, {"cache_dir": "cache"})
    x = random_inputs(20)
    with live_server(config) as (base, _):
        computed, hits = member_logits(base, x, "half")
        assert hits == 0
        rounded, hits = member_logits(base, x, "half")
        assert hits == 20
        torch.testing.assert_close(rounded, computed.half().float(), rtol=0, atol=0)  # the rounding, nothing more
        exact, _ = member_logits(base, x, "exact")  # the same member in a float32 teacher: its own namespace
        exact_again, hits = member_logits(base, x, "exact")
        assert hits == 20
        torch.testing.assert_close(exact_again, exact, rtol=0, atol=0)
    version = file_version(member)
    group = zarr.open_group(str(tmp_path / "cache"), mode="r")
    assert group[f"{version}.float16"]["logits"].dtype == np.float16 and group[version]["logits"].dtype == np.float32
    assert row_bytes(10, np.dtype(np.float16)) == 10 * 2 + 16 + 8 < row_bytes(10)
    with live_server(config) as (base, _):  # restored from the store, every row verified
        restored, hits = member_logits(base, x, "half")
    assert hits == 20
    torch.testing.assert_close(restored, rounded, rtol=0, atol=0)


def test_a_logit_past_float16s_range_is_served_but_never_stored(tmp_path):
    model = seeded_model(0)
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(1e6)  # logits far past 65504
    path = tmp_path / "huge.pt"
    save_checkpoint(path, Checkpoint("small_cnn", 10, MNIST_SHAPE, model.state_dict(), {}))
    config = write_config(
        tmp_path / "t.toml", {"huge": mnist_teacher([(path, 1.0)], store="float16")}, {"cache_dir": "cache"}
    )
    x = random_inputs(4)
    with live_server(config) as (base, _):
        first, hits = member_logits(base, x, "huge")
        assert hits == 0 and first.abs().max() > 65504 and torch.isfinite(first).all()
        again, hits = member_logits(base, x, "huge")
        assert hits == 0  # recomputed: an inf in the store would serve NaN probabilities
        torch.testing.assert_close(again, first)
        text = httpx.get(base + "/metrics", timeout=HANG_S).text
    assert f'akd_cache_rows{{member="{file_version(path)}.float16"}} 0.0' in text


def test_akd_cache_counts_float16_rows_at_their_size(tmp_path, mnist_members):
    config = write_config(
        tmp_path / "t.toml", {"half": mnist_teacher([(mnist_members["a"], 1.0)], store="float16")}, {"cache_dir": "c"}
    )
    with live_server(config) as (base, _):
        post(base, random_inputs(12), teacher="half", cache="use")
    done = akd_cache("stats", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    [namespace] = json.loads(done.stdout)[0]["namespaces"]
    assert namespace["version"] == f"{file_version(mnist_members['a'])}.float16" and namespace["dtype"] == "float16"
    assert namespace["bytes"] == 12 * (10 * 2 + 16 + 8) and namespace["used_by"] == ["teachers.half.members[0]"]
