"""Router: each policy sends exactly the inputs it calls hard to the cloud; a slow, failing or
absent cloud gives the local answer flagged degraded, and the circuit breaker stops trying.

The edge model here is the identity, so the probabilities the policy decides on are the
ones the test feeds; the cloud is an httpx.MockTransport speaking KServe v2."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_agent.router import CircuitBreaker, CloudClient, Router
from edge_agent.runtime import Runtime
from shared.errors import TensorError
from shared.messages import RoutingPolicy, RoutingSpec, TensorSpec
from shared.tensors import HEADER_LENGTH, InferResponse, decode_request, encode_response
from tests.edge_agent.support import identity_model, manifest_for

CLOUD_ANSWER = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
SPEC = [TensorSpec(name="input", datatype="FP32", shape=[-1, 3])]
OUT = [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3])]


class Cloud:
    """A KServe v2 endpoint in a MockTransport: answers CLOUD_ANSWER, or what a test says."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.respond: Callable[[httpx.Request], httpx.Response] = self.answer

    def answer(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get(HEADER_LENGTH)
        parsed = decode_request(request.content, int(header) if header else None)
        rows = parsed.inputs["input"].shape[0]
        body, headers = encode_response(
            InferResponse(
                model_name="m",
                model_version="7",
                outputs={"probabilities": CLOUD_ANSWER.repeat(rows, 0)},
            ),
            binary=True,
        )
        return httpx.Response(200, content=body, headers=headers)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)


@pytest.fixture
def cloud() -> Cloud:
    return Cloud()


@pytest.fixture
def client(cloud: Cloud) -> Iterator[CloudClient]:
    client = CloudClient(
        "http://cloud.test/",
        "device-token-123",
        transport=httpx.MockTransport(cloud.handle),
        breaker=CircuitBreaker(failures=3, reset_s=3600),
    )
    yield client
    client.close()


def _router(
    tmp_path: Path,
    routing: RoutingSpec | None,
    cloud: CloudClient | None,
    override: RoutingSpec | None = None,
) -> Router:
    data = identity_model()
    path = tmp_path / "identity.onnx"
    path.write_bytes(data)
    runtime = Runtime()
    runtime.swap(runtime.load(manifest_for(data, inputs=SPEC, outputs=OUT, routing=routing), path))
    return Router(runtime, cloud=cloud, override=override)


def _ask(router: Router, *rows: list[float]) -> tuple[str, float | None, bool]:
    answer = router.infer("m", {"input": np.array(rows, dtype=np.float32)})
    return answer.source, answer.confidence, answer.degraded


@pytest.mark.parametrize(
    ("policy", "threshold", "hard_row", "easy_row", "hard_conf"),
    [
        ("max_prob", 0.6, [0.5, 0.3, 0.2], [0.8, 0.1, 0.1], 0.5),
        ("margin", 0.2, [0.45, 0.4, 0.15], [0.7, 0.2, 0.1], 0.05),
        ("entropy", 0.5, [1 / 3, 1 / 3, 1 / 3], [0.98, 0.01, 0.01], 0.0),
    ],
)
def test_a_policy_offloads_the_rows_below_its_threshold_and_keeps_the_rest(
    tmp_path: Path,
    cloud: Cloud,
    client: CloudClient,
    policy: str,
    threshold: float,
    hard_row: list[float],
    easy_row: list[float],
    hard_conf: float,
) -> None:
    router = _router(
        tmp_path, RoutingSpec(policy=RoutingPolicy(policy), threshold=threshold), client
    )
    source, conf, degraded = _ask(router, easy_row)
    assert (source, degraded) == ("edge", False)
    assert conf is not None
    assert conf >= threshold
    assert cloud.requests == []
    answer = router.infer("m", {"input": np.array([hard_row], dtype=np.float32)})
    assert (answer.source, answer.degraded) == ("cloud", False)
    assert answer.confidence == pytest.approx(hard_conf, abs=1e-6)
    np.testing.assert_array_equal(answer.outputs["probabilities"], CLOUD_ANSWER)
    (request,) = cloud.requests
    assert request.url == "http://cloud.test/v2/models/m/infer"
    assert request.headers["Authorization"] == "Bearer device-token-123"
    sent = decode_request(request.content, int(request.headers[HEADER_LENGTH]))
    np.testing.assert_allclose(sent.inputs["input"], [hard_row], rtol=1e-6)


