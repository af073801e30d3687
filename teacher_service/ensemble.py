"""Ensemble aggregation: how M member logits become one soft target.

Written once: the service computes `probs` with it and the trainer's local teacher reuses it, so both paths agree to
the bit on the same device.
"""

from __future__ import annotations

import torch

from shared.protocol import Aggregate


def normalised_weights(weights: list[float] | torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.ndim != 1 or len(w) == 0 or bool((w <= 0).any()):
        raise ValueError(f"member weights must be a non-empty list of positive numbers, got {w.tolist()}")
    return w / w.sum()


def mean_logits(member_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(M, B, K) -> (B, K): sum_k beta_k T_k(x)."""
    return torch.einsum("m,mbk->bk", weights.to(member_logits), member_logits)


def aggregate_probs(
    member_logits: torch.Tensor, weights: torch.Tensor, temperature: float, aggregate: Aggregate = Aggregate.probs
) -> torch.Tensor:
    """(M, B, K) -> (B, K) probabilities.

    `probs`: sum_k beta_k softmax(T_k / tau) (the AKD paper averages probabilities);
    `logits`: softmax(sum_k beta_k T_k / tau).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if Aggregate(aggregate) is Aggregate.logits:
        return tempered_softmax(mean_logits(member_logits, weights), temperature)
    member_probs = tempered_softmax(member_logits, temperature)
    return torch.einsum("m,mbk->bk", weights.to(member_probs), member_probs)


def tempered_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / tau), shifted by max(z) first so that a tiny tau gives the argmax, not NaN."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return torch.softmax(shifted / max(temperature, torch.finfo(logits.dtype).tiny), dim=-1)
