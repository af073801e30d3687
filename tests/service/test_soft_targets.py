"""POST /soft-targets returns exactly the in-process computation, written out by hand here."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    live_server,
    mnist_teacher,
    random_inputs,
    reference_member_logits,
    reference_probs,
    write_config,
)

from shared import codec

WEIGHTS = (1.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import export_member, save_member

    d = tmp_path_factory.mktemp("equiv")
    paths = [save_member(d / "a.pt", 1), save_member(d / "b.pt", 2), export_member(d / "c.pt2", 3)]
    members = list(zip(paths, WEIGHTS))
    config = write_config(
        d / "teachers.toml",
        {
            "single": mnist_teacher(members[:1]),
            "ens_probs": mnist_teacher(members, aggregate="probs", temperature=2.0),
            "ens_logits": mnist_teacher(members, aggregate="logits"),
        },
        {"cache": {"dir": str(d / "cache")}},
    )
    with live_server(config) as (base, _):
        yield base, paths


def post(base, x, **params):
    r = httpx.post(f"{base}/soft-targets", content=codec.encode_inputs(x), params=params, timeout=HANG_S)
    assert r.status_code == 200, r.text
    return r, codec.decode(r.content)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize(
    "teacher,members,aggregate", [("single", 1, "probs"), ("ens_probs", 3, "probs"), ("ens_logits", 3, "logits")]
)
def test_outputs_equal_in_process_computation(server, teacher, members, aggregate, tau, dtype):
    base, paths = server
    x = random_inputs(6, dtype=dtype, seed=int(tau * 10))
    _, out = post(base, x, teacher=teacher, temperature=tau, outputs="probs,logits,member_logits")
    ref_logits = reference_member_logits(paths[:members], x)
    weights = WEIGHTS[:members]
    assert out["member_logits"].shape == (members, 6, 10)
    assert out["probs"].dtype == torch.float32 and out["probs"].shape == (6, 10)
    torch.testing.assert_close(out["member_logits"], ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["probs"], reference_probs(ref_logits, weights, tau, aggregate), rtol=1e-5, atol=1e-6)
    beta = torch.tensor(weights) / sum(weights)
    torch.testing.assert_close(out["logits"], torch.einsum("m,mbk->bk", beta, ref_logits), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["probs"].sum(-1), torch.ones(6))


def test_default_temperature_and_outputs_come_from_config(server):
    base, paths = server
    x = random_inputs(3, seed=99)
    r, out = post(base, x, teacher="ens_probs")
    assert set(out) == {"probs"}
    # temperature = 2.0 in config
    expected = reference_probs(reference_member_logits(paths, x), WEIGHTS, 2.0, "probs")
    torch.testing.assert_close(out["probs"], expected, rtol=1e-5, atol=1e-6)
    assert r.headers["X-Teacher-Versions"].count(",") == 2


def test_uint8_and_float_views_of_one_image_agree(server):
    base, _ = server
    x8 = random_inputs(4, dtype=torch.uint8, seed=5)
    _, a = post(base, x8, teacher="single")
    _, b = post(base, x8.float() / 255, teacher="single")
    torch.testing.assert_close(a["probs"], b["probs"], rtol=1e-6, atol=1e-7)


def test_large_request_is_split_across_batches(tmp_path, mnist_members):
    config = write_config(
        tmp_path / "t.toml", {"m": mnist_teacher([(mnist_members["a"], 1.0)])}, {"batching": {"max_rows": 16}}
    )
    with live_server(config) as (base, _):
        x = random_inputs(50, seed=3)
        _, out = post(base, x, outputs="member_logits", cache="bypass")
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    torch.testing.assert_close(
        out["member_logits"], reference_member_logits([mnist_members["a"]], x), rtol=1e-5, atol=1e-5
    )
    assert 'akd_batch_rows_max{teacher="m"} 16.0' in metrics
    # 16 + 16 + 16 + 2
    assert 'akd_batch_rows_count{teacher="m"} 4.0' in metrics


def test_rows_no_cache_reads_are_never_hashed_and_a_batch_mixing_them_stores_only_the_cached_ones(
    tmp_path, mnist_members, monkeypatch
):
    """A row's key costs about 1.2 ms per MB to compute; cache=bypass rows, and every row of a service without a
    cache, go without one. A batch that mixes keyless rows with `use` rows answers both and stores only the latter."""
    from shared.hashing import row_keys
    from shared.protocol import CacheMode
    from teacher_service import body
    from teacher_service.inference import Rows

    hashed = []
    # counts, then hashes
    monkeypatch.setattr(body, "row_keys", lambda x: hashed.append(len(x)) or row_keys(x))
    members = [(mnist_members["a"], 1.0), (mnist_members["b"], 1.0)]
    cached = write_config(
        tmp_path / "c.toml", {"mnist": mnist_teacher(members)}, {"cache": {"dir": str(tmp_path / "c")}}
    )
    bare = write_config(tmp_path / "b.toml", {"mnist": mnist_teacher(members)})
    x, y = random_inputs(6, seed=1), random_inputs(5, seed=2)
    expected = reference_probs(reference_member_logits([p for p, _ in members], x), [1.0, 1.0], 1.0, "probs")
    with live_server(bare) as (base, _):
        probs = post(base, x, cache="use")[1]["probs"]
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)
    assert hashed == []
    with live_server(cached) as (base, app):
        assert post(base, x, cache="bypass")[1]["probs"].shape == (6, 10)
        assert hashed == []
        runner = app.state.service.devices.workers[0].runners["mnist"]
        mixed = runner.run([Rows(x, None, CacheMode.bypass), Rows(y, row_keys(y), CacheMode.use)])
        assert [r.member_logits.shape for r in mixed] == [(2, 6, 10), (2, 5, 10)]
        torch.testing.assert_close(mixed[0].member_logits, reference_member_logits([p for p, _ in members], x))
        hits = [post(base, rows, cache="use")[0].headers["x-cache-hits"] for rows in (y, x)]
    # y was stored by the mixed batch, x never
    assert hits == ["5", "0"]
    assert hashed == [5, 6]
