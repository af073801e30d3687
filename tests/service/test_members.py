"""Member sources and device options: RobustBench ids, autocast, channels_last."""

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
    robustbench_config,
    seeded_model,
    write_config,
)

from shared import codec
from teacher_service.config import ConfigError, load_config
from teacher_service.registry import load_teachers


def test_robustbench_member_loads_from_local_weights_only(tmp_path, fake_robustbench):
    weights = tmp_path / "models" / "mnist" / "Linf" / "Fake2024.pt"
    weights.parent.mkdir(parents=True)
    torch.save(seeded_model(5).state_dict(), weights)
    config = load_config(robustbench_config(tmp_path), environ={})
    member = load_teachers(config, torch.device("cpu"))["rb"].members[0]
    assert member.source == "robustbench" and member.path == weights
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(member.model(x), seeded_model(5)(x))


def test_robustbench_member_without_weights_on_disk_is_a_clear_error(tmp_path, fake_robustbench):
    config = load_config(robustbench_config(tmp_path), environ={})
    with pytest.raises(ConfigError, match="nothing is downloaded, put the file there"):
        load_teachers(config, torch.device("cpu"))
    import robustbench.utils

    # never asked RobustBench, which would download
    assert robustbench.utils.CALLS == []


@pytest.mark.parametrize("server", [{"channels_last": True}, {"autocast": "bf16"}])
def test_device_options_keep_outputs_close(tmp_path, mnist_members, server):
    config = write_config(tmp_path / "t.toml", {"m": mnist_teacher([(mnist_members["a"], 1.0)])}, server)
    x = random_inputs(5)
    with live_server(config) as (base, _):
        r = httpx.post(
            f"{base}/soft-targets", content=codec.encode_inputs(x), params={"outputs": "member_logits"}, timeout=HANG_S
        )
    assert r.status_code == 200
    # bf16 keeps ~3 significant digits
    tolerance = 5e-2 if "autocast" in server else 1e-5
    torch.testing.assert_close(
        codec.decode(r.content)["member_logits"],
        reference_member_logits([mnist_members["a"]], x),
        rtol=tolerance,
        atol=tolerance,
    )
