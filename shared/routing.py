"""Hard-example scores shared by the edge router and the cloud's threshold calibration.

Each policy turns class probabilities into a *confidence* in [0, 1]; an input is hard,
and goes to the cloud, when its confidence is below the policy's threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput
from shared.messages import RoutingPolicy

__all__ = ["confidence", "is_hard"]

Floats = npt.NDArray[np.floating[Any]]


def confidence(probabilities: Floats, policy: RoutingPolicy) -> Floats:
    """Per-row confidence of ``probabilities`` ([N, K]) under ``policy``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise InvalidInput(f"probabilities must be [N, K>=2], got {list(p.shape)}")
    if policy is RoutingPolicy.MAX_PROB:
        best: Floats = p.max(axis=1)
        return best
    if policy is RoutingPolicy.MARGIN:
        top2 = np.partition(p, -2, axis=1)[:, -2:]
        margin: Floats = top2[:, 1] - top2[:, 0]
        return margin
    if policy is RoutingPolicy.ENTROPY:
        # Normalised entropy (Sedna's CrossEntropyFilter form): 0 = certain, 1 = uniform.
        q = np.clip(p, 1e-12, 1.0)
        entropy = -(q * np.log(q)).sum(axis=1) / np.log(p.shape[1])
        certainty: Floats = 1.0 - entropy
        return certainty
    if policy is RoutingPolicy.ALWAYS_EDGE:
        return np.ones(p.shape[0])
    if policy is RoutingPolicy.ALWAYS_CLOUD:
        return np.zeros(p.shape[0])
    raise InvalidInput(f"unknown routing policy {policy!r}")  # pragma: no cover


def is_hard(
    probabilities: Floats, policy: RoutingPolicy, threshold: float | None
) -> npt.NDArray[np.bool_]:
    if policy is RoutingPolicy.ALWAYS_EDGE:
        return np.zeros(len(probabilities), dtype=bool)
    if policy is RoutingPolicy.ALWAYS_CLOUD:
        return np.ones(len(probabilities), dtype=bool)
    if threshold is None:
        raise InvalidInput(f"policy {policy.value} needs a threshold")
    return confidence(probabilities, policy) < threshold
