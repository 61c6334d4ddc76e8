"""The cloud models B3 serves: how each is built and registered, what one request holds, and
the batch sizes its engine ceiling is timed at."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.context import CloudContext
from cloud.pipeline.reference import digits
from cloud.pipeline.register import register_version
from cloud.registry import repository
from shared.errors import MissingExtra

__all__ = ["MODELS", "BenchModel", "register"]

Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class BenchModel:
    name: str
    # The ONNX bytes; raises MissingExtra when the model needs what is not installed.
    build: Callable[[], bytes]
    # ``n`` request rows, input name -> array (what ``n`` hard inputs of an agent hold).
    rows: Callable[[int], dict[str, Array]]
    engine_batches: tuple[int, ...]
    # Interleaved rounds x calls per round for the engine ceiling (full, quick): a MiniLM
    # batch of 32 takes a good part of a second on one core.
    engine_timing: tuple[tuple[int, int], tuple[int, int]]
    # Seconds of each closed- and open-loop run (full, quick): many times a batch's time,
    # or requests still in flight at the end weigh on the count.
    seconds: tuple[float, float]
    what: str


def _digits_rows(n: int) -> dict[str, Array]:
    x = digits.digits_splits(0).x_test
    return {"input": np.ascontiguousarray(np.resize(x, (n, x.shape[1])), dtype=np.float32)}


def _digits_build() -> bytes:
    return digits.build_cloud(digits.digits_splits(0))


def _minilm_build() -> bytes:
    from cloud.pipeline.reference.minilm import export_minilm

    return export_minilm()


def _minilm_rows(n: int) -> dict[str, Array]:
    from cloud.pipeline.reference.minilm import sentences, tokenize

    tokens = tokenize(sentences(max(n, 2)))
    return {k: np.ascontiguousarray(v[:n]) for k, v in tokens.items()}


MODELS = {
    m.name: m
    for m in (
        BenchModel(
            "digits-cloud",
            _digits_build,
            _digits_rows,
            (1, 8, 32, 128),
            ((10, 20), (3, 5)),
            (3.0, 1.5),
            "RBF SVM as ONNX, one 64-float row a request",
        ),
        BenchModel(
            "minilm",
            _minilm_build,
            _minilm_rows,
            (1, 4, 8, 16, 32),
            ((5, 3), (2, 2)),
            (5.0, 4.0),
            "all-MiniLM-L6-v2 FP32, one sentence of 32 tokens a request",
        ),
    )
}


def register(context: CloudContext, model: BenchModel) -> str:
    """Register ``model`` as version 1 through the pipeline's own registration; its sha256."""
    data = model.build()
    with context.database.session() as session:
        repository.create_model(session, name=model.name)
        return register_version(
            session,
            context.artifacts,
            model_name=model.name,
            blocks=[data],
            max_bytes=len(data) + 1,
            precision="fp32",
            actor="bench",
        ).artifact_sha256


def available(model: BenchModel) -> str | None:
    """None when ``model`` can be built here, else why not."""
    if model.name != "minilm":
        return None
    try:
        from cloud.pipeline.reference.minilm import tokenize

        tokenize(["probe"])
    except (MissingExtra, ImportError) as exc:
        return str(exc)
    return None
