"""GET /v1/inference/budget: the budget the inference replicas share, for the admin (the
dashboard); read from Redis, whichever replica wrote it."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime

import httpx

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.inference.backpressure import BudgetState
from cloud.inference.budget_store import STATE_KEY, BudgetStore
from cloud.settings import CloudSettings
from tests.conftest import ADMIN_TOKEN, RunningApi, serve_in_thread


def _write(context: CloudContext, state: BudgetState) -> None:
    """As a replica writes it (cloud.inference.budget_store)."""
    context.redis.set(STATE_KEY, json.dumps(dataclasses.asdict(state)))


def test_no_budget_then_the_one_a_replica_wrote_with_who_is_saturated(api: RunningApi) -> None:
    with api.client() as c:
        quiet = c.get("/v1/inference/budget")
    assert quiet.status_code == 200, quiet.text
    assert quiet.json() == {
        "enabled": True,
        "queue_bound_ms": 100.0,
        "budget": None,
        "saturated_replicas": [],
    }
    now = time.time()
    store = BudgetStore(api.context.redis, replica="host:12:abc", replica_ttl_s=30)
    store.mark(True, now)
    _write(api.context, BudgetState(0.25, "queue 400 ms", now + 30, now - 10, now - 2))
    with api.client() as c:
        shown = c.get("/v1/inference/budget").json()
    assert shown["saturated_replicas"] == ["host:12:abc"]
    budget = shown["budget"]
    assert (budget["max_offload"], budget["reason"]) == (0.25, "queue 400 ms")
    assert abs(datetime.fromisoformat(budget["until"]).timestamp() - (now + 30)) < 1e-3
    assert store.read() == BudgetState(0.25, "queue 400 ms", now + 30, now - 10, now - 2)


def test_an_expired_budget_is_shown_as_none(api: RunningApi) -> None:
    """Every replica died with a budget in Redis: devices stopped following it at ``until``."""
    now = time.time()
    _write(api.context, BudgetState(0.25, "r", now - 1, now - 60, now - 40))
    with api.client() as c:
        assert c.get("/v1/inference/budget").json()["budget"] is None


def test_a_budget_with_times_no_clock_can_show_is_shown_as_none(api: RunningApi) -> None:
    """Something wrote a budget whose time is not finite or past year 9999: unreadable, as
    if none (it was a 422 from a conversion error)."""
    for until in (float("inf"), float("nan"), 1e300):
        # json writes Infinity and NaN (and reads them back).
        state = {"max_offload": 0.5, "reason": "x", "until": until, "since": 0, "changed_at": 0}
        api.context.redis.set(STATE_KEY, json.dumps(state))
        with api.client() as c:
            shown = c.get("/v1/inference/budget")
        assert shown.status_code == 200, (until, shown.text)
        assert shown.json()["budget"] is None


def test_only_the_admin_reads_it(api: RunningApi) -> None:
    with api.client(None) as anonymous:
        refused = anonymous.get("/v1/inference/budget")
    assert refused.status_code == 401
    assert "bearer" in refused.json()["error"]
    with api.client("efd_not-a-real-token-123") as stranger:
        assert stranger.get("/v1/inference/budget").status_code == 401


def test_redis_down_is_a_clear_503(settings: CloudSettings, embedded: ServiceUrls) -> None:
    urls = ServiceUrls(settings.resolved_database_url, embedded.mqtt_url, "redis://127.0.0.1:1")
    context = CloudContext.open(settings, urls)
    try:
        with serve_in_thread(create_app(context)) as url:
            answer = httpx.get(
                f"{url}/v1/inference/budget",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=30,
            )
    finally:
        context.close()
    assert answer.status_code == 503
    assert "Redis" in answer.json()["error"]
