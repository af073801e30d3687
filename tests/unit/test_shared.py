"""The pieces both sides share: codec, hashing, ensemble formula, checkpoints."""

from __future__ import annotations

import pytest
import torch

from shared import codec
from shared.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shared.hashing import file_version, row_keys
from shared.models import build_model
from shared.protocol import Aggregate, Output, parse_outputs
from teacher_service.ensemble import aggregate_probs, mean_logits, normalised_weights


def test_ensemble_matches_hand_computation():
    # M=2, B=1, K=2
    z = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    w = normalised_weights([1.0, 3.0])
    e = torch.exp(torch.tensor(2.0))
    expected_probs = 0.25 * torch.tensor([e / (e + 1), 1 / (e + 1)]) + 0.75 * torch.tensor([0.5, 0.5])
    torch.testing.assert_close(aggregate_probs(z, w, 1.0)[0], expected_probs)
    # logits aggregation: softmax(0.25 * [2, 0] / 0.5) = softmax([1, 0])
    e1 = torch.exp(torch.tensor(1.0))
    torch.testing.assert_close(
        aggregate_probs(z, w, 0.5, Aggregate.logits)[0], torch.tensor([e1 / (e1 + 1), 1 / (e1 + 1)])
    )
    torch.testing.assert_close(mean_logits(z, w)[0], torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("bad", [[], [1.0, 0.0], [-1.0]])
def test_weights_must_be_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        normalised_weights(bad)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        aggregate_probs(torch.zeros(1, 1, 2), normalised_weights([1.0]), 0.0)


def test_row_keys_cover_dtype_shape_and_bytes():
    x = torch.rand(3, 1, 4, 4)
    keys = row_keys(x)
    assert len(set(keys)) == 3 and all(len(k) == 16 for k in keys)
    # a row's key does not depend on its batch
    assert row_keys(x[1:2]) == keys[1:2]
    assert row_keys(x.half())[0] != keys[0]
    # same bytes, other shape
    assert row_keys(x.reshape(3, 1, 2, 8))[0] != keys[0]


def test_a_row_key_is_the_blake2b_of_its_dtype_shape_and_bytes():
    """The key every cache store is indexed by, written out: stores made by any version of the code stay readable."""
    import hashlib

    crop = torch.rand(4, 3, 40, 40)[:, :, 4:36, 4:36]
    for x in (torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.rand(2, 1, 28, 28).half(), crop):
        rows = x.contiguous().numpy()
        prefix = f"{rows.dtype.str}|{rows.shape[1:]}|".encode()
        assert row_keys(x) == [hashlib.blake2b(prefix + r.tobytes(), digest_size=16).digest() for r in rows]
    assert row_keys(torch.zeros(1, 1, 1, 1, dtype=torch.uint8)) == [bytes.fromhex("341c8ad12a484869e3c4652abacb9bb1")]


def test_codec_round_trip_and_transport_dtype():
    x8 = torch.randint(0, 256, (2, 1, 3, 3), dtype=torch.uint8)
    assert torch.equal(codec.decode(codec.encode_inputs(x8))["inputs"], x8)
    assert codec.to_transport(x8.float() / 255).dtype == torch.uint8
    assert torch.equal(codec.to_transport(x8.float() / 255), x8)
    adversarial = (x8.float() / 255 + 0.001).clamp(0, 1)
    assert codec.to_transport(adversarial).dtype == torch.float32
    # a batch that is k/255 but for one value past the first ones checked alone travels as it is
    large = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(codec.to_transport(large.float() / 255), large)
    almost = large.float() / 255
    almost[-1, -1, -1, -1] = 0.3
    assert codec.to_transport(almost) is almost
    torch.testing.assert_close(codec.to_unit_float(x8), x8.float() / 255)


def test_parse_outputs():
    assert parse_outputs("probs, member_logits,probs") == [Output.probs, Output.member_logits]
    with pytest.raises(ValueError, match="'entropy'"):
        parse_outputs("probs,entropy")


def test_checkpoint_round_trip_and_version_follows_the_file(tmp_path):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, (1, 28, 28)).eval()
    path = tmp_path / "epoch_003.pt"
    save_checkpoint(path, Checkpoint("small_cnn", 10, (1, 28, 28), model.state_dict(), {"epoch": 3}))
    ckpt = load_checkpoint(path)
    assert ckpt.metadata == {"epoch": 3}
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(ckpt.build()(x), model(x))
    v1 = file_version(path)
    assert file_version(path) == v1
    torch.manual_seed(1)
    other = build_model("small_cnn", 10, (1, 28, 28))
    save_checkpoint(path, Checkpoint("small_cnn", 10, (1, 28, 28), other.state_dict(), {"epoch": 3}))
    assert file_version(path) != v1


