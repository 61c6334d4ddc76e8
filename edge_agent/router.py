"""Router: answer locally, and send only the hard inputs to the cloud — without ever
making the app wait on a slow or absent cloud (latency budget + circuit breaker)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt

from edge_agent.runtime import Runtime
from shared.messages import RoutingPolicy, RoutingSpec
from shared.routing import confidence
from shared.tensors import HEADER_LENGTH, decode_response, encode_request

__all__ = ["Answer", "CircuitBreaker", "CloudClient", "Router"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]


@dataclass
class Answer:
    """What every inference returns: the outputs and where they came from."""

    outputs: dict[str, Array]
    source: Literal["edge", "cloud"]
    model: str
    version: int
    latency_ms: float
    confidence: float | None = None
    degraded: bool = False
    reason: str | None = None


@dataclass
class CircuitBreaker:
    """Open after ``failures`` consecutive failures; one trial call after ``reset_s``."""

    failures: int = 3
    reset_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _consecutive: int = 0
    _opened_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self.clock() - self._opened_at >= self.reset_s:
                self._opened_at = self.clock()  # half-open: let one call through
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._consecutive, self._opened_at = 0, None

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._consecutive >= self.failures:
                self._opened_at = self.clock()

    @property
    def open(self) -> bool:
        return self._opened_at is not None


class CloudClient:
    """KServe v2 binary-tensor client for the cloud's fallback inference API."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        budget_s: float = 0.5,
        breaker: CircuitBreaker | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.budget_s = budget_s
        self.breaker = breaker or CircuitBreaker()
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(budget_s, connect=min(budget_s, 0.25)),
            transport=transport,
        )

    def infer(self, model: str, inputs: dict[str, Array]) -> dict[str, Array]:
        body, headers = encode_request(inputs, binary=True)
        response = self._client.post(
            f"{self.base_url}/v2/models/{model}/infer", content=body, headers=headers
        )
        if response.status_code != 200:
            raise httpx.HTTPStatusError(
                f"cloud answered {response.status_code}",
                request=response.request,
                response=response,
            )
        length = response.headers.get(HEADER_LENGTH)
        return decode_response(response.content, int(length) if length else None).outputs

    def close(self) -> None:
        self._client.close()


class Router:
    def __init__(
        self,
        runtime: Runtime,
        *,
        cloud: CloudClient | None = None,
        override: RoutingSpec | None = None,
    ) -> None:
        self.runtime = runtime
        self.cloud = cloud
        self.override = override

    def _spec(self, manifest_routing: RoutingSpec | None) -> RoutingSpec:
        return self.override or manifest_routing or RoutingSpec(policy=RoutingPolicy.ALWAYS_EDGE)

    def infer(self, model: str, inputs: dict[str, Array]) -> Answer:
        start = time.perf_counter()
        loaded = self.runtime.get(model)
        checked = loaded.check_inputs(inputs)
        outputs = loaded.run(checked)
        spec = self._spec(loaded.manifest.routing)
        probs = outputs.get("probabilities")
        conf: float | None = None
        hard = spec.policy is RoutingPolicy.ALWAYS_CLOUD
        if (
            probs is not None
            and probs.ndim == 2
            and spec.policy
            not in (
                RoutingPolicy.ALWAYS_EDGE,
                RoutingPolicy.ALWAYS_CLOUD,
            )
        ):
            scores = confidence(probs, spec.policy)
            conf = float(np.min(scores))
            hard = spec.threshold is not None and conf < spec.threshold
        answer = Answer(outputs, "edge", model, loaded.version, 0.0, conf)
        if hard:
            answer = self._offload(answer, model, checked)
        answer.latency_ms = (time.perf_counter() - start) * 1000
        return answer

    def _offload(self, local: Answer, model: str, inputs: dict[str, Array]) -> Answer:
        if self.cloud is None:
            local.degraded, local.reason = True, "hard input, no cloud configured"
            return local
        if not self.cloud.breaker.allow():
            local.degraded, local.reason = True, "hard input, cloud circuit open"
            return local
        try:
            outputs = self.cloud.infer(model, inputs)
        except Exception as exc:
            # Any cloud failure (network, status, a body that does not parse) is the same
            # thing to the app: the local answer, flagged, never an error.
            self.cloud.breaker.failure()
            _LOGGER.debug("offload of %s failed: %r", model, exc)
            local.degraded, local.reason = True, f"hard input, cloud failed: {type(exc).__name__}"
            return local
        self.cloud.breaker.success()
        return Answer(outputs, "cloud", model, local.version, 0.0, local.confidence)
