"""Router: each policy sends exactly the rows it calls hard to the cloud, in one call, and the
answers come back merged in order; a slow, failing or absent cloud gives the local answer
flagged degraded, and the circuit breaker stops trying.

The edge model here is the identity, so the probabilities the policy decides on are the
ones the test feeds; the cloud is an httpx.MockTransport speaking KServe v2 (and a real
socket server where the test is about time on the wire)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper

from edge_agent.router import Answer, CircuitBreaker, CloudClient, Router
from edge_agent.runtime import Runtime
from shared.errors import TensorError
from shared.messages import (
    CloudModelRef,
    CurvePoint,
    LearnedRouter,
    RoutingPolicy,
    RoutingSpec,
    SecondOpinion,
    TensorSpec,
)
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
                model_name=request.url.path.split("/")[3],
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


def _rows(answer: Answer) -> list[tuple[str, str, int | None, bool, bool]]:
    return [(r.source, r.model, r.version, r.hard, r.degraded) for r in answer.rows]


EASY, HARD = [0.9, 0.05, 0.05], [0.4, 0.35, 0.25]
CLOUD_MODEL = CloudModelRef(name="digits-cloud", version=3)


def test_a_batch_with_one_hard_row_sends_exactly_that_row_and_merges_in_order(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    """Rows 0 and 2 are easy, row 1 is hard: the cloud sees row 1 alone, asked under the
    cloud model's name and pinned version, and its answer lands back in row 1."""
    spec = RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0.6, cloud_model=CLOUD_MODEL)
    router = _router(tmp_path, spec, client)

    answer = router.infer("m", {"input": np.array([EASY, HARD, EASY], dtype=np.float32)})

    (request,) = cloud.requests
    assert request.url == "http://cloud.test/v2/models/digits-cloud/versions/3/infer"
    sent = decode_request(request.content, int(request.headers[HEADER_LENGTH]))
    np.testing.assert_allclose(sent.inputs["input"], [HARD], rtol=1e-6)
    np.testing.assert_allclose(
        answer.outputs["probabilities"], [EASY, CLOUD_ANSWER[0], EASY], rtol=1e-6
    )
    assert _rows(answer) == [
        ("edge", "m", 1, False, False),
        ("cloud", "digits-cloud", 7, True, False),  # the version the cloud says it ran
        ("edge", "m", 1, False, False),
    ]
    assert [r.confidence for r in answer.rows] == pytest.approx([0.9, 0.4, 0.9])
    assert answer.rows[1].latency_ms >= answer.rows[0].latency_ms > 0
    assert (answer.source, answer.hard_rows, answer.cloud_rows) == ("mixed", 1, 1)
    assert (answer.version, answer.degraded, answer.confidence) == (1, False, pytest.approx(0.4))


def test_latest_asks_the_unversioned_route_and_an_easy_batch_never_calls(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    spec = RoutingSpec(
        policy=RoutingPolicy.MAX_PROB,
        threshold=0.6,
        cloud_model=CloudModelRef(name="digits-cloud"),
    )
    router = _router(tmp_path, spec, client)
    assert router.infer("m", {"input": np.array([EASY, EASY], dtype=np.float32)}).source == "edge"
    assert cloud.requests == []
    answer = router.infer("m", {"input": np.array([HARD], dtype=np.float32)})
    assert cloud.requests[0].url == "http://cloud.test/v2/models/digits-cloud/infer"
    assert (answer.source, answer.model, answer.version) == ("cloud", "digits-cloud", 7)


def test_a_failing_cloud_flags_only_the_hard_rows_degraded(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    cloud.respond = lambda r: httpx.Response(503, json={"error": "saturated"})
    spec = RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0.6, cloud_model=CLOUD_MODEL)
    router = _router(tmp_path, spec, client)

    answer = router.infer("m", {"input": np.array([HARD, EASY], dtype=np.float32)})

    assert _rows(answer) == [("edge", "m", 1, True, True), ("edge", "m", 1, False, False)]
    np.testing.assert_allclose(answer.outputs["probabilities"], [HARD, EASY], rtol=1e-6)
    assert (answer.source, answer.degraded, answer.degraded_rows) == ("edge", True, 1)
    assert answer.reason == "hard input, cloud failed: HTTPStatusError"


def test_a_cloud_answer_for_the_wrong_number_of_rows_is_a_failure(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    def two_rows(request: httpx.Request) -> httpx.Response:
        body, headers = encode_response(
            InferResponse(model_name="m", outputs={"probabilities": CLOUD_ANSWER.repeat(2, 0)}),
            binary=True,
        )
        return httpx.Response(200, content=body, headers=headers)

    cloud.respond = two_rows
    router = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_CLOUD), client)
    answer = router.infer("m", {"input": np.array([HARD], dtype=np.float32)})
    assert (answer.source, answer.degraded) == ("edge", True)
    np.testing.assert_allclose(answer.outputs["probabilities"], [HARD], rtol=1e-6)


