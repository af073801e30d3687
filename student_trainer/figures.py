"""Pictures written to files (curves, reliability diagrams, benchmark plots), never shown on a screen.

matplotlib is imported only when a picture is made (it is slow to import, and a service never draws), with
its file-only backend, so drawing works on a machine without a display.
"""

from __future__ import annotations

from pathlib import Path


def subplots(*args, **kwargs):
    """matplotlib's `plt.subplots`, on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder), and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
