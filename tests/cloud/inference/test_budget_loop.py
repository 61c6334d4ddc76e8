"""One replica's budget loop on the real (embedded) Redis: replicas whose clocks disagree
still agree on who is saturated, a publication that failed is tried again, a broker that lost
the retained budget gets it again, and a replica that stops leaves no say behind.

No inference service runs: the loop reads an idle service's metrics (nothing queued); a
replica's saturation is what its detector was shown before."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.context import CloudContext
from cloud.embedded.services import EmbeddedServices
from cloud.inference.backpressure import BackpressureConfig, Change, Sample
from cloud.inference.batcher import BatchConfig
from cloud.inference.budget import BudgetLoop
from cloud.inference.budget_store import STATE_KEY, BudgetStore
from cloud.inference.catalog import VersionInfo
from cloud.inference.engine import Engine
from cloud.inference.metrics import InferenceMetrics
from cloud.inference.pool import SessionPool
from shared import topics
from shared.messages import CloudBudget, read_budget
from shared.mqtt_link import MqttLink
from shared.retry import Backoff
from tests.fleet_harness import wait_for

CONFIG = BackpressureConfig(queue_bound_s=0.1, hold_s=2.0, relax_s=5.0, ttl_s=30.0, floor=0.01)


def _no_engine(info: VersionInfo) -> Engine:
    raise AssertionError(f"nothing is served here, yet {info} was opened")


def budget_loop(
    context: CloudContext,
    replica: str,
    *,
    publish: Callable[[bytes], bool] = lambda _payload: True,
    clock: Callable[[], float] = time.time,
    link: MqttLink | None = None,
) -> BudgetLoop:
    metrics = InferenceMetrics()
    pool = SessionPool(
        _no_engine,
        memory_bytes=1 << 20,
        defaults=BatchConfig(max_batch_size=1, max_queue_delay_s=0.0, max_queue=8,
                             queue_timeout_s=1.0),
        metrics=metrics,
    )  # fmt: skip
    store = BudgetStore(context.redis, replica=replica, replica_ttl_s=2.0)
    return BudgetLoop(
        metrics=metrics, pool=pool, store=store, publish=publish, config=CONFIG,
        interval_s=0.1, clock=clock, link=link, owns_link=link is not None,
    )  # fmt: skip


def saturate(loop: BudgetLoop, clock: Callable[[], float] = time.time) -> None:
    """Show ``loop``'s detector a queue 400 ms deep for the last 2.5 s of its clock."""
    now = clock()
    for k in range(6):
        loop.detector.observe(Sample(now - 2.5 + 0.5 * k, 0.4, 0.4, 10, 10, 0))
    assert loop.detector.saturated


def hold(context: CloudContext, share: float, *, changed_s_ago: float) -> None:
    """A budget in Redis, as a replica left it ``changed_s_ago`` (Redis runs on this host)."""
    now = time.time()
    state = {
        "max_offload": share, "reason": "held", "until": now + CONFIG.ttl_s,
        "since": now - changed_s_ago, "changed_at": now - changed_s_ago,
    }  # fmt: skip
    context.redis.set(STATE_KEY, json.dumps(state))


def test_replicas_whose_clocks_disagree_still_agree_on_who_is_saturated(
    context: CloudContext,
) -> None:
    """B's clock is right, A's runs 3 s ahead: more than a saturated mark lives (2 s). B is
    saturated and holds the budget at the floor; A is clear, and must not relax it."""
    hold(context, CONFIG.floor, changed_s_ago=60.0)
    ahead: Callable[[], float] = lambda: time.time() + 3.0  # noqa: E731
    a = budget_loop(context, "a", clock=ahead)
    b = budget_loop(context, "b")
    saturate(b)
    assert b.tick() is not None
    decision = a.tick()
    assert decision is not None
    assert decision.change is Change.NONE, decision
    assert b.store.read() == decision.state


def test_a_budget_with_an_infinite_time_in_redis_does_not_stop_the_loop(
    context: CloudContext,
) -> None:
    """Something wrote ``until: Infinity`` (and a recent change, so nobody relaxes it): no
    device could be told that budget. The loop treats it as none and publishes the empty
    payload (it raised on every look, turning it into a date)."""
    now = time.time()
    state = {"max_offload": 0.5, "reason": "x", "until": float("inf"), "since": now,
             "changed_at": now}  # fmt: skip
    context.redis.set(STATE_KEY, json.dumps(state))
    sent: list[bytes] = []
    loop = budget_loop(context, "a", publish=lambda payload: sent.append(payload) is None)
    decision = loop.tick()
    assert decision is not None
    assert sent == [b""]


