"""The agent's client of the cloud's fallback inference API (KServe v2, binary tensors):
one overall deadline per call, a circuit breaker, never more calls in flight than it has
slots for."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy.typing as npt

from shared.errors import EdgeFleetError
from shared.tensors import HEADER_LENGTH, decode_response, encode_request

__all__ = ["CircuitBreaker", "CloudAnswer", "CloudBusy", "CloudClient", "DeadlineExceeded"]

# How much sooner than the budget a caller stops waiting for the cloud (see ``infer``).
_WAKE_MARGIN_S = 0.002

Array = npt.NDArray[Any]
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class DeadlineExceeded(EdgeFleetError):
    """The cloud did not answer within the call's latency budget."""

    status_code = 504


class CloudBusy(EdgeFleetError):
    """Every offload slot holds a call still in flight: fail fast rather than queue."""

    status_code = 503


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


@dataclass(frozen=True, slots=True)
class CloudAnswer:
    outputs: dict[str, Array]
    model: str
    # What the cloud said it ran (the resolved version for "latest"); None if it did not say.
    version: int | None


def _version_of(raw: object) -> int | None:
    text = str(raw) if raw is not None else ""
    return int(text) if text.isascii() and text.isdigit() else None


class CloudClient:
    """KServe v2 binary-tensor client for the cloud's fallback inference API.

    ``budget_s`` bounds the *whole* call (connect, send, receive): the call runs on one of
    ``max_in_flight`` worker threads and the caller waits for it until the deadline, no
    longer. A call that outlives its deadline ends soon after on its own (every phase's
    timeout is the budget left when it started, and the body is read chunk by chunk against
    the deadline), so abandoned calls cannot pile up beyond the slots."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        budget_s: float = 0.5,
        breaker: CircuitBreaker | None = None,
        transport: httpx.BaseTransport | None = None,
        max_in_flight: int = 4,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.budget_s = budget_s
        self.breaker = breaker or CircuitBreaker()
        self.max_response_bytes = max_response_bytes
        self._token = token
        self._transport = transport
        # Made on the first offload: an httpx client loads the system's trust store (~100 ms
        # and ~1 MiB), which a device that never offloads need not pay for.
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix="cloud-offload"
        )

    def url_for(self, model: str, version: int | Literal["latest"] = "latest") -> str:
        if version == "latest":
            return f"{self.base_url}/v2/models/{model}/infer"
        return f"{self.base_url}/v2/models/{model}/versions/{version}/infer"

    def infer(
        self,
        model: str,
        inputs: dict[str, Array],
        *,
        version: int | Literal["latest"] = "latest",
        budget_s: float | None = None,
    ) -> CloudAnswer:
        """The cloud's answer for ``inputs``, or an error once ``budget_s`` has passed."""
        budget = self.budget_s if budget_s is None else budget_s
        deadline = time.monotonic() + budget
        body, headers = encode_request(inputs, binary=True)
        if not self._slots.acquire(blocking=False):
            raise CloudBusy("every offload slot is busy with a call still in flight")
        try:
            future = self._pool.submit(
                self._call, self.url_for(model, version), body, headers, deadline
            )
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _done: self._slots.release())
        try:
            # The wait ends _WAKE_MARGIN_S early: a thread woken at its deadline runs a
            # fraction of a millisecond to a few after it, and the budget is the app's bound.
            left = deadline - time.monotonic() - _WAKE_MARGIN_S
            return future.result(timeout=max(0.0, left))
        except concurrent.futures.TimeoutError as exc:
            raise DeadlineExceeded(
                f"no answer from the cloud within the {budget * 1000:.0f} ms budget"
            ) from exc

    def _call(self, url: str, body: bytes, headers: dict[str, str], deadline: float) -> CloudAnswer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the budget ran out before the call started")
        with self._http().stream(
            "POST", url, content=body, headers=headers, timeout=httpx.Timeout(left)
        ) as response:
            if response.status_code != 200:
                raise httpx.HTTPStatusError(
                    f"cloud answered {response.status_code}",
                    request=response.request,
                    response=response,
                )
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise EdgeFleetError(f"cloud answer over {self.max_response_bytes} bytes")
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("the cloud's answer arrived too slowly")
                chunks.append(chunk)
            length = response.headers.get(HEADER_LENGTH)
        parsed = decode_response(b"".join(chunks), int(length) if length else None)
        return CloudAnswer(parsed.outputs, parsed.model_name, _version_of(parsed.model_version))

    def _http(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                self._client = httpx.Client(
                    headers={"Authorization": f"Bearer {self._token}"},
                    timeout=httpx.Timeout(self.budget_s),
                    transport=self._transport,
                )
            return self._client

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._client_lock:
            if self._client is not None:
                self._client.close()
