"""`python -m student_trainer train|eval|compare ...`: the same as `akd train|eval|compare ...`."""

import sys

from akd.cli import main

sys.exit(main(prog="python -m student_trainer", commands=("train", "eval", "compare")))
