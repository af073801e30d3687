"""Write an example two-member MNIST teacher ensemble and its config, for `make serve`.

The members are freshly initialised small CNNs (a project checkpoint and a
torch.export file): enough to exercise the service end to end. Trained, robust
teachers come from `akd train`; point the config's member paths at them.
"""

import sys
from pathlib import Path

import torch

from shared.checkpoint import Checkpoint, save_checkpoint
from shared.models import build_model

SHAPE = (1, 28, 28)
CONFIG = """\
[server]
host = "127.0.0.1"
port = 8000

[server.cache]
dir = "cache"

[teachers.mnist]
num_classes = 10
input_shape = [1, 28, 28]
aggregate = "probs"
temperature = 1.0

[[teachers.mnist.members]]
path = "member-a.pt"
weight = 1.0

[[teachers.mnist.members]]
path = "member-b.pt2"
weight = 2.0
"""


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "teachers.toml").exists():
        print(f"{out}/teachers.toml exists; serving it as it is")
        return
    torch.manual_seed(0)
    a = build_model("small_cnn", 10, SHAPE).eval()
    save_checkpoint(
        out / "member-a.pt",
        Checkpoint("small_cnn", 10, SHAPE, a.state_dict(), {"epoch": 0, "note": "untrained example"}),
    )
    b = build_model("small_cnn", 10, SHAPE).eval()
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(b, (torch.rand(4, *SHAPE),), dynamic_shapes=({0: batch},)), out / "member-b.pt2"
    )
    (out / "teachers.toml").write_text(CONFIG)
    print(f"wrote {out}/teachers.toml with members member-a.pt and member-b.pt2")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/example"))
