"""The accuracy gate: an INT8 (pruned, FP16, distilled) candidate is registered only if it
keeps its parent's quality on held-out data (accuracy for classifiers; cosine and
neighbours for embeddings)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.evaluate import accuracy, cosine_rows, make_session, run_model
from shared.errors import GateFailed, InvalidInput

__all__ = ["gate_classifier", "gate_embedding"]

Array = npt.NDArray[Any]


def gate_classifier(
    fp32: bytes,
    int8: bytes,
    inputs: dict[str, Array],
    labels: Array,
    *,
    output: str = "probabilities",
    max_drop_pt: float = 0.5,
    parent_output: str | None = None,
    candidate_label: str = "INT8",
    parent_label: str = "FP32",
) -> dict[str, float]:
    """Accuracy of both on held-out data; raise :class:`GateFailed` if the candidate
    (``int8``) drops too much below its parent (``fp32``)."""
    if len(labels) == 0:
        raise InvalidInput("the gate needs labelled held-out data")
    parent_probs = run_model(make_session(fp32), inputs, output=parent_output or output)
    parent = accuracy(parent_probs, labels)
    candidate = accuracy(run_model(make_session(int8), inputs, output=output), labels)
    drop_pt = (parent - candidate) * 100
    metrics = {
        "accuracy": round(candidate, 6),
        "parent_accuracy": round(parent, 6),
        "accuracy_drop_pt": round(drop_pt, 4),
        "gate_examples": float(len(labels)),
    }
    if drop_pt > max_drop_pt:
        raise GateFailed(
            f"{candidate_label} candidate refused: accuracy {candidate:.2%} vs {parent_label} "
            f"{parent:.2%} "
            f"({drop_pt:.2f} pt drop > {max_drop_pt} pt allowed) on {len(labels)} held-out examples"
        )
    return metrics


def _nearest(embeddings: Array) -> Array:
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest: Array = similarity.argmax(axis=1)
    return nearest


def gate_embedding(
    fp32: bytes,
    int8: bytes,
    inputs: dict[str, Array],
    *,
    output: str,
    min_cosine: float = 0.99,
    min_neighbour_agreement: float = 0.75,
    candidate_label: str = "INT8",
) -> dict[str, float]:
    """Mean cosine to FP32 and nearest-neighbour agreement; raise if either is too low.

    Cosine is the gate of record (>= 0.99). Neighbour agreement only catches a collapse:
    on a corpus of near-paraphrases the nearest neighbour is often a coin toss even in FP32.
    """
    parent = run_model(make_session(fp32), inputs, output=output, batch_size=32)
    candidate = run_model(make_session(int8), inputs, output=output, batch_size=32)
    cosines = cosine_rows(parent, candidate)
    agreement = float((_nearest(parent) == _nearest(candidate)).mean()) if len(parent) > 2 else 1.0
    metrics = {
        "cosine_mean": round(float(cosines.mean()), 6),
        "cosine_min": round(float(cosines.min()), 6),
        "neighbour_agreement": round(agreement, 6),
        "gate_examples": float(len(parent)),
    }
    if metrics["cosine_mean"] < min_cosine or agreement < min_neighbour_agreement:
        raise GateFailed(
            f"{candidate_label} candidate refused: mean cosine to FP32 {cosines.mean():.4f} "
            f"(need >= {min_cosine}), nearest-neighbour agreement {agreement:.2%} (need >= "
            f"{min_neighbour_agreement:.0%}) on {len(parent)} held-out examples"
        )
    return metrics
