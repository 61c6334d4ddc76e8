"""Federated runs in the cloud without a SuperLink: REST (start, refusals, list, detail,
cancel), the coordinator following what a ServerApp left in the run's directory, and
finalizing a result (gate, lineage, INT8 child, canary) or refusing it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.federated.coordinator import Coordinator, run_files
from cloud.federated.drift import mixed_drift
from cloud.federated.finalize import finalize_run
from cloud.federated.head import find_head
from cloud.federated.plan import Outcome, RoundReport
from cloud.federated.schemas import RunState
from cloud.federated.settings import FederatedSettings
from cloud.federated.store import set_state
from cloud.pipeline.calibrate import SECOND_OPINION, RoutingTarget, calibrate
from cloud.pipeline.evaluate import run_model
from cloud.pipeline.reference.build import register_reference
from cloud.pipeline.reference.digits import digits_splits
from cloud.registry import repository
from cloud.registry.tables import FederatedRun, ModelVersion, Rollout
from cloud.settings import CloudSettings
from edge_agent.federated.head import TrainConfig, train_head
from shared.messages import RoutingSpec
from tests.conftest import ADMIN_TOKEN, RunningApi, seed_reference_cache, serve_in_thread

MODEL = "digits-edge"


@pytest.fixture(scope="module")
def template(
    tmp_path_factory: pytest.TempPathFactory,
    embedded: ServiceUrls,
    reference_onnx: dict[str, bytes],
) -> Path:
    """A data dir where digits-edge:1 (FP32) and its INT8 child :2 are registered, with three
    devices labelled site=lab: built once (the pipeline takes a while), copied per test."""
    folder = tmp_path_factory.mktemp("federated-template")
    settings = CloudSettings(data_dir=folder, admin_token=ADMIN_TOKEN)
    seed_reference_cache(settings, reference_onnx)
    urls = ServiceUrls(settings.resolved_database_url, embedded.mqtt_url, embedded.redis_url)
    context = CloudContext.open(settings, urls)
    try:
        register_reference(context, names=[MODEL], actor="test")
        with context.database.session() as s:
            for i in range(3):
                repository.enroll_device(s, device_id=f"cam-{i}", labels={"site": "lab"})
    finally:
        context.close()
    return folder


@pytest.fixture
def registered(
    settings: CloudSettings, embedded: ServiceUrls, template: Path
) -> Iterator[CloudContext]:
    shutil.copytree(template, settings.data_dir)
    urls = ServiceUrls(settings.resolved_database_url, embedded.mqtt_url, embedded.redis_url)
    context = CloudContext.open(settings, urls)
    context.redis.flushdb()
    yield context
    context.close()


@pytest.fixture
def api_with_coordinator(registered: CloudContext) -> Iterator[tuple[RunningApi, Coordinator]]:
    """The API with a coordinator that is not started: the tests drive it by hand."""
    app = create_app(registered)
    coordinator = Coordinator(registered, FederatedSettings())
    app.state.federated = coordinator
    with serve_in_thread(app) as url:
        yield RunningApi(url, registered), coordinator


def _start(api: RunningApi, **body: Any) -> Any:
    with api.client() as c:
        return c.post("/v1/federated/runs", json={"model": MODEL, **body})


def test_a_run_is_created_with_its_devices_and_backbone(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    """POST resolves the selector to devices, the base to the latest FP32 version, and the
    versions whose embedding the head reads (the base and its INT8 child)."""
    api, _ = api_with_coordinator
    r = _start(api, selector={"site": "lab"}, rounds=2, min_clients=2)
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["state"] == "PENDING"
    assert run["base_version"] == 1
    assert run["config"]["devices"] == ["cam-0", "cam-1", "cam-2"]
    assert run["config"]["versions"] == [1, 2]
    assert run["config"]["head"]["weight_name"] == "head.weight"
    with api.client() as c:
        listed = c.get("/v1/federated/runs", params={"model": MODEL}).json()
        assert [x["id"] for x in listed] == [run["id"]]
        assert c.get(f"/v1/federated/runs/{run['id']}").json()["round_metrics"] == []
    # One run of a model at a time.
    again = _start(api)
    assert again.status_code == 409
    assert "still going on" in again.json()["error"]


REFUSALS: list[tuple[dict[str, Any], int, str]] = [
    ({"model": "nope"}, 404, "unknown model"),
    ({"base_version": 2}, 400, "is int8"),
    ({"base_version": 9}, 404, "no version"),
    ({"selector": {"site": "moon"}}, 400, "0 enrolled devices"),
    ({"min_clients": 4}, 400, "min_clients=4"),
    ({"gate": {"eval_dataset": "builtin:nothing"}}, 404, "unknown built-in"),
    ({"rounds": 0}, 422, "rounds"),
    ({"strategy": "fedsgd"}, 422, "strategy"),
    ({"surprise": 1}, 422, "surprise"),
]


def test_a_run_that_could_not_work_is_refused_and_nothing_is_stored(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    api, _ = api_with_coordinator
    for body, status, message in REFUSALS:
        r = _start(api, **body)
        assert r.status_code == status, (body, r.text)
        assert message in r.text, (body, r.text)
    with api.context.database.session() as s:
        assert s.scalars(select(FederatedRun)).all() == []


def test_cancel_stops_a_pending_run_once(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    api, _ = api_with_coordinator
    run_id = _start(api).json()["id"]
    with api.client() as c:
        cancelled = c.post(f"/v1/federated/runs/{run_id}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "CANCELLED"
        assert cancelled.json()["finished_at"] is not None
        again = c.post(f"/v1/federated/runs/{run_id}/cancel")
        assert again.status_code == 409
        assert "CANCELLED" in again.json()["error"]
        assert c.post("/v1/federated/runs/999/cancel").status_code == 404


def test_a_run_says_whether_a_cancel_would_stop_it(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    """Pending or running: yes. Finalizing (its result being gated and registered): no, and
    a cancel is a 409, so the dashboard offers none."""
    api, _ = api_with_coordinator
    run_id = _start(api).json()["id"]
    with api.client() as c:
        assert c.get(f"/v1/federated/runs/{run_id}").json()["cancellable"] is True
        with api.context.database.session() as s:
            set_state(s, run_id, expect=(RunState.PENDING,), to=RunState.FINALIZING)

        finalizing = c.get(f"/v1/federated/runs/{run_id}").json()
        listed = c.get("/v1/federated/runs").json()
        refused = c.post(f"/v1/federated/runs/{run_id}/cancel")

    assert (finalizing["state"], finalizing["cancellable"]) == ("FINALIZING", False)
    assert [run["cancellable"] for run in listed if run["id"] == run_id] == [False]
    assert refused.status_code == 409


def _completed(api: RunningApi, coordinator: Coordinator, run_id: int) -> dict[str, Any]:
    """The run's one round ends COMPLETED with an adapted head; the coordinator finalizes it
    (gate, register, roll out): the run as the API then says it, COMPLETED."""
    files = run_files(api.context, run_id)
    files.append_round(_report(1))
    files.write_head("result", _adapted_head(api.context))
    files.write_outcome(Outcome(state="COMPLETED", rounds=1))
    coordinator.tick()
    with api.client() as c:
        done: dict[str, Any] = c.get(f"/v1/federated/runs/{run_id}").json()
    assert done["state"] == "COMPLETED", done["reason"]
    return done


def _running(context: CloudContext, coordinator: Coordinator, **body: Any) -> int:
    """A run as if submitted: RUNNING, without a Flower run id (no SuperLink to ask)."""
    app = create_app(context)
    app.state.federated = coordinator
    with serve_in_thread(app) as url:
        run = _start(RunningApi(url, context), **body).json()
    with context.database.session() as s:
        set_state(s, run["id"], expect=(RunState.PENDING,), to=RunState.RUNNING,
                  submitted_at=datetime.now(UTC))  # fmt: skip
    run_files(context, run["id"]).root.mkdir(parents=True)
    return int(run["id"])


def _report(n: int, clients: int = 3) -> RoundReport:
    return RoundReport(
        round=n, clients=clients, dropped=0, refused=0, examples=120, train_loss=0.5,
        wall_s=1.0, bytes_down=100, bytes_up=100,
    )  # fmt: skip


def test_the_coordinator_copies_rounds_and_ends_a_run_with_too_few_clients(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    api, coordinator = api_with_coordinator
    run_id = _running(api.context, coordinator)
    files = run_files(api.context, run_id)
    files.append_round(_report(1))
    coordinator.tick()
    with api.client() as c:
        shown = c.get(f"/v1/federated/runs/{run_id}").json()
    assert shown["state"] == "RUNNING"
    assert [r["round"] for r in shown["round_metrics"]] == [1]
    files.write_outcome(Outcome(state="TOO_FEW_CLIENTS", reason="1 of the 2 needed", rounds=1))
    coordinator.tick()
    with api.client() as c:
        ended = c.get(f"/v1/federated/runs/{run_id}").json()
    assert ended["state"] == "TOO_FEW_CLIENTS"
    assert ended["reason"] == "1 of the 2 needed"
    assert ended["rounds_done"] == 1


def test_a_run_past_its_deadline_fails_clearly(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    api, coordinator = api_with_coordinator
    run_id = _running(api.context, coordinator, wait_for_clients_s=1, round_timeout_s=1)
    with api.context.database.session() as s:
        run = s.get(FederatedRun, run_id)
        assert run is not None
        run.submitted_at = datetime.now(UTC) - timedelta(hours=1)
    coordinator.tick()
    with api.client() as c:
        ended = c.get(f"/v1/federated/runs/{run_id}").json()
    assert ended["state"] == "FAILED"
    assert "deadline" in ended["reason"]


def _adapted_head(context: CloudContext) -> dict[str, np.ndarray]:
    """The base head trained on half-rotated digits: what a good federated run yields."""
    with context.database.session() as s:
        sha = repository.get_version(s, model_name=MODEL, version=1).artifact_sha256
    model = context.artifacts.path(sha).read_bytes()
    head = find_head(model, ["head.weight", "head.bias"], "embedding")
    splits = digits_splits(0)
    x = mixed_drift(splits.x_train, "rotated", 20, 0.5, seed=3)
    vectors = run_model(model, {"input": x}, output="embedding")
    update = train_head(head.weight, head.bias, vectors, splits.y_train, TrainConfig(epochs=10))
    return {"head.weight": update.weight, "head.bias": update.bias}


def test_a_completed_run_registers_fp32_and_int8_with_lineage_and_a_canary(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    """The result passes the gate (no more than 3 pt lost on the clean held-out digits,
    a gain on rotated ones): FP32 :3 with parent :1 and the run named, INT8 :4 its child,
    and a canary rollout of :4 to the run's devices."""
    api, coordinator = api_with_coordinator
    run_id = _running(
        api.context, coordinator, selector={"site": "lab"}, rollout={"canary": 1},
        gate={"eval_dataset": "builtin:digits-rotated-20", "min_gain_pt": 5},
    )  # fmt: skip
    done = _completed(api, coordinator, run_id)
    assert (done["result_version"], done["result_int8_version"]) == (3, 4)
    gate = done["metrics"]["gate"]
    assert gate["eval_gain_pt"] >= 5
    assert gate["accuracy_drop_pt"] <= 3
    with api.context.database.session() as s:
        fp32 = repository.get_version(s, model_name=MODEL, version=3)
        int8 = repository.get_version(s, model_name=MODEL, version=4)
        parent = s.get(ModelVersion, fp32.parent_id)
        assert parent is not None
        assert parent.version == 1
        assert fp32.source == f"federated:run-{run_id}"
        assert fp32.metrics["federated_run"] == run_id
        assert int8.parent_id == fp32.id
        assert int8.precision == "int8"
        assert int8.routing is not None
        assert int8.routing["cloud_model"] is not None
        rollout = s.get(Rollout, done["rollout_id"])
        assert rollout is not None
        assert rollout.model_version_id == int8.id
        assert rollout.selector == {"site": "lab"}


