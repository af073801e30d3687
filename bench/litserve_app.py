"""The peer: the same teacher served by LitServe with its own dynamic batching.

Only the serving framework differs from `akd serve`: the same checkpoint, and
`LocalTeacher`, which runs the service's own forward pass and ensemble formula,
with the same safetensors tensors. LitServe's request path parses JSON, so the input
file travels base64-encoded in `{"inputs": ...}`, the way LitServe's own
examples send binary data; the answer is the same safetensors file as ours.

    python -m bench.litserve_app --config teachers.toml --teacher small_cnn --port 8001
"""

from __future__ import annotations

import argparse
import base64

import litserve as ls
import torch
from fastapi import HTTPException
from fastapi.responses import Response

from shared import codec, protocol
from shared.allocator import keep_freed_memory

PREDICT_PATH = "/predict"


def request_json(body: bytes) -> dict:
    """A safetensors input file as the JSON LitServe reads."""
    return {"inputs": base64.b64encode(body).decode("ascii")}


class TeacherAPI(ls.LitAPI):
    def __init__(self, config_path: str, teacher: str, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.config_path, self.teacher_name = config_path, teacher

    def setup(self, device: str) -> None:
        from student_trainer.teacher_client import LocalTeacher

        # in LitServe's inference process: the allocator setting the service runs with, so that only the servers differ
        keep_freed_memory()
        self.teacher = LocalTeacher(self.config_path, self.teacher_name, temperature=None, device=torch.device(device))
        self.input_shape = tuple(self.teacher.info().input_shape)

    def decode_request(self, request: dict) -> torch.Tensor:
        try:
            tensors = codec.decode(base64.b64decode(request["inputs"]))
            return codec.to_unit_float(codec.validate_inputs(tensors, self.input_shape))
        except (KeyError, TypeError, ValueError) as exc:
            raise HTTPException(422, f"expected {{'inputs': base64 safetensors}}: {exc}") from None

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        # kept apart until predict, which needs each request's row count
        return inputs

    def predict(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        parts = x if isinstance(x, list) else [x]
        probs = self.teacher(torch.cat(parts))
        split = list(torch.split(probs, [len(p) for p in parts]))
        return split if isinstance(x, list) else split[0]

    def unbatch(self, output: list[torch.Tensor]) -> list[torch.Tensor]:
        return output

    def encode_response(self, probs: torch.Tensor) -> Response:
        return Response(codec.encode({"probs": probs}), media_type=protocol.MEDIA_TYPE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.litserve_app", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per batch (LitServe counts requests)")
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds to wait for a batch to fill")
    args = parser.parse_args(argv)
    api = TeacherAPI(args.config, args.teacher, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator=args.device, devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning", num_api_servers=1)


if __name__ == "__main__":
    main()
