"""The public client's parts without a server (shared/client): its request bytes are the codec's, its reading of an
answer is torch's, its backoff is jittered within its bounds (seeded: the same seed, the same waits), and a Retry-After
is a floor it is added to. The retry schedule is read off the sans-IO core (`ClientCore`), fed real httpx answers and
failures: no sockets, no sleeping. Cheap: milliseconds."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest
import torch

from shared import codec, protocol
from shared.client import TeacherAnswerError, TeacherUnavailable
from shared.client.arrays import encode_inputs, encode_keys, like_input, read_tensors, wire_rows
from shared.client.backoff import Backoff
from shared.client.core import ClientCore, Failure, Send, Wait
from shared.client.listing import parse_listing
from student_trainer.teacher_client import _protocol_info


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (5, 1, 28, 28), generator=g) / 255.0
    partly = clean.clone()
    # its first 256 values are k/255, a later one is not
    partly[4, 0, 27, 27] = 0.5001
    return {
        "clean float32": clean,
        "noisy float32": torch.rand(5, 1, 28, 28, generator=g),
        "clean float16": clean.half(),
        "noisy float16": torch.rand(5, 1, 28, 28, generator=g).half(),
        "uint8": torch.randint(0, 256, (5, 1, 28, 28), generator=g, dtype=torch.uint8),
        "partly k/255": partly,
        "a strided view": clean.transpose(2, 3),
        "float64": torch.rand(3, 1, 28, 28, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("kind", list(inputs()))
def test_a_request_is_the_bytes_the_codec_writes_from_torch_and_from_numpy(kind):
    x = inputs()[kind]
    wire = codec.to_transport(x)
    for given in (x, x.numpy()):
        rows, _ = wire_rows(given)
        assert encode_inputs(rows) == codec.encode_inputs(wire)
        assert encode_keys(rows) == codec.encode_keys(wire)


def test_rows_of_their_own_are_a_copy_where_they_would_be_the_callers_memory():
    noisy = inputs()["noisy float32"]
    for given in (noisy, noisy.numpy()):
        rows, _ = wire_rows(given, own=True)
        assert not np.shares_memory(rows, noisy.numpy())
        assert np.shares_memory(wire_rows(given)[0], noisy.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_an_answer_reads_as_torch_reads_it_and_comes_back_as_asked(dtype):
    probs = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(1)), dim=1).to(dtype)
    [read] = read_tensors(codec.encode({"probs": probs})).values()
    assert (read.dtype, read.shape) == (str(dtype).removeprefix("torch."), (4, 10))
    assert torch.equal(torch.from_numpy(np.asarray(read.values, dtype=np.float32)), probs.float())
    back = like_input(read.values.astype(np.float32), torch.device("cpu"))
    assert isinstance(back, torch.Tensor) and like_input(read.values, None) is read.values


def test_the_listing_reads_as_the_protocols_models_read_it():
    member = protocol.MemberInfo(source="checkpoint", path="a.pt", weight=0.25, version="3f2a", metadata={"k": [1]})
    teacher = protocol.TeacherInfo(
        name="ens", num_classes=10, input_shape=(1, 28, 28), aggregate="probs", temperature=2.0, members=[member] * 2
    )
    body = protocol.TeachersResponse(teachers=[teacher], features=[protocol.KEYS_FIRST]).model_dump_json()
    [read], features = parse_listing(body.encode())
    assert _protocol_info(read) == teacher and features == [protocol.KEYS_FIRST]
    with pytest.raises(ValueError, match=r"teachers\[0\].num_classes: '10' \(expected a whole number\)"):
        parse_listing(body.replace('"num_classes":10', '"num_classes":"10"').encode())


def test_backoff_waits_are_jittered_within_their_bounds_and_a_seed_repeats_them():
    def first(backoff: Backoff, n: int = 12) -> list[float]:
        waits = backoff.waits()
        return [next(waits) for _ in range(n)]

    seeded = [first(Backoff(0.1, 5.0, random.Random(seed))) for seed in (1, 2, 1)]
    assert seeded[0] == seeded[2] and seeded[0] != seeded[1]
    for waits in seeded:
        for n, wait in enumerate(waits, start=1):
            assert 0.1 <= wait <= min(5.0, 0.1 * 3**n)
        # decorrelated: each at most three times the one before
        assert all(later <= 3 * earlier for earlier, later in zip(waits, waits[1:]))
    # by default each backoff draws its own
    assert first(Backoff()) != first(Backoff())
    # a new call starts over
    backoff = Backoff(0.1, 5.0, random.Random(3))
    assert all(next(backoff.waits()) <= 0.3 for _ in range(20))


def schedule(core: ClientCore, rounds: int, answer) -> tuple[list[float], list[int]]:
    """The waits between `rounds` rounds of info()'s first request, each request answered by `answer()`; and the
    replicas asked, in order."""
    steps, reply, waits, asked = core.info_steps(), None, [], []
    while len(waits) < rounds:
        step = steps.send(reply)
        if isinstance(step, Wait):
            waits.append(step.seconds)
            reply = None
        else:
            assert isinstance(step, Send) and step.path == protocol.TEACHERS_PATH
            asked.append(step.replica)
            reply = answer()
    steps.close()
    return waits, asked


REFUSED = lambda: Failure("ConnectError: [Errno 111] Connection refused")  # noqa: E731


def test_each_client_draws_its_own_waits_and_every_replica_is_asked_each_round():
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    a, asked = schedule(ClientCore(urls, rng=random.Random(1)), 6, REFUSED)
    b, _ = schedule(ClientCore(urls, rng=random.Random(2)), 6, REFUSED)
    assert a != b and a == schedule(ClientCore(urls, rng=random.Random(1)), 6, REFUSED)[0]
    assert all(0.1 <= wait <= 5.0 for wait in a + b)
    # in turn: each round starts with the next replica
    assert asked[:6] == [0, 1, 1, 0, 0, 1]


def test_a_retry_after_is_a_floor_under_the_jittered_wait():
    said = lambda seconds: lambda: httpx.Response(503, headers={"Retry-After": seconds})  # noqa: E731
    waits, _ = schedule(ClientCore("http://127.0.0.1:1", rng=random.Random(4)), 8, said("2"))
    jitter, _ = schedule(ClientCore("http://127.0.0.1:1", rng=random.Random(4)), 8, REFUSED)
    # every client told "in 2 s" comes back after 2 s, each at its own moment
    assert waits == [2.0 + wait for wait in jitter] and min(waits) >= 2.1 and max(waits) <= 7.0
    assert schedule(ClientCore("http://127.0.0.1:1", rng=random.Random(5)), 8, said("2"))[0] != waits
    # "retry at once" is the backoff alone
    assert schedule(ClientCore("http://127.0.0.1:1", rng=random.Random(4)), 8, said("0"))[0] == jitter


def test_giving_up_and_a_wrong_answer_end_the_call_with_the_clients_errors():
    core = ClientCore("http://127.0.0.1:1", give_up_after_s=0.0)
    with pytest.raises(TeacherUnavailable, match=r"limit teacher.give_up_after_s = 0s\); last error: ConnectError"):
        schedule(core, 1, REFUSED)
    undecodable = lambda: Failure("a body that does not decode", undecodable=True)  # noqa: E731
    with pytest.raises(TeacherAnswerError, match="at http://127.0.0.1:1 answered a body that does not decode"):
        schedule(ClientCore("http://127.0.0.1:1/"), 1, undecodable)
