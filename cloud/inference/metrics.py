"""Prometheus series of the inference service, named as Triton names them (``nv_inference_*``),
per model and version, on a registry of the service's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["InferenceMetrics"]

_MV = ["model", "version"]
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class InferenceMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_success = Counter(
            "nv_inference_request_success", "Inference requests answered", _MV, registry=r
        )
        self.request_failure = Counter(
            "nv_inference_request_failure",
            "Inference requests that failed, by reason (REJECTED: refused input or overload; "
            "BACKEND: the engine failed)",
            [*_MV, "reason"],
            registry=r,
        )
        self.inference_count = Counter(
            "nv_inference_count", "Inferences performed (rows; a batch of 8 counts 8)", _MV,
            registry=r,
        )  # fmt: skip
        self.exec_count = Counter(
            "nv_inference_exec_count", "Batch executions of the model", _MV, registry=r
        )
        self.request_duration_us = Counter(
            "nv_inference_request_duration_us",
            "Cumulative time requests spent from queued to answered",
            _MV,
            registry=r,
        )
        self.queue_duration_us = Counter(
            "nv_inference_queue_duration_us", "Cumulative time requests waited in the queue", _MV,
            registry=r,
        )  # fmt: skip
        self.compute_infer_duration_us = Counter(
            "nv_inference_compute_infer_duration_us",
            "Cumulative time requests spent in the engine (their batch's run)",
            _MV,
            registry=r,
        )
        self.batch_size = Histogram(
            "nv_inference_batch_size", "Rows per batch execution", _MV, buckets=_BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "edgefleet_inference_queue_seconds", "Time a request waited in the queue", _MV,
            buckets=_TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "edgefleet_inference_compute_seconds", "Time one batch execution took", _MV,
            buckets=_TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.pending = Gauge(
            "nv_inference_pending_request_count", "Requests waiting in the queue", _MV, registry=r
        )
        self.cache_hits = Counter(
            "nv_cache_num_hits_per_model", "Answers served from the result cache", _MV, registry=r
        )
        self.cache_misses = Counter(
            "nv_cache_num_misses_per_model", "Result cache look-ups that missed", _MV, registry=r
        )
        self.rejected = Counter(
            "edgefleet_inference_rejected",
            "Requests refused before a model version was resolved, by reason",
            ["reason"],
            registry=r,
        )
        self.loaded_bytes = Gauge(
            "edgefleet_inference_loaded_bytes", "ONNX bytes held by warm sessions", registry=r
        )
        self.loads = Counter("edgefleet_inference_model_loads", "Sessions loaded", _MV, registry=r)
        # The offload budget (cloud.inference.budget): what this replica sees and does.
        self.offload_budget = Gauge(
            "edgefleet_inference_offload_budget",
            "Share of their inputs devices may offload now (1: no budget)", registry=r,
        )  # fmt: skip
        self.offload_budget.set(1.0)
        self.saturated = Gauge(
            "edgefleet_inference_saturated",
            "This replica's queue counts as saturated (1) or not (0)", registry=r,
        )  # fmt: skip
        self.queue_wait = Gauge(
            "edgefleet_inference_queue_wait_seconds",
            "The queue wait the budget watches, at the last look", registry=r,
        )  # fmt: skip
        self.budget_changes = Counter(
            "edgefleet_inference_budget_changes",
            "Budget steps this replica made (tighten, relax, clear, renew)", ["change"],
            registry=r,
        )  # fmt: skip
        self.budget_publish_failures = Counter(
            "edgefleet_inference_budget_publish_failures",
            "Budget publications the MQTT link could not queue (tried again)", registry=r,
        )  # fmt: skip
        self.evictions = Counter(
            "edgefleet_inference_model_evictions", "Warm sessions evicted to stay in bounds", _MV,
            registry=r,
        )  # fmt: skip