def _two_output_model() -> bytes:
    """input[N,3] -> scores (the same values) and embedding (the same values)."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["input"], ["scores"]),
            helper.make_node("Identity", ["input"], ["embedding"]),
        ],
        "two",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _two_output_router(tmp_path: Path, spec: RoutingSpec, client: CloudClient) -> Router:
    data = _two_output_model()
    path = tmp_path / "two.onnx"
    path.write_bytes(data)
    outputs = [
        TensorSpec(name="scores", datatype="FP32", shape=[-1, 3]),
        TensorSpec(name="embedding", datatype="FP32", shape=[-1, 3]),
    ]
    runtime = Runtime()
    manifest = manifest_for(data, inputs=SPEC, outputs=outputs, routing=spec)
    runtime.swap(runtime.load(manifest, path))
    return Router(runtime, cloud=client)


def test_the_probabilities_are_read_from_the_output_the_spec_names(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    spec = RoutingSpec(policy=RoutingPolicy.MARGIN, threshold=0.2, probabilities_output="scores")
    router = _two_output_router(tmp_path, spec, client)
    answer = router.infer("m", {"input": np.array([EASY, HARD], dtype=np.float32)})
    assert [r.source for r in answer.rows] == ["edge", "edge"]  # the cloud gives no "scores"
    assert [r.hard for r in answer.rows] == [False, True]
    assert answer.rows[1].confidence == pytest.approx(0.05)
    assert answer.degraded_rows == 1
    unnamed = _two_output_router(
        tmp_path, RoutingSpec(policy=RoutingPolicy.MARGIN, threshold=0.2), client
    )
    skipped = unnamed.infer("m", {"input": np.array([HARD], dtype=np.float32)})
    assert skipped.rows[0].hard is False
    assert (skipped.reason or "").startswith("routing skipped: ")
    assert len(cloud.requests) == 1


def test_the_learned_policy_routes_on_the_embedding_with_the_shipped_weights(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    """Features: 3 sorted scores, margin, entropy, then the 3 embedding values. A weight on
    the last embedding value only: a row is hard when that value is high, whatever its
    scores say."""
    learned = LearnedRouter(
        embedding_output="embedding",
        mean=[0.0] * 8,
        scale=[1.0] * 8,
        weights=[0.0] * 7 + [10.0],
        bias=-5.0,
    )
    spec = RoutingSpec(
        policy=RoutingPolicy.LEARNED,
        threshold=0.5,
        learned=learned,
        probabilities_output="scores",
    )
    router = _two_output_router(tmp_path, spec, client)
    rows = np.array([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]], dtype=np.float32)
    answer = router.infer("m", {"input": rows})
    assert [r.hard for r in answer.rows] == [True, False]
    assert answer.rows[0].confidence == pytest.approx(1 / (1 + np.exp(3.0)))
    assert answer.rows[1].confidence == pytest.approx(1 / (1 + np.exp(-4.0)))


def test_a_second_opinion_on_the_input_sends_the_row_it_doubts(
    tmp_path: Path, cloud: Cloud, client: CloudClient
) -> None:
    """Both rows are confident by max_prob (0.8, 0.7 >= 0.6); a second opinion reading the
    input says the second row is class 2, not the edge's 0: only that row goes to the cloud,
    with the confidence on max_prob's scale through the knots."""
    opinion = SecondOpinion(
        weights=[20.0, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0, 60.0],
        bias=[0.0, 0.0, 0.0],
        alpha=0.5,
        knots=[0.0, 0.5, 1.0],
    )
    curve = [
        CurvePoint(offload=0.0, threshold=0.3),
        CurvePoint(offload=0.5, threshold=0.6),
        CurvePoint(offload=1.0, threshold=1.0),
    ]
    spec = RoutingSpec(
        policy=RoutingPolicy.MAX_PROB, threshold=0.6, curve=curve, second_opinion=opinion
    )
    router = _router(tmp_path, spec, client)
    rows = np.array([[0.8, 0.1, 0.1], [0.7, 0.0, 0.3]], dtype=np.float32)
    answer = router.infer("m", {"input": rows})
    assert [r.hard for r in answer.rows] == [False, True]
    assert [r.source for r in answer.rows] == ["edge", "cloud"]
    doubt = np.exp(14.0) / (np.exp(14.0) + 1.0 + np.exp(18.0))
    raw = np.sqrt(0.7 * doubt)
    assert answer.rows[1].confidence == pytest.approx(0.3 + raw / 0.5 * 0.3, rel=1e-5)
    (request,) = cloud.requests
    sent = decode_request(request.content, int(request.headers[HEADER_LENGTH]))
    np.testing.assert_allclose(sent.inputs["input"], rows[1:], rtol=1e-6)
    np.testing.assert_array_equal(answer.outputs["probabilities"][1], CLOUD_ANSWER[0])
    np.testing.assert_array_equal(answer.outputs["probabilities"][0], rows[0])


