"""The fleet-state API on each registry backend, over devices whose presence, reported state,
status events and telemetry came through the real ingest: the summary's counts, a filtered,
sorted, paginated device list, one device's state, and its events paged by cursor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.registry import repository
from cloud.settings import CloudSettings
from shared.topics import DeviceTopic
from tests.conftest import ADMIN_TOKEN, serve_in_thread
from tests.history_support import feed, status, telemetry

# id: (labels, presence, active models, latest deployment state, degraded answers)
FLEET: dict[str, tuple[dict[str, str], str, dict[str, int], str | None, bool]] = {
    "cam-1": ({"site": "lab", "tier": "canary"}, "online", {"digits-edge": 2}, "ACTIVE", False),
    "cam-2": ({"site": "lab"}, "online", {"digits-edge": 2}, "ACTIVE", True),
    "cam-3": ({"site": "lab"}, "offline", {"digits-edge": 1}, "FAILED", False),
    "cam-4": ({"site": "field"}, "online", {"digits-edge": 1, "other": 3}, "DOWNLOADING", False),
    "cam-5": ({"site": "field"}, "stopped", {}, None, False),
    "gate-1": ({}, "unknown", {}, None, False),
}


def _reports() -> list[tuple[str, DeviceTopic, bytes]]:
    # Dated when the fixture runs, not when the module was imported: "degraded" means in the
    # last minutes, and a long suite reaches this test well after the import.
    now = datetime.now(UTC)
    reports = []
    for device_id, (_labels, presence, active, state, degraded) in FLEET.items():
        if presence != "unknown":
            reports.append((device_id, DeviceTopic.PRESENCE, json.dumps({"state": presence})))
        if active:
            reported = {"rev_applied": 1, "active": active, "agent_version": "t"}
            reports.append((device_id, DeviceTopic.REPORTED, json.dumps(reported)))
            reports.append(
                (device_id, DeviceTopic.TELEMETRY,
                 telemetry(now, edge=5, rows=5, degraded=int(degraded),
                           degraded_rows=int(degraded), active=active))
            )  # fmt: skip
        if state is not None:
            # Earlier states first: the latest one is what counts.
            reports.append((device_id, DeviceTopic.STATUS, status(now, "QUEUED")))
            reports.append((device_id, DeviceTopic.STATUS, status(now, state)))
    return [(d, k, p.encode() if isinstance(p, str) else p) for d, k, p in reports]


@pytest.fixture
def context(tmp_path: Path, database_url: str, embedded: ServiceUrls) -> Iterator[CloudContext]:
    settings = CloudSettings(
        data_dir=tmp_path / "cloud", admin_token=ADMIN_TOKEN, database_url=database_url
    )
    ctx = CloudContext.open(
        settings, ServiceUrls(database_url, "mqtt://127.0.0.1:9", embedded.redis_url)
    )
    ctx.redis.flushdb()
    with ctx.database.session() as s:
        for device_id, (labels, *_rest) in FLEET.items():
            repository.enroll_device(s, device_id=device_id, labels=labels)
    feed(ctx, _reports())
    yield ctx
    ctx.close()


@pytest.fixture
def client(context: CloudContext) -> Iterator[httpx.Client]:
    with (
        serve_in_thread(create_app(context)) as url,
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        ) as client,
    ):
        yield client


def _ok(answer: httpx.Response) -> dict[str, object]:
    assert answer.status_code == 200, answer.text
    body: dict[str, object] = answer.json()
    return body


def test_the_summary_counts_the_fleet_by_presence_state_version_and_label(
    client: httpx.Client,
) -> None:
    body = _ok(client.get("/v1/fleet/summary"))
    assert body["devices"] == 6
    assert body["presence"] == {"online": 3, "offline": 1, "stopped": 1, "unknown": 1}
    assert body["deployment"] == {"ACTIVE": 2, "FAILED": 1, "DOWNLOADING": 1, "none": 2}
    assert body["versions"] == {"digits-edge:1": 2, "digits-edge:2": 2, "other:3": 1}
    assert body["labels"] == {"site": {"field": 2, "lab": 3}, "tier": {"canary": 1}}
    assert body["degraded"] == 1
    lab = _ok(client.get("/v1/fleet/summary", params={"label": "site=lab"}))
    assert (lab["devices"], lab["presence"]) == (3, {"online": 2, "offline": 1})
    assert lab["deployment"] == {"ACTIVE": 2, "FAILED": 1}


def test_a_reported_state_of_another_shape_counts_for_nothing(
    context: CloudContext, client: httpx.Client
) -> None:
    """A row whose reported models are not an object (written by hand, or by an older cloud)
    does not make the summary fail: PostgreSQL's json_each_text would refuse it."""
    with context.database.session() as s:
        device = repository.get_device(s, device_id="gate-1")
        device.reported = {"active": 5}
    body = _ok(client.get("/v1/fleet/summary"))
    assert body["versions"] == {"digits-edge:1": 2, "digits-edge:2": 2, "other:3": 1}


