"""`[teachers.X] store = "float16" | "topk"`: member rows cached compactly, in their own namespace, checked and
restored like float32 ones; hits serve each logit rounded to float16 (and nothing else), or the top-k logits with the
others' mass spread evenly; a logit float16 cannot hold is never stored. A real service, a real zarr store."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
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
from teacher_service.cache.row_formats import FLOAT16, row_format
from teacher_service.cache.rows import row_bytes
from teacher_service.config import TeacherConfig


def member_logits(base: str, x: torch.Tensor, teacher: str) -> tuple[torch.Tensor, int]:
    answer = post(base, x, teacher=teacher, outputs="member_logits,probs", cache="use")
    return codec.decode(answer.content)["member_logits"], int(answer.headers["X-Cache-Hits"])


def test_float16_rows_are_half_the_bytes_and_serve_the_rounded_logits(tmp_path, mnist_members):
    member = mnist_members["a"]
    teachers = {
        "exact": mnist_teacher([(member, 1.0)]),
        "half": mnist_teacher([(member, 1.0)], store="float16"),
    }
    config = write_config(tmp_path / "t.toml", teachers, {"cache": {"dir": "cache"}})
    x = random_inputs(20)
    with live_server(config) as (base, _):
        computed, hits = member_logits(base, x, "half")
        assert hits == 0
        rounded, hits = member_logits(base, x, "half")
        assert hits == 20
        # the rounding, nothing more
        torch.testing.assert_close(rounded, computed.half().float(), rtol=0, atol=0)
        # the same member in a float32 teacher: its own namespace
        exact, _ = member_logits(base, x, "exact")
        exact_again, hits = member_logits(base, x, "exact")
        assert hits == 20
        torch.testing.assert_close(exact_again, exact, rtol=0, atol=0)
    version = file_version(member)
    group = zarr.open_group(str(tmp_path / "cache"), mode="r")
    assert group[f"{version}.float16"]["logits"].dtype == np.float16 and group[version]["logits"].dtype == np.float32
    assert row_bytes(10, FLOAT16) == 10 * 2 + 16 + 8 < row_bytes(10)
    # restored from the store, every row verified
    with live_server(config) as (base, _):
        restored, hits = member_logits(base, x, "half")
    assert hits == 20
    torch.testing.assert_close(restored, rounded, rtol=0, atol=0)


def test_a_logit_past_float16s_range_is_served_but_never_stored(tmp_path):
    model = seeded_model(0)
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        # logits far past 65504
        last.weight.mul_(1e6)
    path = tmp_path / "huge.pt"
    save_checkpoint(path, Checkpoint("small_cnn", 10, MNIST_SHAPE, model.state_dict(), {}))
    config = write_config(
        tmp_path / "t.toml", {"huge": mnist_teacher([(path, 1.0)], store="float16")}, {"cache": {"dir": "cache"}}
    )
    x = random_inputs(4)
    with live_server(config) as (base, _):
        first, hits = member_logits(base, x, "huge")
        assert hits == 0 and first.abs().max() > 65504 and torch.isfinite(first).all()
        again, hits = member_logits(base, x, "huge")
        # recomputed: an inf in the store would serve NaN probabilities
        assert hits == 0
        torch.testing.assert_close(again, first)
        text = httpx.get(base + "/metrics", timeout=HANG_S).text
    assert f'akd_cache_rows{{member="{file_version(path)}.float16"}} 0.0' in text


def test_akd_cache_counts_float16_rows_at_their_size(tmp_path, mnist_members):
    config = write_config(
        tmp_path / "t.toml",
        {"half": mnist_teacher([(mnist_members["a"], 1.0)], store="float16")},
        {"cache": {"dir": "c"}},
    )
    with live_server(config) as (base, _):
        post(base, random_inputs(12), teacher="half", cache="use")
    done = akd_cache("stats", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    [namespace] = json.loads(done.stdout)[0]["namespaces"]
    assert namespace["version"] == f"{file_version(mnist_members['a'])}.float16" and namespace["dtype"] == "float16"
    assert namespace["bytes"] == 12 * (10 * 2 + 16 + 8) and namespace["used_by"] == ["teachers.half.members[0]"]


def test_top_k_rows_keep_the_k_largest_logits_and_the_others_mass():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((200, 100)) * 4).astype(np.float32)
    top5 = row_format("top5")
    stored = top5.encode(logits)
    # whatever the number of classes
    assert stored.shape == (200, 11) and row_bytes(100, top5) == 11 * 2 + 16 + 8
    served = top5.decode(stored, 100)
    largest = np.argsort(-logits, axis=1)[:, :5]
    np.testing.assert_array_equal(
        np.take_along_axis(served, largest, 1), np.take_along_axis(logits, largest, 1).astype(np.float16)
    )
    p, q = torch.softmax(torch.from_numpy(logits).double(), 1), torch.softmax(torch.from_numpy(served).double(), 1)
    rest = 1 - torch.take_along_dim(p, torch.from_numpy(largest), 1).sum(1)
    # the others keep their total mass (to float16's rounding), spread evenly
    torch.testing.assert_close(
        1 - torch.take_along_dim(q, torch.from_numpy(largest), 1).sum(1), rest, rtol=1e-2, atol=1e-4
    )
    # no probability off by more than the others' mass
    assert ((p - q).abs().max(1).values <= rest + 1e-3).all()


def test_top_k_needs_its_k_and_more_classes_than_k():
    base = {"num_classes": 10, "input_shape": [1, 28, 28], "members": [{"path": "a.pt"}]}
    assert TeacherConfig(**base, store="topk", topk=5).row_format == "top5"
    for wrong, says in (
        ({"store": "topk"}, "topk = k goes with store = 'topk'"),
        ({"topk": 5}, "topk = k goes with store = 'topk'"),
        ({"store": "topk", "topk": 10}, "more than 10 and at most"),
    ):
        with pytest.raises(ValueError, match=says):
            TeacherConfig(**base, **wrong)


def test_a_top_k_teacher_serves_its_decoded_rows_and_restores_them(tmp_path, mnist_members):
    member = mnist_members["a"]
    config = write_config(
        tmp_path / "t.toml", {"top": mnist_teacher([(member, 1.0)], store="topk", topk=3)}, {"cache": {"dir": "cache"}}
    )
    x = random_inputs(20)
    top3 = row_format("top3")
    with live_server(config) as (base, _):
        computed, hits = member_logits(base, x, "top")
        assert hits == 0
        again, hits = member_logits(base, x, "top")
        assert hits == 20
        expected = torch.from_numpy(top3.decode(top3.encode(computed[0].numpy()), 10))
        # exactly what the format gives back
        torch.testing.assert_close(again[0], expected, rtol=0, atol=0)
    group = zarr.open_group(str(tmp_path / "cache"), mode="r")
    stored = group[f"{file_version(member)}.top3"]
    assert stored["logits"].shape[1] == 7 and stored.attrs["dtype"] == "top3" and stored.attrs["committed_rows"] == 20
    # restored from the store, every row verified
    with live_server(config) as (base, _):
        restored, hits = member_logits(base, x, "top")
    assert hits == 20
    torch.testing.assert_close(restored, again, rtol=0, atol=0)


@pytest.mark.parametrize("chunks_read", ["whole", "row by row"])
def test_a_damaged_top_k_row_naming_classes_that_do_not_exist_is_recomputed_not_a_crash(chunks_read, tmp_path):
    """A top-k chunk overwritten with 0xff names class 65,535 in every row: the rows fail their checks and are
    recomputed; decoding them first (which cannot place such a class) would fail the whole request."""
    from teacher_service.cache.settings import CacheSettings
    from teacher_service.cache.store import LogitCache

    chunk_rows, classes = 64, 10
    rng = np.random.default_rng(0)
    keys = [k.tobytes() for k in rng.integers(0, 256, (3 * chunk_rows, 16), dtype=np.uint8)]
    logits = rng.standard_normal((len(keys), classes)).astype(np.float32)
    cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 30, chunk_rows=chunk_rows))
    cache.namespace("v", classes, "top3").insert(keys, logits)
    cache.close()
    cache = LogitCache(str(tmp_path / "store"), CacheSettings(max_bytes=1 << 30, chunk_rows=chunk_rows, memory_bytes=0))
    # loaded and verified: the damage comes after
    ns = cache.namespace("v", classes, "top3")
    chunk = tmp_path / "store" / "v" / "logits" / "c" / "1" / "0"
    chunk.write_bytes(b"\xff" * len(chunk.read_bytes()))
    damaged = range(chunk_rows, 2 * chunk_rows)
    asked = keys if chunks_read == "whole" else [keys[0]] + [keys[i] for i in damaged]
    if chunks_read == "whole":
        found, got = ns.get(asked)
    else:
        # chunk 0 takes the one line; chunk 1's rows are then read alone
        found = np.concatenate([ns.get([k])[0] for k in asked])
    expected = [i not in damaged for i in range(len(keys))] if chunks_read == "whole" else [True] + [False] * 64
    assert found.tolist() == expected
    assert cache.damage_counts()["v"][0] == chunk_rows
    cache.close()