_DOUBTING = SecondOpinion(
    weights=[20.0, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0, 60.0],
    bias=[0.0, 0.0, 0.0],
    alpha=0.5,
    knots=[0.0, 0.5, 1.0],
)
_CURVE = [
    CurvePoint(offload=0.0, threshold=0.3),
    CurvePoint(offload=0.5, threshold=0.6),
    CurvePoint(offload=1.0, threshold=1.0),
]


@pytest.mark.parametrize(
    ("opinion", "why"),
    [
        (_DOUBTING.model_copy(update={"input": "pixels"}), "needs input 'pixels'"),
        (
            _DOUBTING.model_copy(update={"weights": [1.0] * 12, "bias": [0.0] * 3}),
            "reads 4 values a row",
        ),
        (
            _DOUBTING.model_copy(update={"weights": [float("nan")] * 9}),
            "not a number",
        ),
    ],
    ids=["missing-input", "another-model", "nan-weights"],
)
def test_a_second_opinion_that_cannot_run_falls_back_to_the_plain_policy(
    tmp_path: Path,
    cloud: Cloud,
    client: CloudClient,
    caplog: pytest.LogCaptureFixture,
    opinion: SecondOpinion,
    why: str,
) -> None:
    """The second opinion reads an input the model lacks, was trained for another model, or
    gives no number: the rows are routed by the spec's own policy (max_prob at 0.6), so the
    0.5 row still goes to the cloud and the 0.8 row stays; the answer and the log say the
    policy stood in, once per spec, not once per request."""
    spec = RoutingSpec(
        policy=RoutingPolicy.MAX_PROB, threshold=0.6, curve=_CURVE, second_opinion=opinion
    )
    router = _router(tmp_path, spec, client)
    rows = np.array([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2]], dtype=np.float32)
    with caplog.at_level("WARNING", logger="edge_agent.router"):
        first = router.infer("m", {"input": rows})
        again = router.infer("m", {"input": rows})
    for answer in (first, again):
        assert [r.hard for r in answer.rows] == [False, True]
        assert [r.source for r in answer.rows] == ["edge", "cloud"]
        assert [r.confidence for r in answer.rows] == pytest.approx([0.8, 0.5])
        assert answer.routing_fallback is not None
        assert why in answer.routing_fallback
        assert "routed by max_prob" in answer.routing_fallback
    assert len(cloud.requests) == 2
    warned = [r for r in caplog.records if "second opinion" in r.getMessage()]
    assert len(warned) == 1
    assert why in warned[0].getMessage()


