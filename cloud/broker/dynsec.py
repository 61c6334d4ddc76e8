"""A client for Mosquitto's `$CONTROL/dynamic-security/v1`: commands out, correlated answers in."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.broker.accounts import CONTROL_TOPIC
from shared.errors import ServiceUnavailable
from shared.mqtt_tls import MqttTls, parse_mqtt_url, tls_context

__all__ = ["Command", "DynsecClient", "DynsecRefused"]

_LOGGER = logging.getLogger(__name__)
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"


class DynsecRefused(ServiceUnavailable):
    """The plugin answered a command with an error (e.g. "Client already exists")."""

    def __init__(self, command: str, error: str, subject: str = "") -> None:
        about = f" for {subject!r}" if subject else ""
        super().__init__(f"the broker refused {command}{about}: {error}")
        self.command = command
        self.error = error


@dataclass(frozen=True, slots=True)
class Command:
    """One plugin command; an error listed in ``tolerate`` counts as done (idempotent steps)."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    tolerate: Collection[str] = ()

    @property
    def subject(self) -> str:
        return str(self.args.get("username") or self.args.get("rolename") or "")


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.responses: list[dict[str, Any]] | None = None


class DynsecClient:
    """A dedicated admin connection; use as a context manager, or ``connect()``/``close()``.

    Every request carries a fresh correlation id, so answers are matched to their request
    even when several threads share one connection. Every wait is bounded by ``timeout``:
    a broker that is down, refuses the login or never answers is a ``ServiceUnavailable``.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str,
        password: str,
        timeout: float = 3.0,
        client_id: str | None = None,
        tls: MqttTls | None = None,
    ) -> None:
        """``mqtts://`` connects over TLS with ``tls`` (None: the system's trust store)."""
        endpoint = parse_mqtt_url(url)
        context = tls_context(endpoint, tls)
        self.host, self.port = endpoint.host, endpoint.port
        self.timeout = timeout
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._refusal: str | None = None
        self._sub_mid: int | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgefleet-dynsec-{uuid.uuid4().hex[:12]}",
            clean_session=True,
            reconnect_on_failure=False,
        )
        self._client.connect_timeout = timeout
        if context is not None:
            self._client.tls_set_context(context)
        self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- connection ------------------------------------------------------------------------

    def connect(self) -> None:
        where = f"{self.host}:{self.port}"
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise ServiceUnavailable(f"TLS with the MQTT broker at {where} failed: {exc}") from exc
        except OSError as exc:
            raise ServiceUnavailable(f"the MQTT broker at {where} is unreachable: {exc}") from exc
        self._client.loop_start()
        try:
            self._await(self._connected, f"no CONNACK from the MQTT broker at {where}")
            # Held across the call: the SUBACK may be handled before subscribe() returns.
            with self._lock:
                self._sub_mid = self._client.subscribe(RESPONSE_TOPIC, qos=1)[1]
            self._await(self._subscribed, f"no SUBACK from the MQTT broker at {where}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> DynsecClient:
        self.connect()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def _await(self, event: threading.Event, silence: str) -> None:
        if not event.wait(self.timeout):
            raise ServiceUnavailable(self._refusal or f"{silence} within {self.timeout:g}s")
        if self._refusal is not None:
            raise ServiceUnavailable(self._refusal)

    # -- requests --------------------------------------------------------------------------

    def request(self, commands: Sequence[Command]) -> list[dict[str, Any]]:
        """Send ``commands`` in one message; return each one's answer, in order (raw)."""
        if self._refusal is not None:
            raise ServiceUnavailable(self._refusal)
        correlation = uuid.uuid4().hex
        pending = _Pending()
        with self._lock:
            self._pending[correlation] = pending
        body = {
            "commands": [
                {"command": c.name, **c.args, "correlationData": correlation} for c in commands
            ]
        }
        try:
            info = self._client.publish(CONTROL_TOPIC, json.dumps(body), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise ServiceUnavailable(
                    f"could not send to the broker: {mqtt.error_string(info.rc)}"
                )
            self._await(
                pending.done,
                "no answer from the broker's dynamic-security plugin (is it loaded, and is the "
                "cloud's login its admin?)",
            )
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        responses = pending.responses or []
        if len(responses) != len(commands):
            raise ServiceUnavailable(
                f"the dynamic-security plugin answered {len(responses)} of {len(commands)} commands"
            )
        return responses

    def run(self, commands: Sequence[Command]) -> list[dict[str, Any]]:
        """Like :meth:`request`, but an untolerated error raises; returns each ``data``."""
        results = []
        for command, response in zip(commands, self.request(commands), strict=True):
            error = response.get("error")
            if error and error not in command.tolerate:
                raise DynsecRefused(command.name, str(error), command.subject)
            data = response.get("data")
            results.append(data if isinstance(data, dict) and not error else {})
        return results

    def get_client(self, username: str) -> dict[str, Any] | None:
        """The plugin's record of ``username``, or None when there is none."""
        command = Command("getClient", {"username": username}, tolerate={"Client not found"})
        client = self.run([command])[0].get("client")
        return client if isinstance(client, dict) else None

    # -- paho callbacks (network thread) ---------------------------------------------------

    def _on_connect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._refusal = f"the MQTT broker refused the cloud's login: {reason}"
        self._connected.set()

    def _on_subscribe(
        self, _client: Any, _userdata: Any, mid: int, reasons: Any, _props: Any
    ) -> None:
        with self._lock:
            if mid != self._sub_mid:
                return
        if not reasons or reasons[0].is_failure:
            self._refusal = (
                "the cloud's broker login may not use dynamic security (subscribing to "
                f"{RESPONSE_TOPIC} was refused)"
            )
        self._subscribed.set()

    def _on_disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if self._refusal is None:
            self._refusal = f"the MQTT broker closed the connection: {reason}"
        # Wake every waiter: an answer will not come on a closed connection.
        self._connected.set()
        self._subscribed.set()
        with self._lock:
            for pending in self._pending.values():
                pending.done.set()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
            correlation = responses[0]["correlationData"]
        except (ValueError, KeyError, IndexError, TypeError):
            _LOGGER.warning("unreadable dynamic-security answer on %s", message.topic)
            return
        with self._lock:
            pending = self._pending.get(correlation)
        if pending is None:
            # Every admin connection receives every answer (the plugin has one response
            # topic): another connection's answer is expected, not a fault.
            _LOGGER.debug("dynamic-security answer for no request of ours (%s)", correlation)
            return
        pending.responses = [r for r in responses if isinstance(r, dict)]
        pending.done.set()
