"""FleetService: publishes desired state, serves artifact chunks, ingests what devices say
(presence, reported state, deployment status, telemetry) into SQL history and Redis, over
one persistent MQTT session (DESIGN.md §3, the cloud's session)."""

from __future__ import annotations

import logging
import re
import uuid

from cloud.context import CloudContext
from cloud.fleet.access import ArtifactAccess
from cloud.fleet.carousel import Pacing
from cloud.fleet.chunks import ChunkBroadcaster
from cloud.fleet.ingest import KINDS, Ingest
from cloud.fleet.keeper import DesiredStateKeeper
from cloud.fleet.watch import BROKER_STATS, BrokerWatch
from cloud.history.rollup import HistoryWriter
from cloud.registry.fleet_queries import device_events, event_public
from cloud.registry.tables import Artifact
from cloud.rollout.engine import RolloutEngine
from cloud.rollout.leader import Leadership
from cloud.settings import CloudSettings
from shared import topics
from shared.errors import EdgeFleetError
from shared.messages import ArtifactRequest, DesiredState, decode
from shared.mqtt_link import MqttLink
from shared.retry import Backoff
from shared.topics import DeviceTopic

__all__ = ["FleetService", "fleet_client_id"]

_LOGGER = logging.getLogger(__name__)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def fleet_client_id(settings: CloudSettings) -> str:
    """The same id at every start, so the broker keeps our session while we are away: the
    configured one (one per replica), else one made once and kept in the data dir."""
    if settings.mqtt_client_id:
        return settings.mqtt_client_id
    path = settings.data_dir / "mqtt-client-id"
    try:
        kept = path.read_text().strip()
        if _CLIENT_ID.fullmatch(kept):
            return kept
    except FileNotFoundError:
        pass
    made = f"edgefleet-cloud-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(made + "\n")
    return made


