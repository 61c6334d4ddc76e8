"""How the dashboard reads a history range: the last hour at every refresh; a longer range
again only once its buckets may have moved, and a read that timed out not again at once."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from dashboard import ui
from dashboard.client import ApiClient, ApiUnreachable
from dashboard.config import DashboardConfig


class _SlowCloud(ApiClient):
    """Answers every history read with the client's timeout, and counts the reads."""

    def __init__(self) -> None:
        super().__init__(DashboardConfig(api_url="http://127.0.0.1:9", token="t" * 20))
        self.reads: list[dict[str, Any]] = []

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        self.reads.append(dict(params or {}))
        raise ApiUnreachable(f"the EdgeFleet API did not answer GET {path} within 10 s")


@pytest.fixture(autouse=True)
def _no_reads_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui, "_histories", {})


def test_a_long_range_that_timed_out_is_not_asked_again_at_the_next_refresh() -> None:
    """A week of a large fleet that took longer than the timeout: the next refreshes say the
    same error without asking (the cloud is still summing the first one) and a later one
    asks again."""
    cloud = _SlowCloud()
    week = timedelta(days=7)
    for _refresh in range(3):
        with pytest.raises(ApiUnreachable, match="did not answer"):
            ui.history(cloud, "/v1/history/fleet", {}, week)
    assert len(cloud.reads) == 1
    (key,) = ui._histories
    until, error = ui._histories[key]
    ui._histories[key] = (until - ui._RETRY_SLOW_S, error)  # a minute later
    with pytest.raises(ApiUnreachable):
        ui.history(cloud, "/v1/history/fleet", {}, week)
    assert len(cloud.reads) == 2


def test_the_last_hour_is_asked_at_every_refresh_ending_now() -> None:
    cloud = _SlowCloud()
    for _refresh in range(2):
        with pytest.raises(ApiUnreachable):
            ui.history(cloud, "/v1/devices/cam-1/history", {}, timedelta(hours=1))
    assert len(cloud.reads) == 2
    ends = [datetime.fromisoformat(r["to"]) for r in cloud.reads]
    assert ends[1] >= ends[0]
    assert all(
        datetime.fromisoformat(r["to"]) - datetime.fromisoformat(r["from"]) == timedelta(hours=1)
        for r in cloud.reads
    )
