"""The agent under a cloud budget: each model with a curve moves its threshold along it (never
offloading more than its calibrated threshold would), spends a credit so its offload stays
within the budget even on inputs harder than the calibration split, and goes back to its
calibrated threshold when the budget is cleared or expires. Models without a curve keep
their threshold and say so.

The edge model is the identity (the probabilities are what the test feeds) and the cloud an
httpx.MockTransport speaking KServe v2, as in test_router.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.budget import BudgetFollower
from edge_agent.router import CircuitBreaker, CloudClient, Router
from edge_agent.runtime import Runtime
from shared import topics
from shared.messages import (
    CloudBudget,
    CurvePoint,
    RoutingPolicy,
    RoutingSpec,
    Telemetry,
    TensorSpec,
    budget_payload,
    decode,
)
from shared.tensors import HEADER_LENGTH, InferResponse, decode_request, encode_response
from tests.edge_agent.support import agent_settings, identity_model, manifest_for

IO = {
    "inputs": [TensorSpec(name="input", datatype="FP32", shape=[-1, 3])],
    "outputs": [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3])],
}
# Calibrated to offload below 0.9; the curve says 0.52 offloads a quarter of the inputs.
# (Three classes: the highest probability, the max_prob confidence, is at least 1/3.)
CURVE = [
    CurvePoint(offload=0.0, threshold=0.34),
    CurvePoint(offload=0.5, threshold=0.7),
    CurvePoint(offload=1.0, threshold=1.0),
]
FOLLOWING = RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0.9, curve=CURVE)
FIXED = RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0.9)
NOW = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def budget(share: float, *, for_s: float = 60.0, reason: str = "queue over bound") -> bytes:
    until = datetime.fromtimestamp(NOW + for_s, UTC)
    return budget_payload(CloudBudget(max_offload=share, reason=reason, until=until))


def _answer(request: httpx.Request) -> httpx.Response:
    header = request.headers.get(HEADER_LENGTH)
    rows = decode_request(request.content, int(header) if header else None).inputs["input"]
    body, headers = encode_response(
        InferResponse(
            model_name="m",
            model_version="7",
            outputs={"probabilities": np.tile([0.0, 0.0, 1.0], (len(rows), 1)).astype("f4")},
        ),
        binary=True,
    )
    return httpx.Response(200, content=body, headers=headers)


@pytest.fixture
def sent() -> list[int]:
    """How many rows each cloud call carried."""
    return []


@pytest.fixture
def client(sent: list[int]) -> Iterator[CloudClient]:
    def handle(request: httpx.Request) -> httpx.Response:
        header = request.headers.get(HEADER_LENGTH)
        sent.append(
            len(decode_request(request.content, int(header) if header else None).inputs["input"])
        )
        return _answer(request)

    client = CloudClient(
        "http://cloud.test",
        "device-token-123",
        transport=httpx.MockTransport(handle),
        breaker=CircuitBreaker(failures=3, reset_s=3600),
    )
    yield client
    client.close()


def _router(
    tmp_path: Path, client: CloudClient, follower: BudgetFollower, **specs: RoutingSpec
) -> Router:
    data = identity_model()
    path = tmp_path / "identity.onnx"
    path.write_bytes(data)
    runtime = Runtime()
    for name, spec in specs.items():
        runtime.swap(runtime.load(manifest_for(data, model=name, routing=spec, **IO), path))
    return Router(runtime, cloud=client, budget=follower)


def _rows(*confidences: float) -> dict[str, np.ndarray]:
    """One row per confidence: max_prob is the confidence itself."""
    rows = [[c, (1 - c) / 2, (1 - c) / 2] for c in confidences]
    return {"input": np.array(rows, dtype=np.float32)}


def test_a_budget_moves_the_threshold_along_the_curve_and_back_when_cleared(
    tmp_path: Path, client: CloudClient, sent: list[int]
) -> None:
    """Budget 0.25: threshold 0.52 from the curve. 0.4 still goes to the cloud, 0.6 (hard
    under the calibrated 0.9) is answered here because of the budget, 0.95 was never hard.
    The empty retained message brings the calibrated threshold back."""
    follower = BudgetFollower(clock=Clock())
    router = _router(tmp_path, client, follower, m=FOLLOWING)
    follower.on_message(topics.CLOUD_BUDGET, budget(0.5))  # credit: a full row per call
    follower.on_message(topics.CLOUD_BUDGET, budget(0.25))
    assert follower.threshold(FOLLOWING) == pytest.approx(0.52)
    answer = router.infer("m", _rows(0.4, 0.6, 0.95))
    assert [(r.source, r.hard, r.over_budget) for r in answer.rows] == [
        ("cloud", True, False),
        ("edge", False, True),
        ("edge", False, False),
    ]
    assert not answer.degraded
    assert sent == [1]
    follower.on_message(topics.CLOUD_BUDGET, b"")
    assert follower.current() is None
    assert follower.threshold(FOLLOWING) == 0.9
    answer = router.infer("m", _rows(0.4, 0.6, 0.95))
    assert [r.source for r in answer.rows] == ["cloud", "cloud", "edge"]
    assert answer.over_budget_rows == 0
    assert sent == [1, 2]


def test_a_budget_never_makes_a_model_offload_more_than_its_calibrated_threshold() -> None:
    follower = BudgetFollower(clock=Clock())
    follower.on_message(topics.CLOUD_BUDGET, budget(1.0))
    assert follower.threshold(FOLLOWING) == 0.9  # the curve says 1.0; calibrated wins
    follower.on_message(topics.CLOUD_BUDGET, budget(0.0))
    assert follower.threshold(FOLLOWING) == pytest.approx(0.34)


def test_a_model_without_a_curve_keeps_its_threshold_and_says_so(
    tmp_path: Path, client: CloudClient, sent: list[int]
) -> None:
    follower = BudgetFollower(clock=Clock())
    router = _router(tmp_path, client, follower, fixed=FIXED, following=FOLLOWING)
    follower.on_message(topics.CLOUD_BUDGET, budget(0.0))
    answer = router.infer("fixed", _rows(0.5, 0.6))
    assert [r.source for r in answer.rows] == ["cloud", "cloud"]
    report = follower.report(router.specs())
    assert report is not None
    assert (report.max_offload, report.following, report.fixed) == (0.0, ["following"], ["fixed"])
    assert report.reason == "queue over bound"


def test_the_credit_keeps_the_offload_within_the_budget_on_inputs_harder_than_calibration(
    tmp_path: Path, client: CloudClient, sent: list[int]
) -> None:
    """Every input is below the budget's threshold (the field is harder than the calibration
    split): at 10 %, 200 rows offload at most 1 + 20, and a batch sends its least confident
    rows first."""
    follower = BudgetFollower(clock=Clock())
    router = _router(tmp_path, client, follower, m=FOLLOWING)
    follower.on_message(topics.CLOUD_BUDGET, budget(0.1))
    offloaded = sum(router.infer("m", _rows(0.35)).hard_rows for _ in range(100))
    assert 9 <= offloaded <= 11
    answer = router.infer("m", _rows(*[0.35 + 0.0005 * i for i in range(100)]))
    assert answer.hard_rows + offloaded <= 1 + 0.1 * 200
    hard = [i for i, r in enumerate(answer.rows) if r.hard]
    assert hard == list(range(len(hard)))  # the least confident ones
    assert answer.over_budget_rows == 100 - len(hard)
    assert answer.reason is not None
    assert "budget" in answer.reason


def test_a_budget_is_followed_until_it_expires_and_a_renewal_extends_it() -> None:
    """A cloud that dies with a budget retained: agents go back to their calibrated
    thresholds at ``until``; while the cloud renews it, the budget holds."""
    clock = Clock()
    follower = BudgetFollower(clock=clock)
    follower.on_message(topics.CLOUD_BUDGET, budget(0.25, for_s=30))
    clock.now += 20
    follower.on_message(topics.CLOUD_BUDGET, budget(0.25, for_s=50))  # renewed
    clock.now += 20
    assert follower.threshold(FOLLOWING) == pytest.approx(0.52)
    clock.now += 10
    assert follower.current() is None
    assert follower.threshold(FOLLOWING) == 0.9
    follower.on_message(topics.CLOUD_BUDGET, budget(0.25, for_s=-1))  # retained, stale
    assert follower.current() is None


def with_ttl(share: float, *, issued_at: float, ttl_s: float = 30.0) -> bytes:
    """A budget as a cloud that says how long to follow it writes it: issued at
    ``issued_at`` on its clock, until ``ttl_s`` later."""
    return json.dumps(
        {
            "max_offload": share,
            "reason": "queue over bound",
            "until": datetime.fromtimestamp(issued_at + ttl_s, UTC).isoformat(),
            "ttl_s": ttl_s,
            "issued_at": datetime.fromtimestamp(issued_at, UTC).isoformat(),
        }
    ).encode()


def test_a_device_whose_clock_runs_ahead_follows_a_budget_for_its_ttl() -> None:
    """The device's clock is a minute ahead of the cloud's: the budget's ``until`` (the
    cloud's now + 30 s) is past on arrival. It is followed for its 30 s from receipt, on the
    device's own clock, and renewed as the cloud renews it; the skew is exported."""
    clock = Clock()
    clock.now = NOW + 60
    follower = BudgetFollower(clock=clock)
    follower.on_message(topics.CLOUD_BUDGET, with_ttl(0.25, issued_at=NOW))
    assert follower.threshold(FOLLOWING) == pytest.approx(0.52)
    clock.now += 15
    follower.on_message(topics.CLOUD_BUDGET, with_ttl(0.25, issued_at=NOW + 15))  # renewed
    clock.now += 29
    assert follower.current() is not None
    clock.now += 2
    assert follower.current() is None
    assert "edgefleet_agent_budget_age_on_arrival_seconds 60" in follower.prometheus({})


