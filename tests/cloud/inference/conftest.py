"""Fixtures: the inference service on a real uvicorn and a real gRPC server, with a tiny
classifier registered (and a device enrolled to call it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from cloud.context import CloudContext
from cloud.inference.app import create_inference_app
from cloud.inference.grpc_server import GrpcServer
from cloud.inference.pool import OpenEngine
from cloud.inference.service import InferenceService
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.settings import CloudSettings
from shared.errors import Conflict, NotFound
from tests.conftest import ADMIN_TOKEN, serve_in_thread
from tests.onnx_models import tiny_classifier

MODEL = "tiny"
FEATURES = 4


def register(context: CloudContext, name: str, data: bytes) -> int:
    """Register ``data`` as the next version of ``name`` (created when new)."""
    with context.database.session() as session:
        try:
            repository.get_model(session, name=name)
        except NotFound:
            repository.create_model(session, name=name)
        row = register_version(
            session, context.artifacts, model_name=name, blocks=[data],
            max_bytes=len(data) + 1, precision="fp32", actor="test",
        )  # fmt: skip
        return row.version


def enroll(context: CloudContext, device_id: str = "cam-1") -> str:
    """A device token (the device enrolled with a new one if it was already)."""
    with context.database.session() as session:
        try:
            return repository.enroll_device(session, device_id=device_id)[1]
        except Conflict:
            return repository.rotate_device_token(session, device_id=device_id)[1]


@dataclass
class RunningInference:
    url: str
    grpc: str
    service: InferenceService
    context: CloudContext
    device_token: str

    def client(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")

    def metric(self, name: str, **labels: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
def settings(settings: CloudSettings) -> CloudSettings:
    """Small bounds, a queue delay long enough that concurrent requests meet in a batch."""
    return settings.model_copy(
        update={
            "inference_max_request_bytes": 64 * 1024,
            "inference_max_request_rows": 64,
            "inference_max_batch_size": 16,
            "inference_max_queue_delay_ms": 50.0,
            "inference_providers": ["CPUExecutionProvider"],
            "inference_threads": 1,
            "grpc_workers": 8,
        }
    )


@contextmanager
def serving(
    context: CloudContext, engine: OpenEngine | None = None, **overrides: object
) -> Iterator[RunningInference]:
    """The inference service on ``context`` with settings ``overrides``, REST and gRPC."""
    if overrides:
        context = dataclasses.replace(
            context, settings=context.settings.model_copy(update=overrides)
        )
    service = InferenceService(context, engine=engine)
    grpc_server = GrpcServer(service, host="127.0.0.1", port=0)
    port = grpc_server.start()
    try:
        with serve_in_thread(create_inference_app(context, service)) as url:
            yield RunningInference(url, f"127.0.0.1:{port}", service, context, enroll(context))
    finally:
        grpc_server.stop(0)
        service.close()


@pytest.fixture
def registered(context: CloudContext) -> CloudContext:
    """Two versions of the tiny classifier (different weights)."""
    register(context, MODEL, tiny_classifier(features=FEATURES, classes=3, seed=1))
    register(context, MODEL, tiny_classifier(features=FEATURES, classes=3, seed=2))
    return context


@pytest.fixture
def inference(registered: CloudContext) -> Iterator[RunningInference]:
    with serving(registered) as running:
        yield running
