"""The second peer: the same teacher served by NVIDIA Triton Inference Server, through PyTriton, with Triton's
dynamic batcher.

Only the serving system differs from `akd serve`: the same checkpoint, and `LocalTeacher`, which runs the service's
own forward pass and ensemble formula (the teacher's own temperature), and the same batching settings, read from the
same teachers.toml: Triton's `max_batch_size` is `[server.batching] max_rows` (Triton counts rows, as we do) and its
`max_queue_delay_microseconds` is `max_wait_ms`. The model is named after the teacher; it takes one FP32 input,
`inputs` (rows, C, H, W) in [0, 1], checked as the service checks it, and answers one FP32 output, `probs` (rows, K).

It runs with the Triton virtual environment's Python (`make triton`: Debian's python3.11, nvidia-pytriton), never
the project's .venv, with the checkout on PYTHONPATH; PyTriton starts `tritonserver` as its child, and the forward
pass runs in this process, which Triton's Python backend reaches through PyTriton's proxy. Only HTTP is served
(no gRPC, no metrics port): what the benchmarks drive.

    .venv-triton/bin/python -m bench.triton_app serve --config teachers.toml --teacher small_cnn --port 8002
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from shared import codec
from shared.allocator import keep_freed_memory

INPUT, OUTPUT = codec.INPUTS_KEY, "probs"


class TeacherModel:
    """Triton's infer callable: a batch of requests -> their answers. Each request's input is checked (name, shape,
    finiteness, range) as the service checks it, then one forward pass runs over all their rows, split back per
    request. A request that fails its check fails the batch it is in (PyTriton answers a call, not each request).

    The teacher is loaded, and every forward pass run, on one thread of its own (the service's device thread), which
    PyTriton's threads hand each call to: the forward pass's OpenMP threads are then that one thread's team, as in the
    service (teacher_service/openmp.py) and in LitServe's worker. With the teacher loaded on the main thread and run
    on PyTriton's (which calls from a thread of its own, and runs a model's warm-up on the main thread), the process
    would have two teams, libgomp would stop spinning between parallel regions, and the same forward pass would run
    at another speed than the service's (several times faster or slower, depending on how busy the machine is): the
    framework would not be what is compared.
    """

    def __init__(self, config_path: Path, name: str, device: torch.device, input_shape: tuple[int, int, int]):
        from student_trainer.teacher_client import LocalTeacher

        self.input_shape = input_shape
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        load = functools.partial(LocalTeacher, config_path, name, temperature=None, device=device)
        self._teacher = self._thread.submit(load).result()

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        return self._thread.submit(self._answer, requests).result()

    def _answer(self, requests: list) -> list[dict[str, np.ndarray]]:
        parts = [
            codec.to_unit_float(codec.validate_inputs({INPUT: torch.from_numpy(r[INPUT])}, self.input_shape))
            for r in requests
        ]
        probs = self._teacher(torch.cat(parts))
        return [{OUTPUT: p.numpy()} for p in torch.split(probs, [len(p) for p in parts])]


def serve(config_path: Path, teacher_name: str, port: int, device: str, workspace: Path | None) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from teacher_service.config import load_config

    # the allocator setting the service runs with, so that only the servers differ
    keep_freed_memory()
    config = load_config(config_path, environ={})
    if teacher_name not in config.teachers:
        raise SystemExit(f"{config_path} declares teachers {sorted(config.teachers)}, not {teacher_name!r}")
    spec, batching = config.teachers[teacher_name], config.server.batching
    shape = tuple(spec.input_shape)
    triton_config = TritonConfig(http_address="127.0.0.1", http_port=port, allow_grpc=False, allow_metrics=False)
    with Triton(config=triton_config, workspace=workspace) as triton:
        triton.bind(
            model_name=teacher_name,
            infer_func=TeacherModel(config_path, teacher_name, torch.device(device), shape),
            inputs=[Tensor(name=INPUT, dtype=np.float32, shape=shape)],
            outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(spec.num_classes,))],
            config=ModelConfig(
                max_batch_size=batching.max_rows,
                batcher=DynamicBatcher(max_queue_delay_microseconds=round(batching.max_wait_ms * 1000)),
            ),
            strict=True,
        )
        triton.serve()


def tritonclient_check(url: str, model: str, folder: Path) -> None:
    """tritonclient's side of bench/triton_client.py's `check_against`: for the float32 batch in FOLDER/x.npy, the
    request tritonclient builds (binary tensors) in FOLDER/request.bin and its header's length in
    FOLDER/header_length.txt, and the `probs` it reads from Triton's answer in FOLDER/probs.npy."""
    import tritonclient.http as http

    x = np.load(folder / "x.npy", allow_pickle=False)
    given = http.InferInput(INPUT, list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=True)
    asked = http.InferRequestedOutput(OUTPUT, binary_data=True)
    body, header_length = http.InferenceServerClient.generate_request_body([given], outputs=[asked])
    (folder / "request.bin").write_bytes(body)
    (folder / "header_length.txt").write_text(str(header_length))
    client = http.InferenceServerClient(url.removeprefix("http://"))
    try:
        probs = client.infer(model, [given], outputs=[asked]).as_numpy(OUTPUT)
    finally:
        client.close()
    np.save(folder / "probs.npy", probs, allow_pickle=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.triton_app", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    served = commands.add_parser("serve", help="serve a teacher of a teachers.toml")
    served.add_argument("--config", required=True, type=Path)
    served.add_argument("--teacher", required=True)
    served.add_argument("--port", type=int, required=True)
    served.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    served.add_argument("--workspace", type=Path, help="PyTriton's model store and sockets (default: a temp folder)")
    check = commands.add_parser("tritonclient", help="tritonclient's request and answer for FOLDER/x.npy")
    check.add_argument("--url", required=True)
    check.add_argument("--model", required=True)
    check.add_argument("--folder", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "tritonclient":
        tritonclient_check(args.url, args.model, args.folder)
        return
    logging.basicConfig(level=logging.WARNING)
    # SIGINT stops PyTriton cleanly (KeyboardInterrupt), also when started from a shell that ignores it (`cmd &`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    serve(args.config, args.teacher, args.port, args.device, args.workspace)


if __name__ == "__main__":
    main()
