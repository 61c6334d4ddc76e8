"""Admission of compression jobs: a few at a time per API process (each holds a worker
thread and the CPU for seconds to minutes), and one at a time per model across replicas
(two jobs writing one model would both do all their work and the second meet a 409 when
it registers)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from cloud.context import CloudContext
from shared.errors import Conflict, ServiceUnavailable

__all__ = ["MAX_JOBS", "SLOTS", "admitted", "lock_name"]

_LOGGER = logging.getLogger(__name__)
# The API's worker threads are shared with every sync endpoint; a compression job takes the
# CPU whole (training, sessions), so more at once only makes each slower.
MAX_JOBS = 2
SLOTS = threading.BoundedSemaphore(MAX_JOBS)
# Longer than any job the request bounds allow; a crashed holder frees the model then.
_LOCK_TIMEOUT_S = 1800
_RETRY_AFTER_S = 30.0


def lock_name(model: str) -> str:
    return f"edgefleet:lock:compress:{model}"


@contextmanager
def admitted(context: CloudContext, model: str) -> Iterator[None]:
    """Run a job that writes a version of ``model``, or refuse it at once: 503 (with
    Retry-After) when this process runs MAX_JOBS already, 409 while another job writes the
    model."""
    if not SLOTS.acquire(blocking=False):
        raise ServiceUnavailable(
            f"{MAX_JOBS} compression jobs are running on this API process; retry later",
            retry_after_s=_RETRY_AFTER_S,
        )
    try:
        lock = context.redis.lock(lock_name(model), timeout=_LOCK_TIMEOUT_S)
        try:
            held = lock.acquire(blocking=False)
        except redis.RedisError as exc:
            raise ServiceUnavailable(
                f"compression jobs are coordinated in Redis, which failed: {exc}",
                retry_after_s=_RETRY_AFTER_S,
            ) from exc
        if not held:
            raise Conflict(f"a compression job is writing model {model!r}; retry when it is done")
        try:
            yield
        finally:
            try:
                lock.release()
            except redis.RedisError:
                # Expired or Redis gone: the timeout frees it; the job's result stands.
                _LOGGER.warning("compression lock for %s not released", model, exc_info=True)
    finally:
        SLOTS.release()
