"""The wire protocol's names that a client needs: paths, tensor names, headers, cache modes, error codes.

The standard library only, so that a client (`shared.client`) reads them without the JSON models' pydantic;
`shared.protocol` re-exports every one, and stays the one place both sides read names from.
"""

from __future__ import annotations

from enum import Enum

SOFT_TARGETS_PATH = "/soft-targets"
# Keys first: the rows' content hashes (shared.hashing.row_keys of the rows as they would be sent), answered with the
# soft targets of the rows the cache holds for every member, and which those are; the client then uploads only the
# others to SOFT_TARGETS_PATH. Offered where /teachers lists KEYS_FIRST in `features` (a service with a cache).
SOFT_TARGET_KEYS_PATH = "/soft-targets/keys"
KEYS_FIRST = "keys-first"
KEYS_KEY = "keys"
FOUND_KEY = "found"
TEACHERS_PATH = "/teachers"
# Offered where /teachers lists it: the Open Inference Protocol's system shared-memory regions (shared/oip.py), which a
# client on the service's host uses so that a request carries neither its rows nor its answer.
SHARED_MEMORY = "system-shared-memory"

INPUTS_KEY = "inputs"
INPUT_DTYPES = ("uint8", "float16", "float32")

HEADER_CACHE_HITS = "X-Cache-Hits"
HEADER_TEACHER_VERSIONS = "X-Teacher-Versions"
HEADER_TEACHER = "X-Teacher"
# Set by clients on queries whose rows the cache keeps; a load balancer in front of replicas routes one value to
# one replica (deploy/nginx.conf hashes it), so those rows are cached once and hit. The service ignores it.
HEADER_AFFINITY = "X-AKD-Affinity"

# The error code of a 500 for rows whose teacher logits are not finite: the same rows fail again on any replica and
# at any time, so a client treats it as a wrong answer, not as trouble that passes.
NON_FINITE_OUTPUT = "non_finite_output"


class CacheMode(str, Enum):
    # read hits, store misses
    use = "use"
    # neither read nor store
    bypass = "bypass"
    # recompute every row and store the new result
    refresh = "refresh"


class Aggregate(str, Enum):
    # sum_k beta_k softmax(T_k / tau): the paper's choice
    probs = "probs"
    # softmax(sum_k beta_k T_k / tau)
    logits = "logits"
