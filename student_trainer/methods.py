"""The training methods by name, and what each needs: the one list the config validates `method` against and
losses.py implements (it binds a step function to each name here, and to no other).

It sits apart from both so that each imports it, not the other: config.py must know the names and which need a
teacher to validate a run, while losses.py's steps read the validated config.
"""

from __future__ import annotations

# Each method (the config's `method`), in the order error messages list them, and whether it distils a teacher:
# those that do need a [teacher] table, and are called with one.
DISTILS: dict[str, bool] = {
    "standard": False,
    "at": False,
    "trades": False,
    "akd": True,
    "ard": True,
    "rslad": True,
    "iad": True,
}

METHOD_NAMES = tuple(DISTILS)
DISTILLATION_METHODS = tuple(name for name, distils in DISTILS.items() if distils)
