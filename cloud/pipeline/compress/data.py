"""The data a compression step learns and is judged on: a training split (distillation,
fine-tuning, neuron scores) beside the pipeline's calibration split (routing) and held-out
split (the gate), from a built-in dataset or an uploaded .npz.

An upload goes through the pipeline's own reader and checks (:func:`from_npz`), then is
split 60 / 20 / 20, seeded. The cloud keeps no inputs of the requests it answered (its
result cache holds outputs only), so fleet samples are not offered as a source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.datasets import BUILTIN_DIGITS, EvalData, builtin, from_npz
from shared.errors import InvalidInput, NotFound
from shared.messages import TensorSpec

__all__ = ["BUILTIN_MINILM", "CompressData", "compress_data"]

Array = npt.NDArray[Any]
BUILTIN_MINILM = "builtin:minilm"
MIN_ROWS = 10


@dataclass(frozen=True, slots=True)
class CompressData:
    train_inputs: dict[str, Array]
    train_labels: Array | None
    eval: EvalData
    name: str | None  # the built-in dataset's name; None for an upload

    def check_labels(self, classes: int) -> None:
        """InvalidInput unless every label (all three splits) is a class index of a model
        with ``classes`` outputs: training indexes by them (-1 would train as the last
        class), the gate compares them with argmax."""
        splits = (self.train_labels, self.eval.calib_labels, self.eval.test_labels)
        parts = [p for p in splits if p is not None and len(p)]
        if not parts:
            return
        labels = np.concatenate(parts)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise InvalidInput(
                f"dataset labels must be class indices 0 to {classes - 1}, got {bad}: the "
                f"model has {classes} classes"
            )


def _builtin(name: str) -> CompressData:
    if name == BUILTIN_DIGITS:
        from cloud.pipeline.reference.digits import digits_splits

        splits = digits_splits(0)
        return CompressData({"input": splits.x_train}, splits.y_train, builtin(name), name)
    if name == BUILTIN_MINILM:
        from cloud.pipeline.reference import minilm

        # The first 128 sentences are the gate's (eval_data); these 256 are not among them.
        train = minilm.tokenize(minilm.sentences(384)[128:])
        return CompressData(train, None, minilm.eval_data(), name)
    raise NotFound(f"unknown built-in dataset {name!r}")


def _split(data: EvalData, seed: int) -> CompressData:
    inputs = {
        k: np.concatenate([data.calib_inputs[k], data.test_inputs[k]]) for k in data.calib_inputs
    }
    labels = None
    if data.calib_labels is not None and data.test_labels is not None:
        labels = np.concatenate([data.calib_labels, data.test_labels])
    n = len(next(iter(inputs.values())))
    if n < MIN_ROWS:
        raise InvalidInput(f"a compression dataset needs at least {MIN_ROWS} rows, has {n}")
    order = np.random.default_rng(seed).permutation(n)
    train, calib, test = np.split(order, [int(n * 0.6), int(n * 0.8)])

    def rows(index: Array) -> dict[str, Array]:
        return {k: v[index] for k, v in inputs.items()}

    def labelled(index: Array) -> Array | None:
        return labels[index] if labels is not None else None

    split = EvalData(rows(calib), labelled(calib), rows(test), labelled(test))
    return CompressData(rows(train), labelled(train), split, None)


def compress_data(
    *, upload: bytes | None, dataset: str | None, inputs: list[TensorSpec], seed: int = 0
) -> CompressData:
    """The uploaded .npz (checked against ``inputs``) if there is one, else the version's
    recorded built-in dataset."""
    if upload is not None:
        return _split(from_npz(upload, inputs, seed=seed), seed)
    if dataset is None:
        raise InvalidInput("this version has no recorded dataset; upload one (.npz)")
    data = _builtin(dataset)
    wanted = sorted(s.name for s in inputs)
    if wanted and wanted != sorted(data.train_inputs):
        raise InvalidInput(
            f"the built-in dataset {dataset!r} gives inputs {sorted(data.train_inputs)}, the "
            f"model takes {wanted}; upload a dataset (.npz)"
        )
    return data
