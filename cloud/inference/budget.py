"""The offload budget loop of one inference replica: every interval it samples its batchers'
queue (from the service's own metrics), decides with the other replicas through Redis, and
publishes the budget it changed on ``cloud/budget`` (QoS 1, retained; empty when clear).

Only the replica that changes the budget publishes it (a publication fans out to the whole
fleet); a replica publishes again what Redis holds when its link reconnected (a broker that
lost its retained messages) and, on start, clears a budget a dead cloud may have left.
Redis or the broker being down costs budget steps, never inference."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from cloud.context import CloudContext
from cloud.inference.backpressure import (
    BackpressureConfig,
    BudgetState,
    Change,
    Decision,
    Sample,
    SaturationDetector,
    decide,
)
from cloud.inference.budget_store import BudgetStore
from cloud.inference.metrics import InferenceMetrics
from cloud.inference.pool import SessionPool
from shared import topics
from shared.messages import CloudBudget, budget_payload
from shared.mqtt_link import MqttLink

__all__ = ["BudgetLoop", "budget_loop_for", "cloud_budget"]

_LOGGER = logging.getLogger(__name__)


def cloud_budget(state: BudgetState | None, *, ttl_s: float) -> CloudBudget | None:
    """The message devices get for ``state``, written (changed or renewed) ``ttl_s`` before
    its ``until``: devices whose clocks are off follow it for ``ttl_s`` from receipt."""
    if state is None:
        return None
    return CloudBudget(
        max_offload=round(state.max_offload, 6),
        reason=state.reason[:200],
        until=datetime.fromtimestamp(state.until, UTC),
        ttl_s=ttl_s,
        issued_at=datetime.fromtimestamp(state.until - ttl_s, UTC),
    )


@dataclass(slots=True)
class _Totals:
    started: float = 0.0
    waited_s: float = 0.0
    served: float = 0.0
    rejected: float = 0.0
    pending: float = 0.0


def _totals(metrics: InferenceMetrics) -> _Totals:
    """The service's counters summed over models and versions."""
    totals = _Totals()
    for family in metrics.queue_seconds.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                totals.started += sample.value
            elif sample.name.endswith("_sum"):
                totals.waited_s += sample.value
    for family in metrics.request_success.collect():
        totals.served += sum(s.value for s in family.samples if s.name.endswith("_total"))
    for family in metrics.request_failure.collect():
        totals.rejected += sum(
            s.value
            for s in family.samples
            if s.name.endswith("_total") and s.labels.get("reason") == "REJECTED"
        )
    for family in metrics.pending.collect():
        totals.pending += sum(s.value for s in family.samples)
    return totals


