"""4. Transport: the same rows sent as uint8, float16 and float32; request size and round-trip time.

The rows are clean images, so all three dtypes carry the same values (float16
holds every k/255 closely enough to give the same soft targets); `cache=bypass`,
so every request computes and only the transport differs. Time covers encoding,
the POST, and decoding the answer.
"""

from __future__ import annotations

import httpx
import torch

from bench.context import Context
from bench.results import Section
from bench.timing import alternate, median
from shared import codec, protocol

DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


def as_dtype(images: torch.Tensor, dtype: str) -> torch.Tensor:
    return images if dtype == "uint8" else (images.float() / 255).to(DTYPES[dtype])


def run(ctx: Context) -> Section:
    spec = ctx.cfg.transport
    section = Section(
        "transport",
        "4. Transport: input dtype",
        f"Batch {spec.batch} of clean images sent as each dtype (safetensors body, `cache=bypass`); "
        "median round trip including encode and decode; alternated.",
        ["teacher", "dtype", "request bytes", "bytes / row", "response bytes", "round trip ms", "vs float32"],
    )
    client = httpx.Client(base_url=ctx.service().url, timeout=300)
    try:
        for name in spec.teachers:
            ctx.progress(f"transport: {name}")
            shape = ctx.teacher(name).input_shape
            images = torch.randint(
                0, 256, (spec.batch, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
            )
            params = {"teacher": name, "outputs": "probs", "cache": "bypass"}
            sizes: dict[str, tuple[int, int]] = {}

            def send(dtype: str, images=images, params=params, sizes=sizes) -> torch.Tensor:
                body = codec.encode_inputs(as_dtype(images, dtype))
                response = client.post(protocol.SOFT_TARGETS_PATH, content=body, params=params)
                response.raise_for_status()
                sizes[dtype] = (len(body), len(response.content))
                return codec.decode(response.content)["probs"]

            times = alternate(
                {d: (lambda d=d: send(d)) for d in spec.dtypes},
                ctx.cfg.repetitions,
                ctx.cfg.warmup,
                ctx.device,
                ctx.cfg.min_seconds,
            )
            reference = median(times["float32"]) if "float32" in times else None
            for dtype in spec.dtypes:
                t = median(times[dtype])
                section.rows.append(
                    {
                        "teacher": name,
                        "dtype": dtype,
                        "request bytes": sizes[dtype][0],
                        "bytes / row": sizes[dtype][0] / spec.batch,
                        "response bytes": sizes[dtype][1],
                        "round trip ms": t * 1e3,
                        "vs float32": t / reference if reference else None,
                        "samples": times[dtype],
                    }
                )
    finally:
        client.close()
    section.notes.append(
        "The trainer's client picks the dtype itself (`codec.to_transport`): uint8 when every value is an exact "
        "k/255 (clean images), float32 otherwise (adversarial examples)."
    )
    return section
