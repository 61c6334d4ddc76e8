"""Rollouts over REST: a newer rollout refused while the model's last one is aborting, and
the list read in a fixed number of queries however many rollouts it shows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from cloud.registry.tables import Rollout
from tests.cloud.fleet.desired_support import add_models
from tests.cloud.rollout.support import devices, set_state
from tests.conftest import RunningApi


def _create(api: RunningApi, model: str, version: int) -> Any:
    with api.client() as c:
        return c.post(
            "/v1/rollouts",
            json={"model": model, "version": version, "selector": {"site": "x"},
                  "strategy": {"canary": 1}},
        )  # fmt: skip


def test_a_rollout_is_refused_while_the_models_last_one_is_aborting(api: RunningApi) -> None:
    """409 with the reason, and no rollout created; once the abort is over it is accepted."""
    add_models(api.context, ("alpha",), versions=3)
    devices(api.context, 2)
    first = _create(api, "alpha", 2)
    assert first.status_code == 201, first.text
    set_state(api.context, first.json()["id"], "ABORTING")
    refused = _create(api, "alpha", 3)
    assert refused.status_code == 409
    assert "is ABORTING" in refused.json()["error"]
    with api.client() as c:
        assert [r["id"] for r in c.get("/v1/rollouts").json()] == [first.json()["id"]]
    set_state(api.context, first.json()["id"], "ABORTED")
    assert _create(api, "alpha", 3).status_code == 201


def test_the_rollout_list_takes_the_same_queries_for_one_rollout_or_six(api: RunningApi) -> None:
    add_models(api.context, ("alpha", "beta", "gamma"), versions=2)
    devices(api.context, 1)
    statements: list[str] = []

    def record(_conn: Any, _c: Any, statement: str, *_a: Any) -> None:
        statements.append(statement)

    def listed() -> tuple[int, list[dict[str, Any]]]:
        statements.clear()
        event.listen(api.context.database.engine, "before_cursor_execute", record)
        try:
            with api.client() as c:
                response = c.get("/v1/rollouts")
        finally:
            event.remove(api.context.database.engine, "before_cursor_execute", record)
        assert response.status_code == 200, response.text
        return len(statements), response.json()

    assert _create(api, "alpha", 1).status_code == 201
    one, page = listed()
    assert [(r["model"], r["version"]) for r in page] == [("alpha", 1)]
    for model in ("alpha", "beta", "gamma"):
        for version in (1, 2):
            if (model, version) != ("alpha", 1):
                assert _create(api, model, version).status_code == 201
    six, page = listed()
    assert len(page) == 6
    assert {(r["model"], r["version"]) for r in page} == {
        (m, v) for m in ("alpha", "beta", "gamma") for v in (1, 2)
    }
    assert six == one, statements


def test_a_rollout_whose_stored_strategy_no_longer_validates_is_still_shown(
    api: RunningApi,
) -> None:
    """A strategy stored by an older release (a field since removed): the rollout is listed
    and shown (200) with what of its strategy is still understood, never a 500."""
    add_models(api.context, ("alpha",), versions=2)
    devices(api.context, 1)
    created = _create(api, "alpha", 2).json()
    with api.context.database.session() as s:
        row = s.get(Rollout, created["id"])
        assert row is not None
        row.strategy = {**row.strategy, "canary": 3, "old_field": 1}
    with api.client() as c:
        listed = c.get("/v1/rollouts")
        shown = c.get(f"/v1/rollouts/{created['id']}")
    assert listed.status_code == 200, listed.text
    assert shown.status_code == 200, shown.text
    assert shown.json()["strategy"]["canary"] == 3