def test_a_publication_that_failed_is_tried_again_at_the_next_look(
    context: CloudContext,
) -> None:
    """The link dropped the first publication (paho's queue full): counted, and the budget
    is sent again at the next look, until one goes; then nothing more while it holds."""
    hold(context, 0.25, changed_s_ago=1.0)
    answers = iter([False, False, True])
    sent: list[bytes] = []

    def publish(payload: bytes) -> bool:
        sent.append(payload)
        return next(answers, True)

    loop = budget_loop(context, "a", publish=publish)
    for _ in range(5):
        loop.tick()
    budgets = [read_budget(payload) for payload in sent]
    assert [b.max_offload if b else None for b in budgets] == [0.25] * 3
    failures = "edgefleet_inference_budget_publish_failures_total"
    assert loop.metrics.registry.get_sample_value(failures) == 2


def test_a_published_budget_says_how_long_to_follow_it_and_when_it_was_issued(
    context: CloudContext,
) -> None:
    """A device follows it for ``ttl_s`` from receipt, on its own clock, and knows a
    retained copy delivered again by its ``issued_at``; older agents still read ``until``."""
    hold(context, 0.25, changed_s_ago=1.0)
    sent: list[bytes] = []
    loop = budget_loop(context, "a", publish=lambda payload: sent.append(payload) is None)
    loop.tick()
    (budget,) = [read_budget(payload) for payload in sent]
    assert budget is not None
    assert budget.ttl_s == CONFIG.ttl_s
    assert budget.issued_at is not None
    assert (budget.until - budget.issued_at).total_seconds() == pytest.approx(CONFIG.ttl_s)


def _retained(url: str) -> list[CloudBudget | None]:
    """What a client that subscribes now gets on ``cloud/budget`` within half a second."""
    host, port = url.removeprefix("mqtt://").split(":")
    seen: list[CloudBudget | None] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4().hex[:6]}")
    client.on_message = lambda _c, _u, m: seen.append(read_budget(m.payload))
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe(topics.CLOUD_BUDGET, 1)
    client.connect(host, int(port))
    client.loop_start()
    try:
        assert subscribed.wait(10), "could not subscribe"
        time.sleep(0.5)  # a retained message comes right after the SUBACK
    finally:
        client.loop_stop()
        client.disconnect()
    return seen


def test_a_broker_that_lost_the_retained_budget_gets_it_again(
    context: CloudContext, tmp_path: Path
) -> None:
    """rumqttd keeps retained messages in memory: restarted, it has lost the budget. The
    loop's link reconnects, and the loop publishes the budget Redis holds again, so a
    device that subscribes afterwards still gets it."""
    hold(context, 0.25, changed_s_ago=1.0)
    with EmbeddedServices(
        data_dir=tmp_path / "b", database_url="sqlite://", mqtt_url=None,
        redis_url="redis://unused", broker="rumqttd",
    ) as services:  # fmt: skip
        assert services.urls is not None
        url = services.urls.mqtt_url
        link = MqttLink(url, client_id=f"budget-{uuid.uuid4().hex[:6]}")
        link.backoff = Backoff(base=0.2, cap=1.0)

        def publish(payload: bytes) -> bool:
            return link.publish(topics.CLOUD_BUDGET, payload, qos=1, retain=True)

        loop = budget_loop(context, "a", publish=publish, link=link)
        loop.start()
        try:
            wait_for(lambda: loop.link is not None and loop.link.connected, 10, "connected")
            wait_for(lambda: [b and b.max_offload for b in _retained(url)] == [0.25], 10, "sent")
            broker = services.children["mqtt"]
            argv = broker.argv
            broker.stop()
            wait_for(lambda: not link.connected, 10, "the loop's link notices")
            broker.argv = argv
            broker.start(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))
            wait_for(lambda: link.stats.connects >= 2, 15, "reconnected")
            wait_for(
                lambda: [b and b.max_offload for b in _retained(url)] == [0.25], 10, "sent again"
            )
        finally:
            loop.stop()


def test_a_replica_that_stops_withdraws_its_saturated_mark(context: CloudContext) -> None:
    """Saturated, the replica's mark would keep the budget from relaxing for as long as it
    lives (2 s here); stopped cleanly, it is gone at once."""
    loop = budget_loop(context, "leaving")
    saturate(loop)
    loop.start()
    try:
        wait_for(lambda: loop.store.saturated(loop.store.now()) == ["leaving"], 10, "marked")
    finally:
        loop.stop()
    assert loop.store.saturated(loop.store.now()) == []
