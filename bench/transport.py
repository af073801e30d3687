"""4. Transport: the same rows sent as uint8, float16 and float32; request size and round-trip time. And keys first:
a batch of cached rows uploaded whole vs asked for by key.

The rows are clean images, so all three dtypes carry the same values (float16
holds every k/255 closely enough to give the same soft targets); `cache=bypass`,
so every request computes and only the transport differs. Time covers encoding,
the POST, and decoding the answer. The keys-first rows are all cached, so neither
side computes: the time is the transport, hashing the rows included.
"""

from __future__ import annotations

import httpx
import torch

from bench.context import Context
from bench.sections import Section
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
        f"then {spec.keys_batch} cached uint8 rows uploaded whole vs asked for by key (keys first); "
        "median round trip including encode (and hashing) and decode; alternated.",
        [
            "teacher",
            "dtype",
            "request bytes",
            "bytes / row",
            "response bytes",
            "round trip ms",
            "vs float32",
            "vs upload",
        ],
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
            section.rows += keys_first_rows(ctx, client, name, shape)
    finally:
        client.close()
    section.notes.append(
        "The trainer's client picks the dtype itself (`codec.to_transport`): uint8 when every value is an exact "
        "k/255 (clean images), float32 otherwise (adversarial examples)."
    )
    return section


def keys_first_rows(ctx: Context, client: httpx.Client, teacher: str, shape: tuple[int, ...]) -> list[dict]:
    """A batch of uint8 rows the cache holds, uploaded whole (`cache=use`, every row a hit) vs asked for by key
    (`POST /soft-targets/keys`, what the trainer's client does for clean inputs); the same soft targets."""
    batch = ctx.cfg.transport.keys_batch
    images = torch.randint(0, 256, (batch, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    params = {"teacher": teacher, "outputs": "probs"}
    # one upload with `cache=use`: from here on every row of the batch is cached
    client.post(
        protocol.SOFT_TARGETS_PATH,
        content=codec.encode_inputs(images),
        params={**params, "cache": "use"},
    ).raise_for_status()
    sizes: dict[str, tuple[int, int]] = {}

    def upload() -> torch.Tensor:
        body = codec.encode_inputs(images)
        response = client.post(protocol.SOFT_TARGETS_PATH, content=body, params={**params, "cache": "use"})
        return answered("upload, all cached", body, response)

    def by_keys() -> torch.Tensor:
        body = codec.encode_keys(images)
        response = client.post(protocol.SOFT_TARGET_KEYS_PATH, content=body, params=params)
        return answered("keys first, all cached", body, response)

    def answered(label: str, body: bytes, response: httpx.Response) -> torch.Tensor:
        response.raise_for_status()
        if int(response.headers[protocol.HEADER_CACHE_HITS]) != batch:
            raise RuntimeError(f"transport, {label}: {response.headers[protocol.HEADER_CACHE_HITS]} of {batch} hits")
        sizes[label] = (len(body), len(response.content))
        return codec.decode(response.content)["probs"]

    if not torch.equal(upload(), by_keys()):
        raise RuntimeError("transport: keys first answered other soft targets than the upload")
    times = alternate(
        {"upload, all cached": upload, "keys first, all cached": by_keys},
        ctx.cfg.repetitions,
        ctx.cfg.warmup,
        ctx.device,
        ctx.cfg.min_seconds,
    )
    whole = median(times["upload, all cached"])
    return [
        {
            "teacher": teacher,
            "dtype": f"uint8 x {batch}: {label}",
            "request bytes": sizes[label][0],
            "bytes / row": sizes[label][0] / batch,
            "response bytes": sizes[label][1],
            "round trip ms": median(samples) * 1e3,
            "vs upload": median(samples) / whole,
            "samples": samples,
        }
        for label, samples in times.items()
    ]
