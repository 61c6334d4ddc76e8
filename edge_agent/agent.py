"""The agent: MqttLink + ModelStore + Runtime + Deployer + Router + Telemetry + local API."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy.typing as npt

from edge_agent import __version__
from edge_agent.budget import BudgetFollower
from edge_agent.config import AgentSettings
from edge_agent.delivery import HttpDelivery, MqttDelivery
from edge_agent.deployer import Deployer
from edge_agent.learning import Learning
from edge_agent.local_api import LocalApi
from edge_agent.model_store import ModelStore
from edge_agent.router import Answer, CircuitBreaker, CloudClient, Router
from edge_agent.runtime import Runtime
from edge_agent.telemetry import LATENCY_BOUNDS_MS, Meter, Outbox
from shared import topics
from shared.errors import EdgeFleetError, InferenceFailed
from shared.messages import Presence, PresenceState, ReportedState, StatusEvent
from shared.mqtt_link import MqttLink, Will
from shared.signing import load_public_key
from shared.topics import DeviceTopic

__all__ = ["Agent"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]


def _presence(state: PresenceState) -> bytes:
    return Presence(state=state).model_dump_json().encode()


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        runtime: Runtime | None = None,
        mqtt_delivery: Callable[..., MqttDelivery] = MqttDelivery,
    ) -> None:
        """``runtime`` and ``mqtt_delivery`` let a host of many agents (the fleet simulator,
        edge_agent/simulator/) share sessions and inject faults; a device takes the defaults."""
        self.settings = settings
        self.device_id = settings.device_id
        self.store = ModelStore(settings.data_dir / "store")
        self.runtime = runtime or Runtime(threads=settings.threads)
        self.meter = Meter()
        # Windows taken while offline wait here; what overflows is counted in the next one.
        self.outbox = Outbox(
            settings.telemetry_buffer,
            on_drop=lambda n: self.meter.count("telemetry_dropped", n),
        )
        self.link = MqttLink(
            settings.mqtt_url,
            client_id=f"agent-{self.device_id}",
            username=self.device_id,
            password=settings.token,
            will=Will(
                topic=self._topic(DeviceTopic.PRESENCE),
                offline=_presence(PresenceState.OFFLINE),
                online=_presence(PresenceState.ONLINE),
                stopped=_presence(PresenceState.STOPPED),
            ),
            on_connected=self._on_connected,
            tls=settings.mqtt_tls,
        )
        fetcher: MqttDelivery | HttpDelivery
        if settings.download_via == "http":
            fetcher = HttpDelivery(self.store, cloud_url=settings.cloud_url, token=settings.token)
        else:
            fetcher = mqtt_delivery(
                self.link,
                self.store,
                device_id=self.device_id,
                wait_s=settings.chunk_wait_s,
                max_stalls=settings.download_max_stalls,
                give_up_s=settings.download_give_up_s,
            )
        self.deployer = Deployer(
            device_id=self.device_id,
            public_key=load_public_key(settings.public_key),
            store=self.store,
            runtime=self.runtime,
            fetcher=fetcher,
            publish_status=self._publish_status,
            on_applied=self.publish_reported,
        )
        self.cloud = CloudClient(
            settings.cloud_url,
            settings.token,
            budget_s=settings.cloud_budget_s,
            breaker=CircuitBreaker(
                failures=settings.cloud_breaker_failures, reset_s=settings.cloud_breaker_reset_s
            ),
        )
        # The cloud's offload budget (cloud/budget), followed along each model's curve.
        self.budget = BudgetFollower()
        self.router = Router(
            self.runtime, cloud=self.cloud, override=settings.routing_override, budget=self.budget
        )
        self.fetcher = fetcher
        # Federated learning (issue 11): the sample buffer and the SuperNode, when turned on.
        self.learning = Learning(settings, self.runtime, self.meter) if settings.federated else None
        self.api: LocalApi | None = None
        self._stop = threading.Event()
        self._telemetry_wake = threading.Event()
        self._telemetry = threading.Thread(
            target=self._telemetry_loop, name="telemetry", daemon=True
        )

    def _topic(self, kind: DeviceTopic) -> str:
        return topics.device_topic(self.device_id, kind)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, *, serve_api: bool = True, telemetry_thread: bool = True) -> None:
        """Without ``telemetry_thread`` the host closes and sends telemetry windows itself
        (``close_telemetry_window``, ``send_telemetry``): one thread for many agents."""
        self._load_installed()
        self.link.subscribe(self._topic(DeviceTopic.DESIRED), self.deployer.on_desired, qos=1)
        self.link.subscribe(topics.CLOUD_BUDGET, self.budget.on_message, qos=1)
        self.deployer.start()
        self.link.start()
        if telemetry_thread:
            self._telemetry.start()
        if self.learning is not None:
            self.learning.start()
        if serve_api:
            self.api = LocalApi(self, self.settings.api_host, self.settings.api_port)
            self.api.start()
        _LOGGER.info(
            "agent %s started (%d model(s) active)", self.device_id, len(self.runtime.models())
        )

    def _load_installed(self) -> None:
        """Serve what the store holds (it only ever points at verified blobs). A model that
        does not load is not served, and so not reported as active either."""
        for name, installed in list(self.store.state.active.items()):
            try:
                path = self.store.blob_path(installed.manifest.artifact.sha256)
                self.runtime.swap(self.runtime.load(installed.manifest, path))
            except Exception:
                self.meter.count("load_failures")
                _LOGGER.exception("could not load active model %s; not serving it", name)

    def stop(self) -> None:
        self._stop.set()
        self._telemetry_wake.set()
        if self.api is not None:
            self.api.stop()
        self.deployer.stop()
        self.link.stop()
        self.cloud.close()
        if isinstance(self.fetcher, HttpDelivery):
            self.fetcher.close()
        if self._telemetry.ident is not None:  # never started: nothing to wait for
            self._telemetry.join(5)
        # Last: the telemetry thread reads the buffer's state until it has ended.
        if self.learning is not None:
            self.learning.stop()

    # -- inference -----------------------------------------------------------------------

    def infer(self, model: str, inputs: dict[str, Array]) -> Answer:
        """The in-process API: the same path as the local HTTP API."""
        try:
            answer = self.router.infer(model, inputs)
        except EdgeFleetError as exc:
            self.meter.count("errors")
            if isinstance(exc, InferenceFailed):
                self.meter.count("engine_errors")
            raise
        self.meter.count(f"answers_{answer.source}")
        if answer.degraded:
            self.meter.count("degraded")
        if answer.routing_fallback is not None:
            # Calls whose spec's second opinion could not run (its plain policy routed).
            self.meter.count("routing_fallback")
        # Per row: the offload rate is rows_hard / rows_total (a hard row the cloud could
        # not answer still counts: the router decided to offload it).
        self.meter.count("rows_total", len(answer.rows))
        self.meter.count("rows_hard", answer.hard_rows)
        self.meter.count("rows_cloud", answer.cloud_rows)
        self.meter.count("rows_degraded", answer.degraded_rows)
        if answer.over_budget_rows:
            self.meter.count("rows_over_budget", answer.over_budget_rows)
        self.meter.observe_ms(answer.latency_ms)
        if self.learning is not None and answer.cloud_rows:
            self.learning.on_answer(model, inputs, answer)
        return answer

    # -- reporting -----------------------------------------------------------------------

    def reported(self) -> ReportedState:
        """What this device serves: the runtime's models, not what the store points at."""
        return ReportedState(
            rev_applied=self.store.state.rev_applied,
            active={name: m.version for name, m in self.runtime.models().items()},
            agent_version=__version__,
            capabilities={"download": self.settings.download_via, "threads": self.settings.threads},
        )

    def publish_reported(self) -> None:
        self.link.publish(
            self._topic(DeviceTopic.REPORTED), self.reported().model_dump_json(), qos=1, retain=True
        )

    def _publish_status(self, event: StatusEvent) -> None:
        if not self.link.publish(self._topic(DeviceTopic.STATUS), event.model_dump_json(), qos=1):
            # The link's queue is full (a long outage): say so rather than lose it quietly.
            self.meter.count("status_dropped")
            _LOGGER.warning(
                "status %s of %s rev %s could not be queued", event.state, event.model, event.rev
            )

    def _on_connected(self) -> None:
        """Runs on the MQTT thread after each CONNACK: report, and let the telemetry thread
        send what it kept while offline (it owns the outbox's publishing)."""
        self.publish_reported()
        self._telemetry_wake.set()

    def close_telemetry_window(self) -> None:
        """End the current telemetry window and queue it (sent by ``send_telemetry``)."""
        active = {name: m.version for name, m in self.runtime.models().items()}
        window = self.meter.snapshot(active, budget=self.budget.report(self.router.specs()))
        if self.learning is not None:
            window = window.model_copy(update={"learning": self.learning.state()})
        self.outbox.put(window.model_dump_json().encode())

    def send_telemetry(self) -> int:
        """Send the queued windows, oldest first, as far as the link takes them."""
        return self.outbox.flush(self._publish_telemetry)

    def _publish_telemetry(self, payload: bytes) -> bool:
        # Not connected means not sent, whatever publish says: paho drops QoS 0 offline.
        if not self.link.connected:
            return False
        return self.link.publish(self._topic(DeviceTopic.TELEMETRY), payload, qos=0)

    def _telemetry_loop(self) -> None:
        interval = self.settings.telemetry_interval_s
        next_at = time.monotonic() + interval
        while not self._stop.is_set():
            self._telemetry_wake.wait(max(0.0, next_at - time.monotonic()))
            self._telemetry_wake.clear()
            if self._stop.is_set():
                return
            try:
                if time.monotonic() >= next_at:
                    next_at = time.monotonic() + interval
                    self.close_telemetry_window()
                self.send_telemetry()
            except Exception:
                _LOGGER.exception("telemetry: this round failed; kept windows wait for the next")

    def prometheus(self) -> str:
        lines = ["# TYPE edgefleet_agent_events_total counter"]
        for name, value in sorted(self.meter.totals.items()):
            lines.append(f'edgefleet_agent_events_total{{kind="{name}"}} {value}')
        totals = self.meter.totals
        lines.append("# TYPE edgefleet_agent_offload_rate gauge")
        rate = totals["rows_hard"] / totals["rows_total"] if totals["rows_total"] else 0.0
        lines.append(f"edgefleet_agent_offload_rate {rate:.6g}")
        lines.append("# TYPE edgefleet_agent_latency_ms histogram")
        cumulative = 0
        for bound, count in zip(
            [*LATENCY_BOUNDS_MS, float("inf")], self.meter.total_buckets, strict=True
        ):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'edgefleet_agent_latency_ms_bucket{{le="{le}"}} {cumulative}')
        lines.append(f"edgefleet_agent_latency_ms_count {cumulative}")
        for name, loaded in sorted(self.runtime.models().items()):
            lines.append(f'edgefleet_agent_active_version{{model="{name}"}} {loaded.version}')
        lines.append(f"edgefleet_agent_mqtt_connected {int(self.link.connected)}")
        lines.append("# TYPE edgefleet_agent_telemetry_buffered gauge")
        lines.append(f"edgefleet_agent_telemetry_buffered {len(self.outbox)}")
        lines += self.budget.prometheus(self.router.specs())
        return "\n".join(lines) + "\n"
