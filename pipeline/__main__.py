"""`python -m pipeline ...`: the same as `akd demo ...`."""

import sys

from akd.cli import main

sys.exit(main(["demo", *sys.argv[1:]], prog="python -m pipeline"))
