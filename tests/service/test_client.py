"""The public client (shared.client) against a real service: it imports and answers with nothing but httpx, numpy and
safetensors; its async form answers as the sync one does, bit for bit, failing over a dead replica; it sends its token;
and the example in docs/client.md trains a student on its soft targets as written. Real uvicorn on loopback, real
httpx; a few seconds in all."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HANG_S, REPO, free_port, live_server, mnist_teacher, save_member, write_config

from shared.client import AsyncTeacherClient, TeacherClient, TeacherRequestError
from shared.codec import to_unit_float
from shared.models import build_model
from student_trainer.data import load_dataset
from student_trainer.teacher_client import RemoteTeacher

EXAMPLE_MARK = "<!-- client-example -->"
EXAMPLE_URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A teacher named as the docs' example names it, two members, a cache (so keys first is offered)."""
    folder = tmp_path_factory.mktemp("client")
    members = [(save_member(folder / f"{seed}.pt", seed=seed), weight) for seed, weight in ((1, 1.0), (2, 3.0))]
    config = write_config(folder / "t.toml", {"mnist": mnist_teacher(members)}, {"cache": {"dir": "cache"}})
    with live_server(config) as (base, _):
        yield base


def batch(seed: int, clean: bool) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (6, 1, 28, 28), generator=g) / 255.0 if clean else torch.rand(6, 1, 28, 28, generator=g)
    return x.numpy()


BLOCKED_IMPORTS = """
import sys

BLOCKED = {"torch", "pydantic", "zarr", "fastapi", "starlette", "uvicorn", "matplotlib", "mlxtend", "scipy"}


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked")
        return None


sys.meta_path.insert(0, Blocked())
import numpy as np
from shared.client import TeacherClient

url, inputs, out = sys.argv[1:]
with TeacherClient(url, "mnist", temperature=2.0) as teacher:
    teacher.info()
    probs = teacher.soft_targets(np.load(inputs))
np.save(out, probs)
loaded = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
print(type(probs).__name__, probs.dtype, teacher.keys_first, loaded)
"""


def test_the_client_imports_and_answers_with_torch_and_the_services_dependencies_blocked(served, tmp_path):
    x = batch(0, clean=False)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS, served, str(tmp_path / "x.npy"), str(tmp_path / "probs.npy")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ndarray", "float32", "True", "[]"], done.stdout
    # the trainer's client, on the same rows: the same answer, bit for bit
    trainer = RemoteTeacher(served, "mnist", 2.0)
    assert np.array_equal(np.load(tmp_path / "probs.npy"), trainer(torch.from_numpy(x)).numpy())
    trainer.close()


def test_the_async_client_answers_as_the_sync_one_and_fails_over_a_dead_replica(served):
    clean, noisy = batch(1, clean=True), batch(2, clean=False)
    with TeacherClient(served, "mnist", temperature=2.0) as sync:
        sync.info()
        expected = [sync.soft_targets(clean), sync.soft_targets(noisy, adversarial=True)]
        # torch in, torch out: the same numbers
        assert torch.equal(sync.soft_targets(torch.from_numpy(noisy)), torch.from_numpy(expected[1]))

    async def ask():
        urls = [f"http://127.0.0.1:{free_port()}", served]
        async with AsyncTeacherClient(urls, "mnist", temperature=2.0, give_up_after_s=HANG_S) as teacher:
            await teacher.info()
            answers = await asyncio.gather(teacher.soft_targets(clean), teacher.soft_targets(noisy, adversarial=True))
            return answers, (teacher.keys_first, teacher.rows_requested, teacher.cache_hits, teacher.rows_uploaded)

    answers, counts = asyncio.run(ask())
    assert all(a.dtype == np.float32 and np.array_equal(a, e) for a, e in zip(answers, expected, strict=True))
    # the clean rows, cached by the sync client's call, asked for by key; the adversarial ones uploaded
    assert counts == (True, 12, 6, 6)


def test_the_token_is_sent_and_a_wrong_one_refused(tmp_path):
    member = save_member(tmp_path / "a.pt", seed=1)
    config = write_config(tmp_path / "t.toml", {"mnist": mnist_teacher([(member, 1.0)])}, {"token": "s3cret"})
    x = batch(3, clean=False)
    with live_server(config) as (base, _):
        with TeacherClient(base, token="s3cret") as teacher:
            assert teacher.soft_targets(x).shape == (6, 10) and teacher.name == "mnist"
        for token in ("wrong", None):
            with TeacherClient(base, "mnist", token=token) as teacher, pytest.raises(TeacherRequestError) as refused:
                teacher.soft_targets(x)
            assert refused.value.status == 401


def docs_example(path) -> str:
    """The python block after EXAMPLE_MARK."""
    return re.search(re.escape(EXAMPLE_MARK) + r"\s*```python\n(.*?)```", path.read_text(), re.S).group(1)


def test_the_docs_example_trains_a_student_on_the_services_soft_targets(served):
    """The block in docs/client.md, run as written (but for the URL) with a loader of real images, a student and its
    optimiser; the README's copy of it, where the README has one, is the same text."""
    example = docs_example(REPO / "docs" / "client.md")
    # under ten lines of code (a blank line between the imports and the rest, as ruff formats it)
    assert len([line for line in example.splitlines() if line.strip()]) < 10 and EXAMPLE_URL in example
    if EXAMPLE_MARK in (REPO / "README.md").read_text():
        assert docs_example(REPO / "README.md") == example
    data = load_dataset("mnist5k", limit_train=32, val_size=0).train
    loader = [(to_unit_float(data.x[i : i + 16]), data.y[i : i + 16]) for i in (0, 16)]
    torch.manual_seed(0)
    student = build_model("small_cnn", 10, (1, 28, 28))
    before = [p.detach().clone() for p in student.parameters()]
    names = {"loader": loader, "student": student, "optimizer": torch.optim.SGD(student.parameters(), lr=0.1)}
    exec(compile(example.replace(EXAMPLE_URL, served), "docs/client.md", "exec"), names)
    teacher = names["teacher"]
    assert teacher.rows_requested == 32 and torch.isfinite(names["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    teacher.close()
