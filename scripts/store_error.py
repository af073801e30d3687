"""What each cache row format costs: the served probabilities from stored member rows against the exact ones.

The service serves a cache hit as aggregate_probs(decode(encode(logits))) with the format's own code
(teacher_service.cache.row_formats; tests/service/test_cache_formats.py checks it bit for bit), so this computes the
same thing without a service: each teacher checkpoint on a dataset's test images, its logits through each format, the
ensemble's probabilities at each temperature, and the KL divergence and largest absolute difference from the float32
ones; and the bytes per cached row of each format. The computation is `bench.cache_scale.format_errors`, the one
benchmark 8 (`akd bench --only cache_scale`) reports for random-weight teachers.

    python scripts/store_error.py --dataset mnist5k runs/overfit100/teachers/*/best.pt
    python scripts/store_error.py --random-teacher preact_resnet18 --classes 100     # random weights: logits near 0

scripts/pairs_teacher.py prints the same table (format_rows, markdown_table) for a trained 100-class teacher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_scale import format_errors, member_logits, usable_formats  # noqa: E402
from shared.checkpoint import load_checkpoint  # noqa: E402
from shared.models import build_model  # noqa: E402
from student_trainer.data import load_dataset  # noqa: E402
from teacher_service.cache.rows import row_bytes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", type=Path, help="teacher checkpoints (one ensemble)")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--limit", type=int, default=2000, help="test images used")
    parser.add_argument("--random-teacher", help="an architecture with random weights instead of checkpoints")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--temperatures", default="1,4")
    parser.add_argument("--formats", default="float16,top5,top10", help="row formats to compare with float32")
    args = parser.parse_args()
    if args.random_teacher:
        torch.manual_seed(0)
        shape = (3, 32, 32)
        models = [build_model(args.random_teacher, args.classes, shape).eval()]
        x = torch.rand(args.limit, *shape, generator=torch.Generator().manual_seed(1))
        what = f"{args.random_teacher}, random weights, {args.classes} classes, {args.limit} random inputs"
    else:
        data = load_dataset(args.dataset, None, None, None)
        models = []
        for path in args.checkpoints:
            ckpt = load_checkpoint(path)
            model = build_model(ckpt.arch, ckpt.num_classes, ckpt.input_shape, data.mean, data.std)
            model.load_state_dict(ckpt.state_dict)
            models.append(model.eval())
        x = data.test.x[: args.limit].float() / 255
        what = f"{len(models)} trained teacher(s) on {len(x)} {args.dataset} test images"
    logits = member_logits(models, x)
    print(f"{what}; logits in [{float(logits.min()):.1f}, {float(logits.max()):.1f}]")
    temperatures = [float(v) for v in args.temperatures.split(",")]
    print("\n".join(markdown_table(format_rows(logits, args.formats.split(","), temperatures))))
    return 0


# format, bytes a row, temperature, mean KL, max KL, max abs error
Row = tuple[str, int, float, float, float, float]


def format_rows(logits: torch.Tensor, formats: list[str], temperatures: list[float]) -> list[Row]:
    """float32 and each of `formats` that can hold the logits' classes (a top-k needs more than k), at each
    temperature: the bytes a row and `format_errors` of the (members, N, K) `logits`' ensemble."""
    k = logits.shape[-1]
    return [
        (fmt.name, row_bytes(k, fmt), t, *format_errors(logits, fmt, t))
        for fmt in usable_formats(formats, k)
        for t in temperatures
    ]


def markdown_table(rows: list[Row]) -> list[str]:
    """The rows as a markdown table; a format exact at every temperature (float32) is one row, temperature "any"."""
    lines = [
        "| format | bytes a row | temperature | mean KL(exact || served) | max KL | max abs probability error |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        if all(r[3:] == (0.0, 0.0, 0.0) for r in mine):
            lines.append(f"| {name} | {mine[0][1]} | any | 0 | 0 | 0 |")
            continue
        lines += [f"| {f} | {b} | {t:g} | {mean:.2e} | {top:.2e} | {err:.2e} |" for f, b, t, mean, top, err in mine]
    return lines


if __name__ == "__main__":
    sys.exit(main())
