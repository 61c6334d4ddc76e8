"""Dynamic batching for one model version: requests queue (bounded), a worker thread takes
as many as fit in one batch within the queue delay, concatenates their rows along axis 0,
runs the engine once and hands each request its own rows back."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.inference.metrics import InferenceMetrics
from shared.errors import EdgeFleetError, InferenceFailed, ServiceUnavailable

__all__ = ["BatchConfig", "Batcher", "BatcherClosed"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]
Run = Callable[[dict[str, Array]], dict[str, Array]]


class BatcherClosed(Exception):
    """The batcher stopped (its session was evicted): the caller loads it again."""


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """``max_batch_size`` 0: the model has no batch dimension, each request runs alone."""

    max_batch_size: int
    max_queue_delay_s: float
    max_queue: int
    queue_timeout_s: float
    retry_after_s: float = 1.0


@dataclass(slots=True)
class _Job:
    inputs: dict[str, Array]
    rows: int
    shape_key: tuple[Any, ...]
    enqueued: float
    future: Future[dict[str, Array]] = field(default_factory=Future)


def _shape_key(inputs: dict[str, Array]) -> tuple[Any, ...]:
    # Requests batch together only when everything but the rows matches.
    return tuple((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())


class Batcher:
    def __init__(
        self,
        run: Run,
        config: BatchConfig,
        *,
        model: str,
        version: int,
        metrics: InferenceMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.config = config
        self.clock = clock
        self.labels = (model, str(version))
        self.metrics = metrics
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.busy = False  # the worker is running a batch (tests and metrics read it)
        self._thread = threading.Thread(
            target=self._work, name=f"batcher-{model}-{version}", daemon=True
        )
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def oldest_wait_s(self) -> float:
        """How long the request at the head of the queue has waited (0: none is queued)."""
        try:
            head = self._queue[0]  # deque indexing is atomic: no lock on the request path
        except IndexError:
            return 0.0
        return max(0.0, self.clock() - head.enqueued)

    def submit(self, inputs: dict[str, Array], rows: int) -> Future[dict[str, Array]]:
        """Queue one request; 503 with a Retry-After when the queue is full."""
        job = _Job(inputs, rows, _shape_key(inputs), self.clock())
        with self._cond:
            if self._closed:
                raise BatcherClosed
            if len(self._queue) >= self.config.max_queue:
                raise ServiceUnavailable(
                    f"model {self.labels[0]!r} version {self.labels[1]} is overloaded "
                    f"({self.config.max_queue} requests queued); retry later",
                    retry_after_s=self.config.retry_after_s,
                )
            self._queue.append(job)
            self.metrics.pending.labels(*self.labels).set(len(self._queue))
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Stop taking requests; those queued still run, then the worker ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception:  # one bad batch is a line in the log, never the end of the loop
                _LOGGER.exception("batch of %s failed unexpectedly", self.labels)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(InferenceFailed("internal error"))
            finally:
                self.busy = False

    def _take(self) -> list[_Job] | None:
        limit = self.config.max_batch_size
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            deadline = first.enqueued + self.config.max_queue_delay_s
            while limit and rows < limit:
                if self._queue:
                    nxt = self._queue[0]
                    if nxt.shape_key != first.shape_key or rows + nxt.rows > limit:
                        break
                    batch.append(self._queue.popleft())
                    rows += nxt.rows
                    continue
                remaining = deadline - self.clock()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self.busy = True
            self.metrics.pending.labels(*self.labels).set(len(self._queue))
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        started = self.clock()
        live: list[_Job] = []
        for job in batch:
            waited = started - job.enqueued
            self.metrics.queue_duration_us.labels(*self.labels).inc(waited * 1e6)
            self.metrics.queue_seconds.labels(*self.labels).observe(waited)
            if waited > self.config.queue_timeout_s:
                job.future.set_exception(
                    ServiceUnavailable(
                        f"waited {waited:.1f}s in the queue, over the limit of "
                        f"{self.config.queue_timeout_s:g}s; retry later",
                        retry_after_s=self.config.retry_after_s,
                    )
                )
            elif job.future.set_running_or_notify_cancel():
                live.append(job)
        if not live:
            return
        try:
            self._run_together(live)
        except EdgeFleetError as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # One request's rows may be what the engine refused: run each alone, so the
            # others still get their answer.
            for job in live:
                try:
                    self._run_together([job])
                except EdgeFleetError as alone:
                    job.future.set_exception(alone)

    def _run_together(self, jobs: list[_Job]) -> None:
        rows = sum(j.rows for j in jobs)
        if len(jobs) == 1:
            inputs = jobs[0].inputs
        else:
            inputs = {n: np.concatenate([j.inputs[n] for j in jobs]) for n in jobs[0].inputs}
        start = self.clock()
        try:
            outputs = self.run(inputs)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _LOGGER.warning("engine failed on %s: %s", self.labels, first)
            raise InferenceFailed(f"the model failed on this input: {first[:200]}") from exc
        took = self.clock() - start
        labels = self.labels
        self.metrics.exec_count.labels(*labels).inc()
        self.metrics.inference_count.labels(*labels).inc(rows)
        self.metrics.batch_size.labels(*labels).observe(rows)
        self.metrics.compute_seconds.labels(*labels).observe(took)
        self.metrics.compute_infer_duration_us.labels(*labels).inc(took * 1e6 * len(jobs))
        offset = 0
        for job in jobs:
            part = {
                name: (value[offset : offset + job.rows] if _batched(value, rows) else value)
                for name, value in outputs.items()
            }
            offset += job.rows
            job.future.set_result(part)


def _batched(value: Array, rows: int) -> bool:
    return value.ndim > 0 and value.shape[0] == rows
