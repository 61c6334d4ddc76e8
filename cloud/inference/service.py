"""The inference service both front ends (REST, gRPC) call: who may ask, which version,
checked inputs, the result cache, and the batcher of the version's warm session."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from cloud.context import CloudContext
from cloud.inference.auth import Caller, TokenCache
from cloud.inference.batcher import BatchConfig, BatcherClosed
from cloud.inference.catalog import Catalog, VersionInfo, parse_version
from cloud.inference.engine import Engine, open_engine, serves_fp16, usable_providers
from cloud.inference.guards import RateLimiter, ResultCache, input_digest
from cloud.inference.metrics import InferenceMetrics
from cloud.inference.pool import OpenEngine, SessionPool
from cloud.inference.validate import check_inputs, check_outputs
from shared.errors import (
    EdgeFleetError,
    InferenceFailed,
    InvalidInput,
    PayloadTooLarge,
    ServiceUnavailable,
)
from shared.tensors import InferRequest, InferResponse

__all__ = ["InferenceService", "Pending"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]
PLATFORM = "onnxruntime_onnx"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, InvalidInput | PayloadTooLarge):
        return "INVALID"
    if isinstance(exc, ServiceUnavailable):
        return "REJECTED"
    if isinstance(exc, InferenceFailed):
        return "BACKEND"
    return "OTHER"


@dataclass(slots=True)
class Pending:
    """A request on its way: ``future`` gives the model's outputs, ``finish`` the answer."""

    info: VersionInfo
    request: InferRequest
    future: Future[dict[str, Array]]
    cache_key: str | None
    service: InferenceService
    cached: bool = False

    def finish(self, outputs: dict[str, Array]) -> InferResponse:
        wanted = [o.name for o in self.request.outputs]
        if self.cache_key is not None and not self.cached:
            self.service.cache.put(self.cache_key, outputs)
        if wanted:
            outputs = {n: outputs[n] for n in wanted}
        return InferResponse(
            model_name=self.info.model,
            model_version=str(self.info.version),
            id=self.request.id,
            outputs=outputs,
        )


