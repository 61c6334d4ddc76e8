"""Telemetry history on each registry backend: windows that came through the real ingest are
summed per device per minute, and read back over REST per time bucket, fleet-wide (by label,
by model) and per device, with rates and latency percentiles derived from the sums."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.history.buckets import BOUNDS_MS, percentile
from cloud.registry import repository
from cloud.settings import CloudSettings
from shared.topics import DeviceTopic
from tests.conftest import ADMIN_TOKEN, serve_in_thread
from tests.history_support import feed, telemetry

# Three minutes, aligned, well inside the retention.
T0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)


def _at(minute: int, second: int = 30) -> datetime:
    return T0 + timedelta(minutes=minute, seconds=second)


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
        repository.enroll_device(s, device_id="cam-a1", labels={"site": "a"})
        repository.enroll_device(s, device_id="cam-a2", labels={"site": "a", "tier": "canary"})
        repository.enroll_device(s, device_id="cam-b1", labels={"site": "b"})
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


def _window(
    device: str, minute: int, second: int = 30, **counts: object
) -> tuple[str, DeviceTopic, bytes]:
    at = _at(minute, second)
    return device, DeviceTopic.TELEMETRY, telemetry(at, **counts)  # type: ignore[arg-type]


def _range(step: int = 60, **params: object) -> dict[str, object]:
    return {"from": T0.isoformat(), "to": _at(3, 0).isoformat(), "step": step, **params}


def test_windows_are_summed_per_minute_and_read_back_per_bucket(
    context: CloudContext, client: httpx.Client
) -> None:
    """Five windows of three devices over two minutes (two of cam-a1 in the same minute):
    each bucket holds the sums, the rates follow from them, the percentiles come from the
    merged histogram, and a 2-minute step adds the two buckets up."""
    v1, v2 = {"digits-edge": 1}, {"digits-edge": 2}
    feed(
        context,
        [
            _window("cam-a1", 0, edge=8, cloud=2, rows=10, hard=3, cloud_rows=2,
                    latency={3: 10}, active=v1),
            _window("cam-a1", 0, edge=5, errors=1, rows=5, hard=1, latency={4: 5}, active=v1),
            _window("cam-a2", 0, edge=4, degraded=1, rows=4, hard=2, degraded_rows=2,
                    latency={6: 4}, active=v2),
            _window("cam-b1", 1, edge=10, rows=20, hard=0, latency={2: 10}, active=v2),
            _window("cam-a2", 1, edge=1, rows=1, latency={11: 1}, active=v2),
        ],
    )  # fmt: skip
    answer = client.get("/v1/history/fleet", params=_range())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    first, second = body["points"]
    assert datetime.fromisoformat(first["t"]) == T0
    assert (first["device_minutes"], first["windows"], first["requests"]) == (2, 3, 20)
    assert (first["rows_total"], first["rows_hard"], first["rows_cloud"]) == (19, 6, 2)
    assert (first["errors"], first["degraded"], first["rows_degraded"]) == (1, 1, 2)
    assert first["offload_rate"] == pytest.approx(6 / 19, abs=1e-6)
    assert first["degraded_rate"] == pytest.approx(2 / 19, abs=1e-6)
    assert first["error_rate"] == pytest.approx(1 / 20, abs=1e-6)
    merged = [0] * len(first["latency_counts"])
    merged[3], merged[4], merged[6] = 10, 5, 4
    assert first["latency_counts"] == merged
    assert first["p50_ms"] == pytest.approx(percentile(merged, 0.5), abs=1e-3)
    assert 2.0 < first["p50_ms"] <= 5.0  # the 10th of 19 answers lies in (2, 5] ms
    assert 20.0 < first["p99_ms"] <= 50.0
    assert (second["device_minutes"], second["requests"], second["offload_rate"]) == (2, 11, 0.0)
    assert body["totals"]["devices"] == 3
    assert body["totals"]["requests"] == 31
    assert body["latency_bounds_ms"] == list(BOUNDS_MS)
    versions = {(v["t"][:16], v["version"]): v["device_minutes"] for v in body["versions"]}
    minute0, minute1 = first["t"][:16], second["t"][:16]
    assert versions == {
        (minute0, "digits-edge:1"): 1, (minute0, "digits-edge:2"): 1,
        (minute1, "digits-edge:2"): 2,
    }  # fmt: skip

    merged_step = client.get("/v1/history/fleet", params=_range(step=120)).json()
    # Buckets are aligned on the epoch: both minutes share one when the first is even.
    even = int(T0.timestamp() // 60) % 2 == 0
    assert [p["requests"] for p in merged_step["points"]] == ([31] if even else [20, 11])


def test_filters_by_label_model_and_device(context: CloudContext, client: httpx.Client) -> None:
    """site=a keeps cam-a1 and cam-a2; a model keeps the devices that ran it (any version,
    or the one named); a device's own history is its rows alone; its unknown is a 404."""
    feed(
        context,
        [
            _window("cam-a1", 0, edge=1, rows=1, active={"digits-edge": 1}),
            _window("cam-a2", 0, edge=2, rows=2, active={"digits-edge": 2, "other_m": 1}),
            _window("cam-b1", 0, edge=4, rows=4, active={"digits-edge": 2}),
        ],
    )

    def requests(path: str = "/v1/history/fleet", **params: object) -> int:
        answer = client.get(path, params=_range(**params))
        assert answer.status_code == 200, answer.text
        return int(answer.json()["totals"]["requests"])

    assert requests() == 7
    assert requests(label="site=a") == 3
    assert requests(label="site:a") == 3
    assert requests(label=["site=a", "tier=canary"]) == 2
    assert requests(model="digits-edge") == 7
    assert requests(model="digits-edge:2") == 6
    assert requests(model="other_m") == 2
    assert requests(model="other") == 0  # a name is not a prefix of another
    assert requests(label="site=b", model="digits-edge:1") == 0
    assert requests("/v1/devices/cam-b1/history") == 4
    missing = client.get("/v1/devices/nobody/history")
    assert missing.status_code == 404
    assert "nobody" in missing.json()["error"]