def test_a_retained_budget_delivered_again_does_not_extend_itself() -> None:
    """The device's clock is 2 h behind; the cloud died just after publishing (until in
    30 s, by its clock). The broker delivers the retained budget again on each reconnect:
    the device followed it for 30 s from the first delivery, and no later one brings it
    back (by ``until`` alone it would stay for two hours)."""
    clock = Clock()
    clock.now = NOW - 7200
    follower = BudgetFollower(clock=clock)
    payload = with_ttl(0.25, issued_at=NOW)
    follower.on_message(topics.CLOUD_BUDGET, payload)
    assert follower.current() is not None
    clock.now += 20
    follower.on_message(topics.CLOUD_BUDGET, payload)  # a reconnect 20 s later
    clock.now += 11
    assert follower.current() is None
    for _ in range(3):
        clock.now += 50 * 60
        follower.on_message(topics.CLOUD_BUDGET, payload)
        assert follower.current() is None
        assert follower.threshold(FOLLOWING) == 0.9


def test_a_malformed_budget_is_counted_and_changes_nothing() -> None:
    follower = BudgetFollower(clock=Clock())
    follower.on_message(topics.CLOUD_BUDGET, budget(0.25))
    for bad in (b"{", b'{"max_offload": 2, "until": "2030-01-01T00:00:00Z"}'):
        follower.on_message(topics.CLOUD_BUDGET, bad)
    assert (follower.received, follower.refused) == (1, 2)
    current = follower.current()
    assert current is not None
    assert current.max_offload == 0.25


