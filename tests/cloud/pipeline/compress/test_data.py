"""The data a compression step learns and is judged on: an upload split 60/20/20 (seeded,
every row in exactly one split), the built-in digits as the pipeline splits them, and
clear refusals for data that cannot serve."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cloud.pipeline.compress.data import compress_data
from cloud.pipeline.reference.digits import digits_splits
from shared.errors import InvalidInput
from shared.messages import TensorSpec

SPEC = [TensorSpec(name="input", datatype="FP32", shape=[-1, 3])]


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_an_upload_is_split_sixty_twenty_twenty_without_overlap() -> None:
    x = np.arange(300, dtype=np.float32).reshape(100, 3)  # row i holds 3i, 3i+1, 3i+2
    y = np.arange(100) % 4
    data = compress_data(upload=_npz(x=x, y=y), dataset=None, inputs=SPEC)
    parts = [data.train_inputs, data.eval.calib_inputs, data.eval.test_inputs]
    rows = [(p["input"][:, 0] // 3).astype(int) for p in parts]
    assert [len(r) for r in rows] == [60, 20, 20]
    assert sorted(np.concatenate(rows)) == list(range(100))
    assert data.train_labels is not None
    np.testing.assert_array_equal(data.train_labels, rows[0] % 4)  # labels follow their rows
    assert data.name is None
    again = compress_data(upload=_npz(x=x, y=y), dataset=None, inputs=SPEC)
    np.testing.assert_array_equal(again.eval.test_inputs["input"], data.eval.test_inputs["input"])


def test_the_builtin_digits_are_the_pipeline_s_own_splits() -> None:
    digits = [TensorSpec(name="input", datatype="FP32", shape=[-1, 64])]
    data = compress_data(upload=None, dataset="builtin:digits", inputs=digits)
    splits = digits_splits(0)
    np.testing.assert_array_equal(data.train_inputs["input"], splits.x_train)
    np.testing.assert_array_equal(data.eval.test_inputs["input"], splits.x_test)
    assert data.name == "builtin:digits"


def test_data_that_cannot_serve_is_refused() -> None:
    small = _npz(x=np.zeros((8, 3), np.float32), y=np.zeros(8, np.int64))
    with pytest.raises(InvalidInput, match="at least 10 rows"):
        compress_data(upload=small, dataset=None, inputs=SPEC)
    with pytest.raises(InvalidInput, match="no recorded dataset"):
        compress_data(upload=None, dataset=None, inputs=SPEC)
    other = [TensorSpec(name="pixels", datatype="FP32", shape=[-1, 64])]
    with pytest.raises(InvalidInput, match=r"gives inputs \['input'\], the model takes"):
        compress_data(upload=None, dataset="builtin:digits", inputs=other)


@pytest.mark.parametrize("bad", [-1, 4])
def test_labels_that_are_not_class_indices_are_refused(bad: int) -> None:
    """Four classes: 0..3. A -1 or a 4 in any split is named; the valid labels pass."""
    x = np.zeros((100, 3), np.float32)
    y = np.arange(100) % 4
    compress_data(upload=_npz(x=x, y=y), dataset=None, inputs=SPEC).check_labels(4)
    y[-1] = bad
    data = compress_data(upload=_npz(x=x, y=y), dataset=None, inputs=SPEC)
    with pytest.raises(InvalidInput, match=f"class indices 0 to 3, got {bad}"):
        data.check_labels(4)
