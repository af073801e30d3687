"""A trained 100-class teacher from the offline data (mnist5k), for the row formats' errors at 100 classes.

CIFAR-100 is not available offline, and random-weight networks' logits sit near 0 and say little about a trained
teacher's rows, so this builds two-digit MNIST from mnist5k: a 1x28x56 image of two digits side by side, labelled
10 * left + right. Training pairs are drawn (default_rng(--seed)) from mnist5k's training split only, held-out pairs
(default_rng(0), the same for every seed) from its test split, digits the teacher never saw. It trains the registry's
`tiny_cnn` (its adaptive pool brings the wider feature map to the usual head) on the CPU, the last --adv-epochs epochs
on PGD examples (PGD-AT after a clean warm start), and prints scripts/store_error.py's table (the same `format_errors`)
on the held-out pairs' logits.

    python scripts/pairs_teacher.py --epochs 4 --adv-epochs 2 --out runs/pairs_teacher    # minutes on a CPU
    python scripts/pairs_teacher.py --epochs 4 --adv-epochs 0      # a clean teacher instead (sharper logits)
    python scripts/pairs_teacher.py --weights runs/pairs_teacher/teacher.pt     # measure saved weights again
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from store_error import format_rows, markdown_table  # noqa: E402

from bench.cache_scale import member_logits  # noqa: E402
from shared.codec import to_unit_float  # noqa: E402
from shared.models import ARCHITECTURES  # noqa: E402
from shared.models.normalize import Normalize  # noqa: E402
from student_trainer.attacks import PGD, ce_loss  # noqa: E402
from student_trainer.data import Split, iterate_batches, load_dataset  # noqa: E402

CLASSES = 100
ARCH = "tiny_cnn"
HELD_OUT_SEED = 0


def make_pairs(split: Split, n: int, rng: np.random.Generator) -> tuple[Split, np.ndarray]:
    """`n` images of two of `split`'s digits side by side, (n, C, H, 2W) uint8, labelled 10 * left + right; and the
    (n, 2) indices of the left and right digits in `split`."""
    idx = rng.integers(0, len(split), size=(n, 2))
    left, right = torch.from_numpy(idx[:, 0]), torch.from_numpy(idx[:, 1])
    x = torch.cat([split.x[left], split.x[right]], dim=3)
    return Split(x, 10 * split.y[left] + split.y[right]), idx


def build_teacher(mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """build_model's layout (normalize, net) for the 28x56 input build_model refuses: the registry's tiny_cnn."""
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=ARCHITECTURES[ARCH](CLASSES, len(mean))))


def train(
    model: nn.Module,
    data: Split,
    epochs: int,
    seed: int,
    attack: PGD | None = None,
    adv_epochs: int = 0,
    lr: float = 1e-3,
    batch_size: int = 128,
) -> None:
    """Adam (one-cycle schedule) on cross-entropy, the last `adv_epochs` epochs on `attack`'s examples; a line an
    epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(data) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for epoch in range(1, epochs + 1):
        start, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        adversarial = attack is not None and epoch > epochs - adv_epochs
        model.train()
        for _, xb, yb in iterate_batches(data, batch_size, generator):
            x = to_unit_float(xb)
            if adversarial:
                x = attack.perturb(model, x, ce_loss(yb), generator)
            out = model(x)
            loss = F.cross_entropy(out, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(yb)
        kind = "adversarial" if adversarial else "clean"
        print(
            f"epoch {epoch}/{epochs}: loss {total / seen:.3f}, {kind} train accuracy {correct / seen:.3f}, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    model.eval()


def accuracy(model: nn.Module, data: Split, attack: PGD | None = None) -> float:
    correct = 0
    for _, xb, yb in iterate_batches(data, 500, None):
        x = to_unit_float(xb)
        if attack is not None:
            x = attack.perturb(model, x, ce_loss(yb), torch.Generator().manual_seed(0))
        with torch.inference_mode():
            correct += int((model(x).argmax(1) == yb).sum())
    return correct / len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="save the trained weights here as teacher.pt (a plain state_dict)")
    parser.add_argument("--weights", type=Path, help="a saved teacher.pt to measure instead of training one")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="training pairs, initial weights, batch order, PGD")
    parser.add_argument("--train-pairs", type=int, default=20_000)
    parser.add_argument("--test-pairs", type=int, default=2_000)
    parser.add_argument("--adv-epochs", type=int, default=2, help="the last N epochs train on PGD examples")
    parser.add_argument("--eps", type=float, default=0.1, help="PGD's L-inf radius in [0, 1] pixels")
    parser.add_argument("--pgd-steps", type=int, default=2)
    parser.add_argument("--temperatures", default="1,4")
    parser.add_argument("--formats", default="float16,top5,top10", help="row formats to compare with float32")
    args = parser.parse_args(argv)
    if not 0 <= args.adv_epochs <= args.epochs:
        parser.error(f"--adv-epochs must be in [0, --epochs = {args.epochs}], got {args.adv_epochs}")

    data = load_dataset("mnist5k")
    train_pairs, _ = make_pairs(data.train, args.train_pairs, np.random.default_rng(args.seed))
    test_pairs, _ = make_pairs(data.test, args.test_pairs, np.random.default_rng(HELD_OUT_SEED))
    torch.manual_seed(args.seed)
    model = build_teacher(data.mean, data.std)
    attack = None
    if args.adv_epochs > 0:
        attack = PGD(eps=args.eps, step_size=2.5 * args.eps / args.pgd_steps, steps=args.pgd_steps)
    start = time.perf_counter()
    if args.weights is not None:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
        model.eval()
        how = f"weights from {args.weights}"
    else:
        train(model, train_pairs, args.epochs, args.seed, attack, args.adv_epochs)
        how = f"{args.epochs} epochs on {len(train_pairs)} pairs" + (
            f", the last {args.adv_epochs} PGD-AT (eps {args.eps:g}, {args.pgd_steps} steps)" if attack else ", clean"
        )
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.out / "teacher.pt")
            print(f"saved {args.out / 'teacher.pt'}")
    robust = f", PGD accuracy {accuracy(model, test_pairs, attack):.3f}" if attack is not None else ""
    print(
        f"{ARCH}, {CLASSES} classes (two-digit MNIST), {how}, {time.perf_counter() - start:.0f} s; held-out "
        f"accuracy {accuracy(model, test_pairs):.3f}{robust} on {len(test_pairs)} pairs of mnist5k test digits"
    )

    logits = member_logits([model], to_unit_float(test_pairs.x))
    print(f"logits in [{float(logits.min()):.1f}, {float(logits.max()):.1f}]")
    temperatures = [float(v) for v in args.temperatures.split(",")]
    print("\n".join(markdown_table(format_rows(logits, args.formats.split(","), temperatures))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