def test_the_agent_reports_the_budget_in_telemetry_and_metrics(tmp_path: Path) -> None:
    """The real agent's telemetry window names the budget in force and the models that
    follow it; /metrics shows it, the effective threshold, and the rows it kept local."""
    agent = Agent(agent_settings(tmp_path / "agent"))
    data = identity_model()
    path = tmp_path / "identity.onnx"
    path.write_bytes(data)
    for name, spec in (("fixed", FIXED), ("following", FOLLOWING)):
        agent.runtime.swap(
            agent.runtime.load(manifest_for(data, model=name, routing=spec, **IO), path)
        )
    until = datetime.now(UTC) + timedelta(minutes=5)
    payload = budget_payload(CloudBudget(max_offload=0.25, reason="saturated", until=until))
    agent.budget.on_message(topics.CLOUD_BUDGET, payload)
    agent.start(serve_api=False)  # its broker is a port nobody listens on: no retained budget
    try:
        answer = agent.infer("following", _rows(0.6))
        assert answer.over_budget_rows == 1
        agent.close_telemetry_window()
        windows: list[bytes] = []
        agent.outbox.flush(lambda payload: windows.append(payload) is None)
        (window,) = [decode(Telemetry, p) for p in windows]
        metrics = agent.prometheus()
    finally:
        agent.stop()
    assert window.budget is not None
    assert (window.budget.max_offload, window.budget.following, window.budget.fixed) == (
        0.25,
        ["following"],
        ["fixed"],
    )
    assert window.counts["rows_over_budget"] == 1
    assert window.counts.get("rows_hard", 0) == 0
    assert "edgefleet_agent_budget_in_force 1" in metrics
    assert "edgefleet_agent_offload_budget 0.25" in metrics
    assert 'edgefleet_agent_routing_threshold{model="following"} 0.52' in metrics
    assert 'edgefleet_agent_routing_threshold{model="fixed"} 0.9' in metrics
    assert 'edgefleet_agent_budget_following{model="fixed"} 0' in metrics
    assert 'edgefleet_agent_events_total{kind="rows_over_budget"} 1' in metrics
