"""`python -m akd ...`: the same as `akd ...`."""

import sys

from akd.cli import main

sys.exit(main())
