"""One student against PGD-AT over several teacher sets: a demo folder per set, each with its own teachers and the
same student seeds (RESULTS.md, "How much the teacher set matters"); the analysis is pipeline/replicates.py's.

    python scripts/teacher_sets.py runs/overfit100 runs/overfit-teachers-b runs/overfit-teachers-c
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.replicates import table
from pipeline.verdicts import RULE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="akd demo folders, one per teacher set")
    parser.add_argument("--student", default="akd-ensemble")
    parser.add_argument("--baseline", default="pgd-at")
    args = parser.parse_args()
    print(
        f"{args.student} minus {args.baseline} at the final epoch, in points: mean [95% CI], t(df), p, verdict "
        f"(per set: over its seeds; last row: over the sets' means). {RULE}\n"
    )
    print(table(args.folders, args.student, args.baseline))


if __name__ == "__main__":
    main()