def test_a_second_opinion_that_runs_is_no_fallback(tmp_path: Path, client: CloudClient) -> None:
    spec = RoutingSpec(
        policy=RoutingPolicy.MAX_PROB, threshold=0.6, curve=_CURVE, second_opinion=_DOUBTING
    )
    answer = _router(tmp_path, spec, client).infer(
        "m", {"input": np.array([[0.8, 0.1, 0.1], [0.7, 0.0, 0.3]], dtype=np.float32)}
    )
    assert [r.hard for r in answer.rows] == [False, True]
    assert answer.routing_fallback is None


class TrickleServer:
    """A real HTTP server that reads the request, then sends a 200 answer one byte every
    50 ms: each read is quick, the whole answer takes seconds."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = head.split(b"\r\n\r\n", 1)[1]
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                try:
                    for _ in range(1000):
                        if self.stop.wait(0.05):
                            break
                        conn.sendall(b" ")
                except OSError:
                    pass  # the client hung up: what a deadline does

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_the_budget_bounds_the_whole_call_even_when_every_read_is_quick(tmp_path: Path) -> None:
    """Per-phase timeouts never fire on an answer that trickles in; the overall deadline
    does: the app gets the local answer, degraded, about when the budget runs out."""
    server = TrickleServer()
    client = CloudClient(server.url, "device-token-123", budget_s=0.3)
    try:
        router = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_CLOUD), client)
        start = time.monotonic()
        answer = router.infer("m", {"input": np.array([HARD], dtype=np.float32)})
        elapsed = time.monotonic() - start
    finally:
        client.close()
        server.close()
    assert (answer.source, answer.degraded) == ("edge", True)
    assert answer.reason == "hard input, cloud failed: DeadlineExceeded"
    assert elapsed < 0.3 + 1.0  # within the budget, with a generous margin for a busy machine


def test_calls_past_their_deadline_hold_their_slot_and_the_next_fails_fast(
    tmp_path: Path, cloud: Cloud
) -> None:
    """A cloud that never answers cannot pile up calls: with one slot, the second hard input
    while the first is still stuck is refused at once (CloudBusy), not queued."""
    release = threading.Event()

    def stuck(request: httpx.Request) -> httpx.Response:
        release.wait(10)
        return httpx.Response(503)

    cloud.respond = stuck
    client = CloudClient(
        "http://cloud.test",
        "device-token-123",
        budget_s=0.05,
        transport=httpx.MockTransport(cloud.handle),
        max_in_flight=1,
        breaker=CircuitBreaker(failures=10),
    )
    try:
        router = _router(tmp_path, RoutingSpec(policy=RoutingPolicy.ALWAYS_CLOUD), client)
        first = router.infer("m", {"input": np.array([HARD], dtype=np.float32)})
        second = router.infer("m", {"input": np.array([HARD], dtype=np.float32)})
    finally:
        release.set()
        client.close()
    assert first.reason == "hard input, cloud failed: DeadlineExceeded"
    assert second.reason == "hard input, cloud failed: CloudBusy"
    assert len(cloud.requests) == 1