def _route_base_int8_with_a_second_opinion(context: CloudContext) -> dict[str, Any]:
    """Give the base's INT8 child :2 a second opinion beside its own policy (what a quantize
    whose calibration chose one ships); its routing as stored."""
    splits = digits_splits(0)
    with context.database.session() as s:
        row = repository.get_version(s, model_name=MODEL, version=2)
        model = context.artifacts.path(row.artifact_sha256).read_bytes()
        edge = run_model(model, {"input": splits.x_calib}, output="probabilities")
        found = calibrate(
            edge, splits.y_calib, target=RoutingTarget("budget", 0.2), inputs=splits.x_calib
        )
        assert found.second is not None
        opinion = found.second.opinion([p.threshold for p in found.curves[SECOND_OPINION]])
        routing = {**(row.routing or {}), "second_opinion": opinion.model_dump(mode="json")}
        row.routing = RoutingSpec.model_validate(routing).model_dump(mode="json")
        return dict(row.routing)


def test_the_int8_version_of_a_run_keeps_the_base_s_second_opinion(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    """The base's INT8 child routes with a second opinion beside max_prob (or whichever plain
    policy it had): the run's INT8 version ships a second opinion too, retrained on the new
    model, beside the same plain policy, target and cloud model; a federated update must not
    quietly change how devices route."""
    api, coordinator = api_with_coordinator
    base = _route_base_int8_with_a_second_opinion(api.context)
    run_id = _running(api.context, coordinator, selector={"site": "lab"})
    done = _completed(api, coordinator, run_id)
    with api.context.database.session() as s:
        int8 = repository.get_version(s, model_name=MODEL, version=done["result_int8_version"])
        routing = RoutingSpec.model_validate(int8.routing)
        shipped = int8.calibration["shipped"]
    assert routing.second_opinion is not None
    assert shipped == SECOND_OPINION
    assert routing.policy.value == base["policy"]
    assert (routing.target, routing.cloud_model) == (
        base["target"],
        RoutingSpec.model_validate(base).cloud_model,
    )
    assert len(routing.second_opinion.knots) == len(routing.curve)
    # Calibrated on the new model's answers: its knots are the new edge's, not the base's.
    assert routing.second_opinion.knots != base["second_opinion"]["knots"]


def test_a_result_the_gate_refuses_registers_nothing(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    api, coordinator = api_with_coordinator
    run_id = _running(api.context, coordinator, rollout={"canary": 1})
    files = run_files(api.context, run_id)
    rng = np.random.default_rng(0)
    files.write_head(
        "result", {"head.weight": rng.normal(size=(32, 10)), "head.bias": rng.normal(size=10)}
    )
    with api.context.database.session() as s:
        set_state(s, run_id, expect=(RunState.RUNNING,), to=RunState.FINALIZING)
    assert finalize_run(api.context, run_id, files) is RunState.GATE_FAILED
    with api.client() as c:
        refused = c.get(f"/v1/federated/runs/{run_id}").json()
    assert refused["state"] == "GATE_FAILED"
    assert "pt drop > 3.0 pt allowed" in refused["reason"]
    assert refused["result_version"] is None
    assert refused["rollout_id"] is None
    with api.context.database.session() as s:
        assert [v.version for v in repository.list_versions(s, model_name=MODEL)] == [1, 2]
        assert s.scalars(select(Rollout)).all() == []


def test_a_run_the_superlink_does_not_take_fails_with_the_reason(
    api_with_coordinator: tuple[RunningApi, Coordinator],
) -> None:
    """No SuperLink listens: the coordinator prepares the run's directory (plan, base head),
    `flwr run` is refused, and once the run has waited its wait_for_clients_s it fails,
    saying why (found by the end-to-end test: the base head was written before its folder
    existed, and the run stayed PENDING forever)."""
    api, coordinator = api_with_coordinator
    run_id = _start(api, wait_for_clients_s=1).json()["id"]
    with api.context.database.session() as s:
        run = s.get(FederatedRun, run_id)
        assert run is not None
        run.created_at = datetime.now(UTC) - timedelta(minutes=1)
    coordinator.tick()
    files = run_files(api.context, run_id)
    assert files.read_plan().devices == ["cam-0", "cam-1", "cam-2"]
    assert set(files.read_head("base")) == {"head.weight", "head.bias"}
    with api.client() as c:
        failed = c.get(f"/v1/federated/runs/{run_id}").json()
    assert failed["state"] == "FAILED"
    assert "the SuperLink did not take the run" in failed["reason"]
