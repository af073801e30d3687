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
        {"cache_dir": str(d / "cache")},
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
    expected = reference_probs(reference_member_logits(paths, x), WEIGHTS, 2.0, "probs")  # temperature = 2.0 in config
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
        tmp_path / "t.toml", {"m": mnist_teacher([(mnist_members["a"], 1.0)])}, {"max_batch_rows": 16}
    )
    with live_server(config) as (base, _):
        x = random_inputs(50, seed=3)
        _, out = post(base, x, outputs="member_logits", cache="bypass")
        metrics = httpx.get(f"{base}/metrics", timeout=HANG_S).text
    torch.testing.assert_close(
        out["member_logits"], reference_member_logits([mnist_members["a"]], x), rtol=1e-5, atol=1e-5
    )
    assert 'akd_batch_rows_max{teacher="m"} 16.0' in metrics
    assert 'akd_batch_rows_count{teacher="m"} 4.0' in metrics  # 16 + 16 + 16 + 2
