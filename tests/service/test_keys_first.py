"""Keys first: the trainer asks by row keys (16 bytes a row) and uploads only the rows the service has not cached,
and gets exactly the soft targets a full upload would; a service without a cache does not offer it, and bad keys
bodies get clear errors. A real service under uvicorn, a real httpx client, a real zarr cache."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import HANG_S, live_server, mnist_teacher, write_config

from shared import codec, protocol
from student_trainer.teacher_client import RemoteTeacher


def clean_rows(n: int, seed: int) -> torch.Tensor:
    """Images as a data loader gives them: k/255 floats, which travel as uint8."""
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)) / 255.0


@pytest.fixture
def teacher_config(tmp_path, mnist_members):
    members = [(mnist_members["a"], 1.0), (mnist_members["c"], 3.0)]
    return write_config(
        tmp_path / "t.toml", {"ens": mnist_teacher(members, temperature=2.0)}, {"cache": {"dir": "cache"}}
    )


def test_cached_rows_are_asked_for_by_key_and_only_the_others_uploaded(teacher_config):
    with live_server(teacher_config) as (base, _):
        client = RemoteTeacher(base, "ens", 2.0, give_up_after_s=HANG_S)
        plain = RemoteTeacher(base, "ens", 2.0, give_up_after_s=HANG_S, keys_first=False)
        client.info()
        plain.info()
        assert client.keys_first and not plain.keys_first
        x = clean_rows(32, seed=0)
        first = client(x)
        # nothing cached yet: every row goes up
        assert client.rows_uploaded == 32 and client.cache_hits == 0
        again = client(x)
        # all cached: only the keys went
        assert client.rows_uploaded == 32 and client.cache_hits == 32
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        mixed = torch.cat([x[:16], clean_rows(16, seed=1)])[
            torch.randperm(32, generator=torch.Generator().manual_seed(2))
        ]
        answer = client(mixed)
        assert client.rows_uploaded == 32 + 16 and client.cache_hits == 32 + 16
        # what a full upload gets, row for row
        torch.testing.assert_close(answer, plain(mixed), rtol=0, atol=1e-7)
        # adversarial rows bypass the cache: uploaded whole, never asked by key
        client(x, adversarial=True)
        assert client.rows_uploaded == 32 + 16 + 32


def test_a_service_without_a_cache_does_not_offer_it(tmp_path, mnist_members):
    config = write_config(tmp_path / "t.toml", {"ens": mnist_teacher([(mnist_members["a"], 1.0)])})
    with live_server(config) as (base, _):
        assert protocol.KEYS_FIRST not in httpx.get(base + protocol.TEACHERS_PATH, timeout=HANG_S).json()["features"]
        client = RemoteTeacher(base, "ens", 1.0, give_up_after_s=HANG_S)
        client.info()
        assert not client.keys_first
        client(clean_rows(4, seed=0))
        assert client.rows_uploaded == 4
        refused = httpx.post(
            base + protocol.SOFT_TARGET_KEYS_PATH,
            content=codec.encode_keys(codec.to_transport(clean_rows(2, 0))),
            timeout=HANG_S,
        )
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "no_cache"


def keys_body(**tensors) -> bytes:
    return codec.encode(tensors)


@pytest.mark.parametrize(
    "body, status, code",
    [
        # float, not uint8
        (keys_body(keys=torch.zeros(3, 16)), 422, "bad_keys"),
        # 8 bytes, not 16
        (keys_body(keys=torch.zeros(3, 8, dtype=torch.uint8)), 422, "bad_keys"),
        # no rows
        (keys_body(keys=torch.zeros(0, 16, dtype=torch.uint8)), 422, "bad_keys"),
        (keys_body(inputs=torch.zeros(3, 16, dtype=torch.uint8)), 422, "missing_keys"),
        (keys_body(keys=torch.zeros(3, 16, dtype=torch.uint8), extra=torch.zeros(1)), 422, "missing_keys"),
        (keys_body(keys=torch.zeros(20000, 16, dtype=torch.uint8)), 413, "too_many_rows"),
        (b"not a safetensors file", 400, "bad_body"),
    ],
)
def test_bad_keys_bodies_get_clear_errors_and_the_service_goes_on(teacher_config, body, status, code):
    with live_server(teacher_config) as (base, _):
        answer = httpx.post(
            base + protocol.SOFT_TARGET_KEYS_PATH, params={"teacher": "ens"}, content=body, timeout=HANG_S
        )
        assert answer.status_code == status and answer.json()["error"]["code"] == code, answer.text
        assert answer.json()["error"]["expected"]
        client = RemoteTeacher(base, "ens", 1.0, give_up_after_s=HANG_S)
        client.info()
        assert client(clean_rows(2, seed=0)).shape == (2, 10)


def test_the_answer_says_which_rows_were_found(teacher_config):
    with live_server(teacher_config) as (base, _):
        x = clean_rows(6, seed=3)
        transport = codec.to_transport(x)
        httpx.post(
            base + protocol.SOFT_TARGETS_PATH,
            params={"teacher": "ens", "cache": "use"},
            content=codec.encode_inputs(transport[:4]),
            timeout=HANG_S,
        ).raise_for_status()
        answer = httpx.post(
            base + protocol.SOFT_TARGET_KEYS_PATH,
            params={"teacher": "ens", "outputs": "probs,member_logits"},
            content=codec.encode_keys(transport),
            timeout=HANG_S,
        )
        assert answer.status_code == 200 and answer.headers[protocol.HEADER_CACHE_HITS] == "4"
        tensors = codec.decode(answer.content)
        assert tensors["found"].tolist() == [1, 1, 1, 1, 0, 0]
        assert tensors["probs"].shape == (4, 10) and tensors["member_logits"].shape == (2, 4, 10)
