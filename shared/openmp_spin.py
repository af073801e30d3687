"""A serving process's idle OpenMP workers sleep rather than spin: the service waits for requests, and spinning
takes a core from the processes it shares the host with.

torch's CPU ops run on libgomp's thread team. After each parallel region a worker spins, awake for the next one,
for GOMP_SPINCOUNT iterations of a pause before it sleeps: 300,000 by default, milliseconds on x86 cores. A training
loop runs its regions back to back, and the spin catches the next one. A service does not: between requests, and
between the batches of a light load, its worker spun while the event loop read the next body and answered, and
while the trainers beside it (on a shared host) computed. libgomp counts only its own threads when it decides to spin
less, never another process's. What the spin costs and saves on each side, and the command that measures it:
docs/design/teacher-service.md.

libgomp reads the setting once, when it is loaded (with torch): so `akd serve`, and `akd demo --stage serve` (the
compose service), set it before their subcommand's module is imported. Every other command keeps libgomp's default,
as does a setting already in the environment (GOMP_SPINCOUNT, or an OMP_WAIT_POLICY, which implies its own).
"""

from __future__ import annotations

import os
import sys

# Sleep at once after a parallel region (OMP_WAIT_POLICY=passive says the same)
SERVING_SPIN_COUNT = 0
_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def serves(argv: list[str]) -> bool:
    """`akd` arguments that run the teacher service in this process: `serve ...`, or `demo ... --stage serve`."""
    if argv[:1] == ["serve"]:
        return True
    if argv[:1] != ["demo"]:
        return False
    stages = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--stage"]
    stages += [a.split("=", 1)[1] for a in argv if a.startswith("--stage=")]
    return stages[-1:] == ["serve"]


def idle_openmp_workers_sleep() -> bool:
    """GOMP_SPINCOUNT set to SERVING_SPIN_COUNT for the libgomp this process will load; False (nothing set) when the
    environment already says how OpenMP waits, or torch, and so libgomp, is already loaded."""
    if "torch" in sys.modules or any(name in os.environ for name in _SETTINGS):
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SERVING_SPIN_COUNT)
    return True