def test_loading_a_non_checkpoint_says_so(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an akd-checkpoint/1 file"):
        load_checkpoint(path)
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("aggregate", list(Aggregate))
def test_extreme_temperatures_stay_finite(aggregate):
    # mean logits [1.75, 2.25, -1]
    z = torch.tensor([[[3.0, 1.0, -2.0]], [[0.5, 3.5, 0.0]]])
    w = normalised_weights([1.0, 1.0])
    # -> mean of member argmaxes, or argmax of the mean logits
    cold = aggregate_probs(z, w, 1e-300, aggregate)
    expected = torch.tensor([[0.5, 0.5, 0.0]]) if aggregate is Aggregate.probs else torch.tensor([[0.0, 1.0, 0.0]])
    torch.testing.assert_close(cold, expected)
    torch.testing.assert_close(aggregate_probs(z, w, 1e300, aggregate), torch.full((1, 3), 1 / 3))


def test_a_text_file_given_as_a_checkpoint_is_called_what_it_is(tmp_path):
    path = tmp_path / "notes.pt"
    # torch would read it as a pickle and call it "pickled objects"
    path.write_text("not weights\n")
    with pytest.raises(ValueError, match="not a readable checkpoint: it is not the zip archive torch.save writes"):
        load_checkpoint(path)


def test_encode_writes_the_bytes_of_safetensors_torch_writer_and_still_takes_bfloat16():
    """codec.encode writes through safetensors' numpy writer (faster for small tensors): a reader must not tell."""
    from safetensors.torch import save

    answer = {
        "probs": torch.softmax(torch.randn(16, 10), -1),
        "member_logits": torch.randn(3, 16, 10),
        "found": torch.ones(16, dtype=torch.uint8),
        "inputs": torch.rand(4, 1, 28, 28).half(),
    }
    assert codec.encode(answer) == save(answer)
    # numpy has no bfloat16: the torch writer takes it
    bf16 = torch.randn(4, 10).bfloat16()
    assert torch.equal(codec.decode(codec.encode({"x": bf16}))["x"], bf16)


SPECIAL_VALUES = [0.0, -0.0, 1.0, 0.5, 1e-45, 1.0000001, -1e-45, float("inf"), -float("inf"), float("nan"), 2.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float_inputs_are_accepted_exactly_when_finite_and_in_the_unit_interval(dtype):
    """The one-pass check on the values' bits decides as the float comparisons do, for every pair of edge values
    (signed zeros, subnormals, the next float past 1, infinities, NaN) beside an ordinary one; refusals keep their
    codes."""
    import math

    for a in SPECIAL_VALUES:
        for b in SPECIAL_VALUES:
            values = torch.tensor([0.25, a, b], dtype=dtype)
            finite = all(math.isfinite(float(v)) for v in values)
            in_range = finite and all(0.0 <= float(v) <= 1.0 for v in values)
            x = values.repeat(1024)[: 3 * 32 * 32].reshape(1, 3, 32, 32)
            if in_range:
                assert codec.validate_inputs({"inputs": x}, (3, 32, 32)) is x
            else:
                with pytest.raises(codec.CodecError) as refused:
                    codec.validate_inputs({"inputs": x}, (3, 32, 32))
                assert refused.value.code == ("out_of_range" if finite else "not_finite"), (a, b)
            # the one pass alone never accepts what is out of range
            assert not codec.in_unit_interval(x.numpy()) or in_range