def test_always_edge_and_always_cloud_ignore_the_probabilities(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    edge = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_EDGE), client)
    assert _ask(edge, [1 / 3, 1 / 3, 1 / 3])[0] == "edge"
    assert cloud.requests == []
    to_cloud = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_CLOUD), client)
    assert _ask(to_cloud, [1.0, 0.0, 0.0])[0] == "cloud"
    assert len(cloud.requests) == 1


def test_without_a_threshold_or_a_routing_spec_everything_stays_local(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    uncalibrated = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.MAX_PROB), client)
    assert _ask(uncalibrated, [0.4, 0.3, 0.3])[:2] == ("edge", pytest.approx(0.4))
    unrouted = _router(tmp_path, None, client)
    assert _ask(unrouted, [0.4, 0.3, 0.3]) == ("edge", None, False)
    assert cloud.requests == []


def test_the_device_override_beats_the_manifest_s_spec(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    router = _router(
        tmp_path,
        RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0.6),
        client,
        override=RoutingSpec(policy=RoutingPolicy.ALWAYS_EDGE),
    )
    assert _ask(router, [0.4, 0.3, 0.3])[0] == "edge"
    assert cloud.requests == []


def _fails_with(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    return respond


@pytest.mark.parametrize(
    "respond",
    [
        lambda r: httpx.Response(503, json={"error": "saturated"}),
        _fails_with(httpx.ConnectError("connection refused")),
        _fails_with(httpx.ReadTimeout("over budget")),
        lambda r: httpx.Response(200, content=b"{}garbage", headers={HEADER_LENGTH: "many"}),
        lambda r: httpx.Response(200, content=b"<html>proxy error</html>"),
    ],
    ids=["503", "refused", "timeout", "bad-header", "not-json"],
)
def test_a_failing_cloud_gives_the_local_answer_flagged_degraded(
    tmp_path: Path,
    cloud: Cloud,
    client: CloudClient,
    respond: Callable[[httpx.Request], httpx.Response],
) -> None:
    cloud.respond = respond
    router = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_CLOUD), client)
    answer = router.infer("m", {"input": np.array([[0.2, 0.5, 0.3]], dtype=np.float32)})
    assert (answer.source, answer.degraded) == ("edge", True)
    assert (answer.reason or "").startswith("hard input, cloud failed: ")
    np.testing.assert_allclose(answer.outputs["probabilities"], [[0.2, 0.5, 0.3]], rtol=1e-6)


def test_no_cloud_configured_is_a_degraded_local_answer(tmp_path: Path) -> None:
    router = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_CLOUD), None)
    answer = router.infer("m", {"input": np.array([[0.2, 0.5, 0.3]], dtype=np.float32)})
    assert (answer.source, answer.degraded) == ("edge", True)
    assert answer.reason == "hard input, no cloud configured"


def test_the_breaker_opens_after_consecutive_failures_and_stops_calling_the_cloud(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    cloud.respond = lambda r: httpx.Response(503)
    router = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_CLOUD), client)
    for _ in range(3):
        _ask(router, [0.2, 0.5, 0.3])
    assert client.breaker.open
    answer = router.infer("m", {"input": np.array([[0.2, 0.5, 0.3]], dtype=np.float32)})
    assert answer.degraded
    assert answer.reason == "hard input, cloud circuit open"
    assert len(cloud.requests) == 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_half_opens_for_one_trial_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=clock)
    assert breaker.allow()
    breaker.failure()
    assert breaker.allow()
    assert not breaker.open
    breaker.failure()
    assert breaker.open
    assert not breaker.allow()
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()  # half-open: one trial call
    assert not breaker.allow()  # and only one
    breaker.failure()  # the trial failed: open for another reset_s
    clock.now += 5
    assert not breaker.allow()
    clock.now += 5
    assert breaker.allow()
    breaker.success()  # the trial succeeded: closed
    assert not breaker.open
    assert breaker.allow()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.open  # the count started again


def test_an_empty_batch_is_a_clear_tensor_error_not_a_crash(
    tmp_path: Path, client: CloudClient
) -> None:
    """The in-process API (no HTTP layer in front) refuses zero rows by name."""
    router = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0.6), client)
    with pytest.raises(TensorError, match="empty batch"):
        router.infer("m", {"input": np.zeros((0, 3), dtype=np.float32)})
