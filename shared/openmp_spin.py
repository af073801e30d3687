"""How long an idle OpenMP worker stays awake: long enough to bridge the gaps inside a forward pass, no longer.

torch's CPU ops run on libgomp's thread team. After each parallel region a worker spins, awake for the next one,
for GOMP_SPINCOUNT iterations of a pause before it sleeps: 300,000 by default, milliseconds on x86 cores, where a
pause costs tens of cycles. Inside a forward pass, or a PGD step, the next region follows within microseconds, and
a short spin catches it. Between a service's requests, or while a trainer waits for the service's answer, a long
spin only burns a core, which the processes it shares the host with (the trainers beside the service, the service
beside them, anything else running) then lack: the same teacher then answers markedly slower on a busy host than
on a quiet one. libgomp counts only its own threads when it decides to spin less ("throttled"), never another
process's. The measurements behind `SPIN_COUNT` are in docs/design/teacher-service.md.

libgomp reads the setting once, when it is loaded (with torch): every `akd` command sets it first. A setting
already in the environment (GOMP_SPINCOUNT, or an OMP_WAIT_POLICY, which implies its own) is left as it is.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 10_000
_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def short_openmp_spin() -> bool:
    """GOMP_SPINCOUNT set to SPIN_COUNT for the libgomp this process will load; False (nothing set) when the
    environment already says how OpenMP waits, or torch, and so libgomp, is already loaded."""
    if "torch" in sys.modules or any(name in os.environ for name in _SETTINGS):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
