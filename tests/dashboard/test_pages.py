"""Each dashboard page run by Streamlit's AppTest against a running API with a fleet in it:
what the page shows is what the API says; the rollout buttons and form act through the API;
an API that is down, a wrong token or none at all is one clear message, never a traceback."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from cloud.embedded.processes import free_port
from cloud.federated.schemas import RunState
from cloud.federated.store import set_state
from dashboard import ui
from dashboard.client import ApiClient
from dashboard.views import fleet, inference
from tests.conftest import ADMIN_TOKEN
from tests.dashboard.conftest import DEVICES, ROUNDS, FleetApi

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
TIMEOUT = 60


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, fleet_api: FleetApi) -> FleetApi:
    for name in ("EDGEFLEET_ADMIN_TOKEN", "EDGEFLEET_DASHBOARD_REFRESH_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EDGEFLEET_DASHBOARD_API_URL", fleet_api.url)
    monkeypatch.setenv("EDGEFLEET_DASHBOARD_TOKEN", ADMIN_TOKEN)
    return fleet_api


def _page(name: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if name is not None:
        at.switch_page(f"screens/{name}.py").run()
    _clean(at)
    return at


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_fleet_counts_and_table_are_the_apis(env: FleetApi) -> None:
    """The counts at the top are the summary's; the table is the first page of devices; a
    label filter narrows both; a device's detail shows its events and its history."""
    summary: dict[str, Any] = env.get("/v1/fleet/summary")
    at = _page()
    presence = summary["presence"]
    expected = {
        "Devices": str(DEVICES),
        "Online": str(presence["online"]),
        "Offline": str(presence.get("offline", 0) + presence.get("stopped", 0)),
        "Degraded": str(summary["degraded"]),
    }
    assert _metrics(at).items() >= expected.items()
    assert summary["degraded"] > 0
    table = at.dataframe[0].value
    assert len(table) == DEVICES
    assert list(table["id"][:2]) == ["cam-000", "cam-001"]
    at.selectbox(key="fleet_label").set_value("site=lab").run()
    _clean(at)
    lab: dict[str, Any] = env.get("/v1/fleet/summary", label="site=lab")
    assert _metrics(at)["Devices"] == str(lab["devices"]) == str(DEVICES // 2)
    assert set(at.dataframe[0].value["labels"]) <= {"site=lab", "site=lab, tier=canary"}
    at.text_input(key="fleet_device").set_value("cam-011").run()
    _clean(at)
    assert _metrics(at)["Deployment"] == "FAILED"
    events = at.dataframe[1].value
    assert list(events["state"]) == ["FAILED", "DOWNLOADING"]
    assert any("requests" in c.value for c in at.caption)


def test_an_unknown_device_is_a_warning_not_an_error(env: FleetApi) -> None:
    at = _page()
    at.text_input(key="fleet_device").set_value("nobody").run()
    _clean(at)
    assert "nobody" in at.warning[0].value


def _record_gets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Each GET the dashboard's client makes from now on: (path, query)."""
    asked: list[tuple[str, dict[str, Any]]] = []
    original = ApiClient.get

    def get(self: ApiClient, path: str, params: dict[str, Any] | None = None) -> Any:
        asked.append((path, dict(params or {})))
        return original(self, path, params)

    monkeypatch.setattr(ApiClient, "get", get)
    return asked


class _Refreshes:
    """Stands in for ``dashboard.ui.live``: runs the live part once, as the page does, and
    keeps it so that the test can run it again as its fragment's next refresh would (the
    same closure, later; outside the page's run, where Streamlit's calls draw nothing)."""

    def __init__(self) -> None:
        self.parts: list[tuple[ApiClient, Callable[[ApiClient], None]]] = []

    def __call__(self, api: ApiClient, body: Callable[[ApiClient], None]) -> None:
        body(api)
        self.parts.append((api, body))

    def again(self) -> None:
        time.sleep(0.05)
        api, body = self.parts[-1]
        body(api)


def test_the_inference_charts_move_on_with_the_clock(
    env: FleetApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refresh of the live charts asks for the chosen range ending now, not the range of
    the page's first load (whose charts would never show a new minute)."""
    refreshes = _Refreshes()
    monkeypatch.setattr(inference, "live", refreshes)
    asked = _record_gets(monkeypatch)
    _page("inference")
    refreshes.again()
    ranges = [
        (datetime.fromisoformat(q["from"]), datetime.fromisoformat(q["to"]))
        for path, q in asked
        if path == "/v1/history/fleet"
    ]
    assert len(ranges) == 2, asked
    (first_from, first_to), (then_from, then_to) = ranges
    assert then_to > first_to
    assert first_to - first_from == then_to - then_from == timedelta(hours=1)


def test_a_long_range_is_not_summed_again_at_every_refresh(
    env: FleetApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day of a 1,000-device fleet is 1.4 M rows to sum: the Inference page reads it once
    for the refreshes of the next two minutes, and for every browser session; the last hour
    is read at each refresh."""
    monkeypatch.setattr(ui, "_histories", {})
    refreshes = _Refreshes()
    monkeypatch.setattr(inference, "live", refreshes)
    asked = _record_gets(monkeypatch)
    at = _page("inference")
    refreshes.again()
    assert sum(path == "/v1/history/fleet" for path, _ in asked) == 2
    asked.clear()
    for _session in range(2):
        at = _page("inference")
        at.selectbox(key="inference_range").set_value("last 24 hours").run()
        _clean(at)
        refreshes.again()
    spans = [
        datetime.fromisoformat(q["to"]) - datetime.fromisoformat(q["from"])
        for path, q in asked
        if path == "/v1/history/fleet"
    ]
    assert spans.count(timedelta(hours=24)) == 1, spans


def test_the_last_seen_filter_counts_from_each_refresh(
    env: FleetApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filter "last seen within 5 minutes" means five minutes before each refresh of the
    table, not before the filter was chosen (a device that went quiet would stay listed)."""
    refreshes = _Refreshes()
    monkeypatch.setattr(fleet, "live", refreshes)
    at = _page()
    asked = _record_gets(monkeypatch)
    at.selectbox(key="fleet_seen").set_value("within 5 minutes").run()
    _clean(at)
    refreshes.again()
    cutoffs = [
        datetime.fromisoformat(q["seen_after"])
        for path, q in asked
        if path == "/v1/fleet/devices" and "seen_after" in q
    ]
    assert len(cutoffs) == 2, asked
    assert cutoffs[1] > cutoffs[0]


@pytest.mark.parametrize("typed", [".", "..", "cam-001/events", "cam-001?x=1", "cam 001", "%2e"])
def test_a_device_id_that_cannot_be_one_is_a_warning(env: FleetApi, typed: str) -> None:
    """What an operator types goes into a URL path: one that no device can have says so,
    on the Fleet and the Inference page, instead of asking for another URL."""
    at = _page()
    at.text_input(key="fleet_device").set_value(typed).run()
    _clean(at)
    assert "not a device id" in at.warning[0].value, typed
    at = _page("inference")
    at.radio(key="inference_scope").set_value("One device").run()
    at.text_input(key="inference_device").set_value(typed).run()
    _clean(at)
    assert "not a device id" in at.warning[0].value, typed


def test_models_show_versions_lineage_accuracy_and_calibration(env: FleetApi) -> None:
    versions: list[dict[str, Any]] = env.get("/v1/models/digits-edge/versions")  # type: ignore[assignment]
    at = _page("models")
    at.selectbox(key="models_name").set_value("digits-edge").run()
    _clean(at)
    table = at.dataframe[1].value
    assert list(table["version"]) == [v["version"] for v in versions] == [1, 2]
    assert list(table["precision"]) == ["FP32", "INT8"]
    int8 = versions[1]["metrics"]
    assert table["accuracy"][1] == f"{int8['accuracy']:.1%}"
    assert table["parent accuracy"][1] == f"{int8['parent_accuracy']:.1%}"
    assert at.selectbox(key="models_curve_version").value == 2
    assert any("threshold that offloads" in c.value for c in at.caption)


def test_a_double_click_on_start_starts_one_rollout(env: FleetApi) -> None:
    """The second click of a double click reaches Streamlit while the first one's run is
    going on: Streamlit folds it into the next run, which sees the Start button pressed
    again. That run must not start a second rollout. (Before the test that aborts a
    rollout of the model: a model's rollout cannot start while one is aborting.)"""
    before = len(env.get("/v1/rollouts", limit=500))
    at = _page("rollouts")
    at.selectbox(key="rollout_form_model").set_value("digits-edge")
    at.text_input[0].set_value("site=lab")
    at.number_input(key="rollout_form_version").set_value(2)
    click = at.form_submit_button[0].click()._widget_state
    at.run()
    _clean(at)
    assert "started" in at.success[0].value
    replayed = at._tree.get_widget_states()
    kept = [w for w in replayed.widgets if w.id != click.id]
    del replayed.widgets[:]
    replayed.widgets.extend([*kept, click])
    at._run(replayed)
    _clean(at)
    assert len(env.get("/v1/rollouts", limit=500)) == before + 1


def test_rollouts_start_pause_resume_and_abort_through_the_api(env: FleetApi) -> None:
    """Start a rollout with the form (it supersedes the fixture's), then pause, resume and
    abort it with the buttons: each is the API's state right after."""
    at = _page("rollouts")
    at.selectbox(key="rollout_form_model").set_value("digits-edge")
    at.text_input[0].set_value("site=field")
    at.number_input(key="rollout_form_version").set_value(2)
    at.form_submit_button[0].click().run()
    _clean(at)
    started = at.success[0].value
    assert "started" in started, started
    rollout_id = int(started.split()[1])
    assert at.selectbox(key="rollouts_id").value == rollout_id
    assert _metrics(at)["State"] == "IN_PROGRESS"
    for action, expected in (("pause", "PAUSED"), ("resume", "IN_PROGRESS"), ("abort", "ABORTING")):
        at.button(key=f"rollout_{action}").click().run()
        _clean(at)
        assert env.get(f"/v1/rollouts/{rollout_id}")["state"] == expected
        assert _metrics(at)["State"] == expected
    assert at.button(key="rollout_pause").disabled


def test_a_bad_selector_in_the_form_is_an_error_on_the_page(env: FleetApi) -> None:
    at = _page("rollouts")
    at.text_input[0].set_value("site")
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert "not key=value" in at.error[0].value


def test_inference_totals_and_budget(env: FleetApi) -> None:
    """Fleet-wide totals are the history's; the budget line says what the cloud's budget
    route answers (no budget in force on a cloud that keeps up); one device's scope reads its
    own history."""
    history: dict[str, Any] = env.get("/v1/history/fleet")
    budget: dict[str, Any] = env.get("/v1/inference/budget")
    assert budget["budget"] is None
    at = _page("inference")
    metrics = _metrics(at)
    assert metrics["Requests"] == f"{history['totals']['requests']:,}"
    assert metrics["Offload rate"] == f"{history['totals']['offload_rate']:.1%}"
    expected = "none in force" if budget["enabled"] else "turned off"
    assert any(expected in c.value for c in at.caption)
    at.radio(key="inference_scope").set_value("One device").run()
    at.text_input(key="inference_device").set_value("cam-003").run()
    _clean(at)
    own: dict[str, Any] = env.get("/v1/devices/cam-003/history")
    assert _metrics(at)["Requests"] == f"{own['totals']['requests']:,}"


def test_federated_shows_runs_rounds_and_resulting_versions(env: FleetApi) -> None:
    """The list is the API's; the chosen run shows its state, rounds done, the versions it
    made and one row per round with the ServerApp's numbers (no Cancel once it finished)."""
    at = _page("federated")
    listed = at.dataframe[0].value
    row = listed[listed["id"] == env.federated_run_id].iloc[0]
    assert (row["state"], row["rounds"]) == ("COMPLETED", "3/3")
    assert (row["result version"], row["INT8 version"]) == (1, 2)
    at.selectbox(key="federated_run").set_value(env.federated_run_id).run()
    _clean(at)
    assert _metrics(at) == {
        "State": "COMPLETED", "Rounds": "3 of 3", "Result version": "1",
        "On devices (INT8)": "2",
    }  # fmt: skip
    rounds = at.dataframe[1].value
    assert list(rounds["round"]) == [r.round for r in ROUNDS]
    assert list(rounds["train loss"]) == pytest.approx([r.train_loss for r in ROUNDS])
    assert list(rounds["clients"]) == [r.clients for r in ROUNDS]
    assert list(rounds["MB up"]) == pytest.approx([r.bytes_up / 1e6 for r in ROUNDS])
    assert not [b for b in at.button if b.label == "Cancel run"]


def _new_federated_run(env: FleetApi) -> int:
    """A federated run of digits-edge over the lab devices, PENDING (nothing runs it)."""
    with env.client() as client:
        created = client.post(
            "/v1/federated/runs",
            json={"model": "digits-edge", "rounds": 2, "selector": {"site": "lab"}},
        )
    assert created.status_code == 201, created.text
    run_id: int = created.json()["id"]
    return run_id


def test_a_pending_federated_run_is_cancelled_from_the_page(env: FleetApi) -> None:
    run_id = _new_federated_run(env)
    at = _page("federated")
    assert at.selectbox(key="federated_run").value == run_id  # the newest first
    assert _metrics(at)["State"] == "PENDING"
    assert any("No round has finished yet" in i.value for i in at.info)
    at.button(key=f"federated_cancel_{run_id}").click().run()
    _clean(at)
    assert env.get(f"/v1/federated/runs/{run_id}")["state"] == "CANCELLED"
    assert f"Run #{run_id} is CANCELLED." in [s.value for s in at.success]
    assert _metrics(at)["State"] == "CANCELLED"


def test_a_finalizing_federated_run_offers_no_cancel(env: FleetApi) -> None:
    """Its result is being gated and registered: the API refuses a cancel (409), so the page
    offers none (it offered one that always failed)."""
    run_id = _new_federated_run(env)
    with env.context.database.session() as s:
        set_state(s, run_id, expect=(RunState.PENDING,), to=RunState.FINALIZING)
    try:
        at = _page("federated")
        assert at.selectbox(key="federated_run").value == run_id  # the newest first
        assert _metrics(at)["State"] == "FINALIZING"
        assert not [b for b in at.button if b.label == "Cancel run"]
    finally:  # one run of a model at a time: leave none going on for the other tests
        with env.context.database.session() as s:
            set_state(s, run_id, expect=(RunState.FINALIZING,), to=RunState.FAILED)


def test_an_api_that_is_down_is_one_message(env: FleetApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_DASHBOARD_API_URL", f"http://127.0.0.1:{free_port()}")
    for name in (None, "models", "rollouts", "inference", "federated"):
        at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
        if name:
            at.switch_page(f"screens/{name}.py").run()
        assert not at.exception
        assert "API is unavailable" in at.error[0].value, name


def test_a_wrong_or_missing_token_is_one_message(
    env: FleetApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_DASHBOARD_TOKEN", "not-the-admin-token")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "refused the admin token" in at.error[0].value
    monkeypatch.delenv("EDGEFLEET_DASHBOARD_TOKEN")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "EDGEFLEET_DASHBOARD_TOKEN" in at.error[0].value
