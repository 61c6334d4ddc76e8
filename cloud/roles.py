"""What a cloud process runs for its role (``edgefleet serve --role``): ``api`` the
control-plane REST API and the fleet service it publishes through, ``fleet`` the fleet
service with only health and metrics over HTTP, ``inference`` the inference service (REST and
gRPC), ``all`` everything in one process (the demo), inference under ``/v2`` of the API's
port so a device's one cloud URL reaches both."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from starlette.types import ASGIApp

from cloud.api.app import create_app, create_health_app
from cloud.context import CloudContext
from cloud.federated.coordinator import Coordinator
from cloud.federated.settings import FederatedSettings
from cloud.fleet.service import FleetService
from cloud.inference.app import WithInference, create_inference_app
from cloud.inference.budget import BudgetLoop, budget_loop_for
from cloud.inference.grpc_server import GrpcServer
from cloud.inference.service import InferenceService

__all__ = ["Role", "RoleParts", "build_role"]

_LOGGER = logging.getLogger(__name__)


class Role(StrEnum):
    ALL = "all"
    API = "api"
    FLEET = "fleet"
    INFERENCE = "inference"


@dataclass
class RoleParts:
    app: ASGIApp
    fleet: FleetService | None = None
    inference: InferenceService | None = None
    grpc: GrpcServer | None = None
    budget: BudgetLoop | None = None
    federated: Coordinator | None = None

    def start(self) -> None:
        if self.fleet is not None:
            self.fleet.start()
        if self.federated is not None:
            self.federated.start()
        if self.grpc is not None:
            self.grpc.start()
        if self.budget is not None:
            self.budget.start()

    def stop_steps(self) -> list[tuple[str, Callable[[], None]]]:
        """After the HTTP server stopped: the budget loop, gRPC, the inference sessions, the
        fleet loops (the budget publishes through the fleet's link in role ``all``)."""
        steps: list[tuple[str, Callable[[], None]]] = []
        if self.federated is not None:
            steps.append(("stopping the federated coordinator", self.federated.stop))
        if self.budget is not None:
            steps.append(("stopping the offload budget", self.budget.stop))
        if self.grpc is not None:
            steps.append(("stopping gRPC", self.grpc.stop))
        if self.inference is not None:
            steps.append(("stopping inference", self.inference.close))
        if self.fleet is not None:
            steps.append(("stopping the fleet", self.fleet.stop))
        return steps


def build_role(context: CloudContext, role: Role) -> RoleParts:
    settings = context.settings
    fleet = FleetService(context) if role is not Role.INFERENCE else None
    if role is Role.API:
        assert fleet is not None
        return _with_federated(context, RoleParts(create_app(context, fleet), fleet))
    if role is Role.FLEET:
        assert fleet is not None
        return RoleParts(create_health_app(context, fleet), fleet)
    service = InferenceService(context)
    grpc = GrpcServer(service, host=settings.api_host, port=settings.resolved_grpc_port)
    inference_app = create_inference_app(context, service)
    # Role inference has no fleet service: the budget gets a broker link of its own.
    budget = budget_loop_for(
        context, service.metrics, service.pool, fleet.link if fleet is not None else None
    )
    if role is Role.INFERENCE:
        return RoleParts(inference_app, None, service, grpc, budget)
    assert fleet is not None
    api = create_app(context, fleet)
    parts = RoleParts(WithInference(api, inference_app), fleet, service, grpc, budget)
    return _with_federated(context, parts, api)


def _with_federated(context: CloudContext, parts: RoleParts, api: object = None) -> RoleParts:
    """The API's processes coordinate federated runs (issue 11): one acts at a time."""
    assert parts.fleet is not None
    parts.federated = Coordinator(
        context, FederatedSettings(), on_rollout=parts.fleet.rollouts.wake
    )
    app = api if api is not None else parts.app
    app.state.federated = parts.federated  # type: ignore[attr-defined]
    return parts