def _ids(client: httpx.Client, **params: object) -> list[str]:
    body = _ok(client.get("/v1/fleet/devices", params=params))
    return [item["id"] for item in body["items"]]  # type: ignore[attr-defined]


def test_the_device_list_filters_sorts_and_pages(client: httpx.Client) -> None:
    assert _ids(client) == ["cam-1", "cam-2", "cam-3", "cam-4", "cam-5", "gate-1"]
    assert _ids(client, label="site=lab", presence="online") == ["cam-1", "cam-2"]
    assert _ids(client, presence=["offline", "stopped"]) == ["cam-3", "cam-5"]
    assert _ids(client, model="digits-edge", version=1) == ["cam-3", "cam-4"]
    assert _ids(client, model="other") == ["cam-4"]
    assert _ids(client, q="gate") == ["gate-1"]
    assert _ids(client, never_seen=True) == ["gate-1"]
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert _ids(client, seen_after=later) == []
    assert len(_ids(client, seen_before=later)) == 5
    assert _ids(client, sort="-id")[:2] == ["gate-1", "cam-5"]
    assert _ids(client, sort="-last_seen")[-1] == "gate-1"  # never seen: last
    page = _ok(client.get("/v1/fleet/devices", params={"limit": 2, "offset": 4}))
    assert page["total"] == 6
    assert [i["id"] for i in page["items"]] == ["cam-5", "gate-1"]  # type: ignore[attr-defined]


def test_a_device_shows_its_models_latest_event_and_degradation(client: httpx.Client) -> None:
    two = _ok(client.get("/v1/fleet/devices/cam-2"))
    assert (two["presence"], two["active"], two["degraded"]) == (
        "online", {"digits-edge": 2}, True,
    )  # fmt: skip
    assert two["deployment"]["state"] == "ACTIVE"  # type: ignore[index]
    assert _ok(client.get("/v1/fleet/devices/gate-1"))["deployment"] is None
    missing = client.get("/v1/fleet/devices/nobody")
    assert missing.status_code == 404
    assert "nobody" in missing.json()["error"]


def test_events_page_by_cursor_and_the_plain_call_still_works(
    context: CloudContext, client: httpx.Client
) -> None:
    """250 events: pages of 100 by cursor give each once, newest first, and the last page has
    no cursor; the call without one still answers the newest 100 as a plain list."""
    feed(
        context,
        [
            ("cam-1", DeviceTopic.STATUS, status(datetime.now(UTC), "DOWNLOADING", rev=10 + i))
            for i in range(250)
        ],
    )
    revs: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, object] = {"limit": 100} | ({"cursor": cursor} if cursor else {})
        answer = client.get("/v1/devices/cam-1/events", params=params)
        assert answer.status_code == 200, answer.text
        revs += [e["rev"] for e in answer.json()]
        pages += 1
        cursor = answer.headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert pages == 3
    assert revs[:250] == list(range(259, 9, -1))
    assert len(revs) == 252  # and the two events of the fixture, oldest last
    plain = client.get("/v1/devices/cam-1/events")
    assert [e["rev"] for e in plain.json()] == list(range(259, 159, -1))


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/fleet/devices", {"version": 2}),
        ("/v1/fleet/devices", {"sort": "labels"}),
        ("/v1/fleet/devices", {"presence": "asleep"}),
        ("/v1/fleet/devices", {"limit": 0}),
        ("/v1/fleet/summary", {"label": "site"}),
        ("/v1/devices/cam-1/events", {"cursor": "abc"}),
    ],
)
def test_bad_filters_are_refused_with_a_reason(
    client: httpx.Client, path: str, params: dict[str, object]
) -> None:
    answer = client.get(path, params=params)
    assert answer.status_code in (400, 422), answer.text
    assert answer.json()["error"]
