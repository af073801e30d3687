"""`python -m teacher_service ...`: the same as `akd serve ...`."""

import sys

from akd.cli import main

sys.exit(main(["serve", *sys.argv[1:]], prog="python -m teacher_service"))