class BudgetLoop:
    def __init__(
        self,
        *,
        metrics: InferenceMetrics,
        pool: SessionPool,
        store: BudgetStore,
        publish: Callable[[bytes], bool],
        config: BackpressureConfig,
        interval_s: float,
        link: MqttLink | None = None,
        owns_link: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.pool = pool
        self.store = store
        self.publish = publish
        self.config = config
        self.interval_s = interval_s
        self.link = link
        self.owns_link = owns_link
        self.clock = clock  # the detector's; what replicas share is on Redis's clock
        self.detector = SaturationDetector(config)
        self.state: BudgetState | None = None
        self._last = _totals(metrics)
        self._connects = -1
        self._unpublished = True  # on start: clear whatever a dead cloud may have left
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="budget", daemon=True)
        self._redis_down = False

    def start(self) -> None:
        if self.link is not None and self.owns_link:
            self.link.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
            # Leaving cleanly: no say in the budget any more (a crash lets the mark expire).
            with contextlib.suppress(redis.RedisError):
                self.store.mark(False, self.store.now())
        if self.link is not None and self.owns_link:
            self.link.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # one bad look is a line in the log, never the end of the loop
                _LOGGER.exception("budget: this look failed; the next one goes on")

    # -- one look ----------------------------------------------------------------------------

    def sample(self, now: float) -> Sample:
        """What the service did since the last sample."""
        totals = _totals(self.metrics)
        last, self._last = self._last, totals
        started = totals.started - last.started
        served = int(totals.served - last.served)
        rejected = int(totals.rejected - last.rejected)
        queued = int(totals.pending - last.pending)
        return Sample(
            at=now,
            queue_s=(totals.waited_s - last.waited_s) / started if started > 0 else 0.0,
            oldest_s=self.pool.oldest_wait_s(),
            arrived=max(0, served + rejected + queued),
            served=max(0, served),
            rejected=max(0, rejected),
        )

    def tick(self) -> Decision | None:
        """Sample, decide with the other replicas, publish what changed (None: Redis down)."""
        local = self.clock()
        sample = self.sample(local)
        saturated = self.detector.observe(sample)
        self.metrics.saturated.set(int(saturated))
        self.metrics.queue_wait.set(sample.wait_s)
        reason = self.detector.reason()
        try:
            # What replicas share is on Redis's clock; the detector runs on this one's.
            now = self.store.now()
            offset = now - local

            def step(state: BudgetState | None, someone: bool) -> Decision:
                # Judged on what the queue did since the budget last moved, whoever moved it.
                cut = self.detector.cut(None if state is None else state.changed_at - offset)
                return decide(
                    state, saturated=saturated, cut=cut, reason=reason,
                    any_saturated=someone or saturated, now=now, config=self.config,
                )  # fmt: skip

            self.store.mark(saturated, now)
            decision = self.store.apply(step, now)
        except redis.RedisError as exc:
            if not self._redis_down:
                _LOGGER.warning(
                    "budget: Redis unreachable (%s); no budget steps until it is back", exc
                )
            self._redis_down = True
            return None
        self._redis_down = False
        self.state = decision.state
        self.metrics.offload_budget.set(1.0 if self.state is None else self.state.max_offload)
        if decision.change is not Change.NONE:
            self.metrics.budget_changes.labels(decision.change.value).inc()
            if decision.change is not Change.RENEW:
                _LOGGER.info("budget %s: %s", decision.change.value, self._message())
            self._unpublished = True
        connects = self.link.stats.connects if self.link is not None else 0
        if connects != self._connects:
            # A new session: the broker may have lost the retained budget with the last one.
            self._connects, self._unpublished = connects, True
        if self._unpublished:
            self._send()
        return decision

    def _message(self) -> CloudBudget | None:
        return cloud_budget(self.state, ttl_s=self.config.ttl_s)

    def _send(self) -> None:
        if self.publish(budget_payload(self._message())):
            self._unpublished = False
        else:
            self.metrics.budget_publish_failures.inc()


def budget_loop_for(
    context: CloudContext,
    metrics: InferenceMetrics,
    pool: SessionPool,
    link: MqttLink | None = None,
) -> BudgetLoop | None:
    """The loop for a replica (None when the budget is off): it publishes through ``link``
    (the fleet service's, in role ``all``) or, without one, a link of its own with the
    cloud's broker login and TLS (role ``inference`` has no fleet service)."""
    settings = context.settings
    if not settings.inference_budget:
        return None
    owns_link = link is None
    if link is None:
        link = MqttLink(
            context.urls.mqtt_url,
            client_id=f"edgefleet-inference-{uuid.uuid4().hex[:8]}",
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            tls=settings.mqtt_tls,
        )
    publisher = link

    def publish(payload: bytes) -> bool:
        return publisher.publish(topics.CLOUD_BUDGET, payload, qos=1, retain=True)

    interval = settings.inference_budget_interval_s
    config = BackpressureConfig(
        queue_bound_s=settings.inference_budget_queue_ms / 1000,
        hold_s=settings.inference_budget_hold_s,
        relax_s=settings.inference_budget_relax_s,
        ttl_s=settings.inference_budget_ttl_s,
        floor=settings.inference_budget_min,
    )
    store = BudgetStore(
        context.redis,
        # Readable by an operator (GET /v1/inference/budget): host, process, a nonce.
        replica=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
        replica_ttl_s=max(3 * interval, config.hold_s),
    )
    return BudgetLoop(
        metrics=metrics, pool=pool, store=store, publish=publish, config=config,
        interval_s=interval, link=link, owns_link=owns_link,
    )  # fmt: skip
