"""The device's sample buffer: bounded, label-balanced eviction, app feedback over cloud
labels, one transaction per add, and what a second process reads."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.samples import LabelSource, SampleBuffer
from shared.errors import InvalidInput


def _rows(n: int, start: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.arange(start * 4, (start + n) * 4, dtype=np.float32).reshape(n, 4)}


def test_rows_come_back_with_their_labels_and_sources(tmp_path: Path) -> None:
    """Added rows are read back in order, tensors intact, labels and sources kept."""
    buffer = SampleBuffer(tmp_path / "s.db", max_samples=100, max_bytes=1 << 20)
    buffer.add("m", 1, _rows(3), [0, 1, 2], LabelSource.CLOUD)
    buffer.add("m", 2, _rows(2, start=3), [5, 6], LabelSource.FEEDBACK)
    samples = buffer.load("m")
    assert len(samples) == 5
    np.testing.assert_array_equal(samples.inputs["input"], _rows(5)["input"])
    assert samples.labels.tolist() == [0, 1, 2, 5, 6]
    assert samples.sources == ["cloud"] * 3 + ["feedback"] * 2
    assert samples.versions == [1, 1, 1, 2, 2]
    assert buffer.stats().by_source == {"cloud": 3, "feedback": 2}
    assert len(buffer.load("other")) == 0


def test_feedback_relabels_a_cloud_sample_but_not_the_reverse(tmp_path: Path) -> None:
    """The same input is one row: an app's label replaces the cloud's; a later cloud
    answer does not overwrite what an app said."""
    buffer = SampleBuffer(tmp_path / "s.db", max_samples=100, max_bytes=1 << 20)
    assert buffer.add("m", 1, _rows(1), [3], LabelSource.CLOUD).added == 1
    relabelled = buffer.add("m", 1, _rows(1), [4], LabelSource.FEEDBACK)
    assert (relabelled.added, relabelled.relabelled) == (0, 1)
    kept = buffer.add("m", 1, _rows(1), [9], LabelSource.CLOUD)
    assert (kept.added, kept.relabelled, kept.kept) == (0, 0, 1)
    samples = buffer.load("m")
    assert samples.labels.tolist() == [4]
    assert samples.sources == ["feedback"]


def test_eviction_keeps_labels_balanced_and_prefers_dropping_cloud_labels(
    tmp_path: Path,
) -> None:
    """Over the bound, the oldest row of the most frequent label goes first, a cloud label
    before app feedback: a burst of one class does not push the others out."""
    buffer = SampleBuffer(tmp_path / "s.db", max_samples=6, max_bytes=1 << 20)
    buffer.add("m", 1, _rows(2), [1, 2], LabelSource.CLOUD)
    buffer.add("m", 1, _rows(1, start=2), [0], LabelSource.FEEDBACK)
    result = buffer.add("m", 1, _rows(5, start=3), [0, 0, 0, 0, 0], LabelSource.CLOUD)
    assert result.evicted == 2
    samples = buffer.load("m")
    assert len(samples) == 6
    assert sorted(samples.labels.tolist()) == [0, 0, 0, 0, 1, 2]
    # The app's label of class 0 survived; the two oldest cloud-labelled 0s went.
    assert samples.sources.count("feedback") == 1
    np.testing.assert_array_equal(samples.inputs["input"][-2:], _rows(2, start=6)["input"])


def test_the_byte_bound_holds_too(tmp_path: Path) -> None:
    """Rows of 64 floats: a 2 KiB budget keeps about seven of them."""
    buffer = SampleBuffer(tmp_path / "s.db", max_samples=1000, max_bytes=2048)
    big = {"input": np.ones((20, 64), dtype=np.float32) * np.arange(20)[:, None]}
    buffer.add("m", 1, big, list(range(10)) * 2, LabelSource.CLOUD)
    stats = buffer.stats()
    assert stats.bytes <= 2048
    assert 0 < stats.samples < 20


def test_a_bad_add_stores_nothing(tmp_path: Path) -> None:
    """Labels that do not match the rows are refused before the transaction."""
    buffer = SampleBuffer(tmp_path / "s.db", max_samples=10, max_bytes=1 << 20)
    with pytest.raises(InvalidInput):
        buffer.add("m", 1, _rows(3), [1, 2], LabelSource.CLOUD)
    assert buffer.stats().samples == 0


def _add_forever(path: str) -> None:
    buffer = SampleBuffer(Path(path), max_samples=10_000, max_bytes=1 << 30)
    i = 0
    while True:
        buffer.add("m", 1, _rows(50, start=i * 50), [i % 10] * 50, LabelSource.CLOUD)
        i += 1


def test_a_writer_killed_mid_add_leaves_whole_adds_only(tmp_path: Path) -> None:
    """SIGKILL a process that adds 50 rows per transaction: the buffer another process
    opens afterwards holds a multiple of 50 rows, each readable."""
    path = tmp_path / "s.db"
    SampleBuffer(path, max_samples=10, max_bytes=1024).close()
    writer = multiprocessing.get_context("spawn").Process(target=_add_forever, args=(str(path),))
    writer.start()
    try:
        reader = SampleBuffer.open_existing(path)
        while reader.stats().samples < 500:
            assert writer.is_alive()
            time.sleep(0.01)
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        samples = SampleBuffer.open_existing(path).load("m")
        assert len(samples) % 50 == 0
        assert samples.inputs["input"].shape == (len(samples), 4)
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join()


def test_open_existing_refuses_a_missing_buffer(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no sample buffer"):
        SampleBuffer.open_existing(tmp_path / "none.db")