class InferenceService:
    def __init__(self, context: CloudContext, *, engine: OpenEngine | None = None) -> None:
        settings = context.settings
        self.settings = settings
        self.context = context
        self.metrics = InferenceMetrics()
        self.catalog = Catalog(
            context.database,
            ttl_s=settings.inference_catalog_ttl_s,
            fp16=serves_fp16(
                settings.inference_providers, usable_providers(settings.inference_providers)
            ),
        )
        self.tokens = TokenCache(
            context.database, admin_token=settings.admin_token,
            ttl_s=settings.inference_token_ttl_s,
        )  # fmt: skip
        self.limiter = RateLimiter(
            context.redis,
            limit=settings.inference_rate_limit,
            window_s=settings.inference_rate_window_s,
        )
        self.cache = ResultCache(
            context.redis,
            ttl_s=settings.inference_result_cache_ttl_s,
            max_bytes=settings.inference_result_cache_max_bytes,
        )
        self.pool = SessionPool(
            engine or self._open_engine,
            memory_bytes=settings.inference_memory_bytes,
            defaults=BatchConfig(
                max_batch_size=settings.inference_max_batch_size,
                max_queue_delay_s=settings.inference_max_queue_delay_ms / 1000,
                max_queue=settings.inference_max_queue,
                queue_timeout_s=settings.inference_queue_timeout_s,
            ),
            metrics=self.metrics,
        )
        # An answer is awaited at most this long, whatever the engine does.
        self.answer_timeout_s = settings.inference_queue_timeout_s * 2 + 30

    def _open_engine(self, info: VersionInfo) -> Engine:
        return open_engine(
            self.context.artifacts.path(info.sha256),
            providers=self.settings.inference_providers,
            threads=self.settings.inference_threads,
            cache_dir=self.settings.data_dir / "tensorrt-cache",
        )

    # -- who, which --------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Caller:
        try:
            return self.tokens.verify(authorization)
        except EdgeFleetError:
            self.metrics.rejected.labels("UNAUTHORIZED").inc()
            raise

    def cached_caller(self, authorization: str | None) -> Caller | None:
        """The caller if that needs no SQL; None: call ``authenticate`` (off the event loop)."""
        return self.tokens.cached(authorization)

    def admit(self, caller: Caller) -> None:
        """The per-device rate limit (429); the admin is not limited."""
        if caller.device_id is None:
            return
        try:
            self.limiter.hit(caller.device_id)
        except EdgeFleetError:
            self.metrics.rejected.labels("RATE_LIMITED").inc()
            raise

    def resolve(self, model: str, version: str | None) -> VersionInfo:
        try:
            return self.catalog.resolve(model, parse_version(version))
        except EdgeFleetError:
            self.metrics.rejected.labels("UNKNOWN_MODEL").inc()
            raise

    def ready(self) -> bool:
        try:
            self.context.database.ping()
        except Exception:  # any driver error means not ready
            return False
        return True

    def model_ready(self, info: VersionInfo) -> None:
        """Loads the version (warm-up); InferenceFailed when it cannot be."""
        self.pool.get(info)

    def metadata(self, info: VersionInfo) -> dict[str, Any]:
        """KServe v2 model metadata."""
        return {
            "name": info.model,
            "versions": [str(v) for v in info.versions],
            "platform": PLATFORM,
            "inputs": [s.model_dump() for s in info.inputs],
            "outputs": [s.model_dump() for s in info.outputs],
        }

    # -- inference ---------------------------------------------------------------------------

    def submit(self, info: VersionInfo, decode: Callable[[], InferRequest]) -> Pending:
        """Decode, check and queue one request; what fails is counted against ``info``."""
        labels = (info.model, str(info.version))
        started = time.perf_counter()
        try:
            pending = self._submit(info, decode())
        except Exception as exc:
            self.metrics.request_failure.labels(*labels, _reason(exc)).inc()
            raise

        def account(future: Future[dict[str, Array]]) -> None:
            exc = future.exception()
            if exc is None:
                self.metrics.request_success.labels(*labels).inc()
            else:
                self.metrics.request_failure.labels(*labels, _reason(exc)).inc()
            took = time.perf_counter() - started
            self.metrics.request_duration_us.labels(*labels).inc(took * 1e6)

        pending.future.add_done_callback(account)
        return pending

    def _submit(self, info: VersionInfo, request: InferRequest) -> Pending:
        inputs, rows = check_inputs(info.inputs, request.inputs)
        wanted = [o.name for o in request.outputs]
        check_outputs(info.outputs, wanted)
        key = None
        if self.settings.inference_result_cache:
            key = ResultCache.key(info.model, info.version, input_digest(inputs, wanted))
            hit = self.cache.get(key)
            labels = (info.model, str(info.version))
            if hit is not None:
                self.metrics.cache_hits.labels(*labels).inc()
                done: Future[dict[str, Array]] = Future()
                done.set_result(hit)
                return Pending(info, request, done, key, self, cached=True)
            self.metrics.cache_misses.labels(*labels).inc()
        for _ in range(3):
            loaded = self.pool.get(info)
            try:
                future = loaded.batcher.submit(inputs, rows)
            except BatcherClosed:
                # Evicted between get and submit: load it again.
                self.pool.forget(info.key, loaded)
                continue
            return Pending(info, request, future, key, self)
        raise ServiceUnavailable("the model is being reloaded; retry", retry_after_s=1)

    def submit_now(
        self, caller: Caller, model: str, version: str | None, decode: Callable[[], InferRequest]
    ) -> Pending | None:
        """``submit`` when nothing on the way blocks (no Redis call, version cached and warm),
        so the event loop may call it; None when the request must take the thread pool."""
        settings = self.settings
        if settings.inference_result_cache or (settings.inference_rate_limit and not caller.admin):
            return None
        info = self.catalog.cached(model, parse_version(version))
        if info is None or not self.pool.is_loaded(info.key):
            return None
        return self.submit(info, decode)

    def infer(self, info: VersionInfo, decode: Callable[[], InferRequest]) -> InferResponse:
        """Blocking: submit and wait (gRPC's worker threads)."""
        pending = self.submit(info, decode)
        try:
            outputs = pending.future.result(self.answer_timeout_s)
        except TimeoutError:
            raise ServiceUnavailable("no answer in time; retry", retry_after_s=1) from None
        return pending.finish(outputs)

    def close(self) -> None:
        self.pool.close()