def test_each_window_counts_once_however_many_replicas_ingest_it(
    context: CloudContext, client: httpx.Client
) -> None:
    """Two fleet replicas on one broker without a shared subscription each receive every
    report: both ingest all the windows (each with its own history writer; one Redis, one
    database), and the history counts each window once. With a shared subscription the
    broker splits the windows between them: the shares add up, nothing counted twice."""
    windows = [
        _window("cam-a1", 0, edge=8, rows=10, hard=3),
        _window("cam-a2", 0, edge=4, rows=4, hard=1),
        _window("cam-a1", 1, edge=2, rows=2),
    ]
    first = feed(context, windows)
    second = feed(context, windows)
    assert first.written_rows == 3
    totals = client.get("/v1/history/fleet", params=_range()).json()["totals"]
    assert (totals["windows"], totals["requests"], totals["rows_hard"]) == (3, 14, 4)

    split = [
        _window("cam-b1", 0, edge=5, rows=5),
        _window("cam-b1", 0, second=40, edge=7, rows=7),
        _window("cam-b1", 1, edge=1, rows=1),
    ]
    feed(context, split[:2], writer=first)
    feed(context, split[2:], writer=second)
    own = client.get("/v1/devices/cam-b1/history", params=_range()).json()["totals"]
    assert (own["windows"], own["requests"]) == (3, 13)


def test_windows_still_count_while_redis_is_away(
    context: CloudContext, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Redis the ingest cannot ask which windows a replica already summed: it sums
    them all (a window two replicas ingest then counts twice; none is lost)."""

    def away(*_args: object, **_kwargs: object) -> None:
        raise redis.ConnectionError("redis is down")

    monkeypatch.setattr(context.redis, "register_script", lambda _script: away)
    feed(context, [_window("cam-a1", 0, edge=3, rows=3), _window("cam-a2", 1, edge=2, rows=2)])
    totals = client.get("/v1/history/fleet", params=_range()).json()["totals"]
    assert (totals["windows"], totals["requests"]) == (2, 5)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"step": 90}, "multiple of 60"),
        ({"step": 60, "from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "before"),
        ({"step": 60, "from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "points"),
        ({"label": "no-separator"}, "key=value"),
        ({"model": "bad model"}, "model"),
        ({"model": "m:0"}, "model"),
        ({"to": "0001-01-01T00:30:00Z"}, "instants"),
    ],
)
def test_bad_ranges_and_filters_are_refused_clearly(
    client: httpx.Client, params: dict[str, object], fragment: str
) -> None:
    """Each is a 400 that says what is wrong."""
    answer = client.get("/v1/history/fleet", params=params)
    assert answer.status_code == 400, answer.text
    assert fragment in answer.json()["error"]


def test_history_needs_the_admin_token(client: httpx.Client) -> None:
    """No token, or a wrong one: 401 with a JSON error."""
    for token in (None, "wrong-token-0123456789"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = httpx.get(client.base_url.join("/v1/history/fleet"), headers=headers, timeout=10)
        assert answer.status_code == 401
        assert "error" in answer.json()
