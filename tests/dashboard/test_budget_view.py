"""The Inference page's budget line against each answer GET /v1/inference/budget gives. The
route comes with the cloud-budget branch, not this one: a small HTTP server stands in for it,
answering in that route's shape ({enabled, queue_bound_ms, budget, saturated_replicas})."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from streamlit.testing.v1 import AppTest

from tests.conftest import serve_in_thread

ANSWERS: dict[str, dict[str, Any]] = {
    "saturated": {
        "enabled": True, "queue_bound_ms": 100.0, "saturated_replicas": ["inference-1"],
        "budget": {"max_offload": 0.05, "reason": "queue wait 340 ms > 100 ms",
                   "until": "2026-01-01T00:00:30Z", "since": "2026-01-01T00:00:00Z",
                   "changed_at": "2026-01-01T00:00:10Z"},
    },
    "clear": {"enabled": True, "queue_bound_ms": 100.0, "budget": None, "saturated_replicas": []},
    "off": {"enabled": False, "queue_bound_ms": 100.0, "budget": None, "saturated_replicas": []},
}  # fmt: skip


@pytest.fixture(scope="module")
def budget_api() -> Iterator[str]:
    app = FastAPI()

    @app.get("/v1/inference/budget/{case}")
    def budget(case: str) -> dict[str, Any]:
        return ANSWERS[case]

    with serve_in_thread(app) as url:
        yield url


def _render(url: str, case: str) -> None:
    from dashboard.client import ApiClient
    from dashboard.config import DashboardConfig
    from dashboard.views import inference

    api = ApiClient(DashboardConfig(api_url=url, token="t" * 20))
    inference._budget(api, f"/v1/inference/budget/{case}")


@pytest.mark.parametrize(
    ("case", "kind", "text"),
    [
        ("saturated", "warning", "at most 5.0% of their rows (queue wait 340 ms > 100 ms)"),
        ("clear", "caption", "none in force"),
        ("off", "caption", "turned off"),
    ],
)
def test_the_budget_line_says_what_the_cloud_answers(
    budget_api: str, case: str, kind: str, text: str
) -> None:
    at = AppTest.from_function(_render, args=(budget_api, case), default_timeout=30).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(text in element.value for element in getattr(at, kind)), case
    if case == "saturated":
        assert any("inference-1" in c.value for c in at.caption)