class FleetService:
    def __init__(self, context: CloudContext) -> None:
        self.context = context
        # Replicas split the ingest through a shared subscription when asked to; never on the
        # embedded broker (rumqttd 0.20 panics when a persistent session holding one returns).
        self.shared = (
            context.settings.mqtt_shared_subscription and "mqtt" not in context.urls.embedded
        )
        # A persistent session: QoS 1 reports sent while we are down wait for us on the broker,
        # and one is acked only once stored (the ingest acks after its commit).
        self.link = MqttLink(
            context.urls.mqtt_url,
            client_id=fleet_client_id(context.settings),
            username=context.settings.mqtt_username,
            password=context.settings.mqtt_password,
            on_connected=self._republish_desired,
            clean_session=False,
            manual_ack=True,
            tls=context.settings.mqtt_tls,
            on_published=lambda: self.chunks.acked(),
        )
        settings = context.settings
        self.history = HistoryWriter(
            context.database,
            flush_s=settings.history_flush_s,
            retention_s=settings.history_retention_days * 86400,
            prune_s=settings.history_prune_interval_s,
        )
        self.ingest = Ingest(context, history=self.history)
        # The broker's $SYS counters, on a connection of their own: some brokers (rumqttd)
        # close a connection that subscribes to $SYS, and it must not be the ingest's.
        self.broker = BrokerWatch()
        self.broker_link = MqttLink(
            context.urls.mqtt_url,
            client_id=f"{self.link.client_id}-sys",
            username=context.settings.mqtt_username,
            password=context.settings.mqtt_password,
            backoff=Backoff(base=10.0, cap=600.0),
            tls=context.settings.mqtt_tls,
        )
        # The carousel goes at the broker's pace: at most so many chunks unacknowledged.
        self.chunks = ChunkBroadcaster(
            context.artifacts,
            lambda topic, payload: self.link.publish(topic, payload, qos=1),
            chunk_size_of=self._chunk_size,
            allowed=lambda asks: self.access.allowed_many(asks),
            in_flight=lambda: self.link.in_flight,
            max_in_flight=context.settings.chunk_max_in_flight,
            pacing=Pacing(max_wait_s=context.settings.chunk_pass_max_wait_s),
        )
        self._chunk_sizes: dict[str, int] = {}
        self.access = ArtifactAccess(context)
        self.desired = DesiredStateKeeper(context, self._publish_retained)
        # Every replica runs one; only the one holding the lease acts.
        self.rollouts = RolloutEngine(
            context, self.desired.publish, tick_s=context.settings.rollout_tick_s,
            leadership=Leadership(context.redis, ttl_s=context.settings.rollout_lease_s),
            publish_many=self.desired.publish_many,
        )  # fmt: skip

    def start(self, *, timeout: float = 10.0) -> None:
        for kind in KINDS:
            self.link.subscribe_inbound(
                topics.fleet_filter(kind, shared=self.shared), self.ingest.submit, qos=1
            )
        self.link.subscribe(
            topics.fleet_filter(DeviceTopic.ARTIFACT_REQUEST, shared=self.shared),
            self._on_artifact_request,
            qos=1,
        )
        for stat in BROKER_STATS:  # Mosquitto's $SYS counters; other brokers stay silent
            self.broker_link.subscribe(stat, self.broker.on_stat, qos=0)
        self.history.start()
        self.ingest.start()
        self.chunks.start()
        self.desired.start()
        self.link.start()
        self.rollouts.start()
        self.broker_link.start()
        if not self.link.wait_connected(timeout):
            _LOGGER.warning("fleet service not connected to the broker yet; retrying in background")

    def stop(self, *, forget_session: bool = False) -> None:
        """Stop; the broker keeps our session (and queues device reports) for the next start,
        unless ``forget_session`` (a cloud that will not come back under this client id)."""
        self.rollouts.stop()
        self.desired.stop()
        self.chunks.stop()
        # Store and ack what is queued while the link is still up; what arrives meanwhile
        # stays unacknowledged in our session for the next start.
        self.ingest.stop()
        self.history.stop()
        self.link.stop()
        self.broker_link.stop(timeout=2.0)
        if forget_session:
            self.link.forget_session()

    # -- desired state -------------------------------------------------------------------

    def deploy(
        self, *, device_id: str, model: str, version: int, rollout_id: int | None = None
    ) -> DesiredState:
        """Point ``device_id`` at ``model:version``: a new rev, signed and stored in SQL under
        the device's row lock, then published (see ``DesiredStateKeeper``)."""
        return self.desired.deploy(
            device_id=device_id, model=model, version=version, rollout_id=rollout_id
        )

    def _publish_retained(self, topic: str, payload: str) -> bool:
        """The keeper's way out. A new desired document is committed before it is published:
        what the device may download is read again before it can ask for the new artifact."""
        device_id = topics.parse(topic).device_id
        if device_id is not None:
            self.access.forget(device_id)
        return self.link.publish(topic, payload, retain=True)

    def _republish_desired(self) -> None:
        """Retained documents die with a broker that keeps nothing: give them back from SQL
        (on the keeper's thread, not on the network thread that calls this)."""
        self.desired.request_republish()

    # -- artifacts -----------------------------------------------------------------------

    def _chunk_size(self, sha256: str) -> int | None:
        size = self._chunk_sizes.get(sha256)
        if size is None:
            with self.context.database.session() as s:
                artifact = s.get(Artifact, sha256)
                if artifact is None:
                    return None
                size = self._chunk_sizes[sha256] = artifact.chunk_size
        return size

    def _on_artifact_request(self, topic: str, payload: bytes) -> None:
        """Honoured only for an artifact in the asking device's own desired state (checked
        by the broadcaster): any other request (a stranger's model, a cloud-only one) is
        refused, or anyone able to publish a request could make the cloud broadcast any
        artifact to the whole broker."""
        try:
            device_id = topics.parse(topic).device_id
            self.chunks.request(decode(ArtifactRequest, payload), device_id)
        except EdgeFleetError as exc:  # malformed
            _LOGGER.warning("ignored %s: %s", topic, exc.message)

    # -- history -----------------------------------------------------------------------

    def events(self, device_id: str, limit: int = 100) -> list[dict[str, object]]:
        with self.context.database.session() as s:
            rows, _next = device_events(s, device_id=device_id, limit=limit)
            return [event_public(r) for r in rows]
