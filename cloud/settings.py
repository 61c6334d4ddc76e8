"""Cloud configuration, validated once at start (env prefix ``EDGEFLEET_``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.mqtt_tls import MqttTls, parse_mqtt_url

__all__ = ["DEV_ADMIN_TOKEN", "CloudSettings"]

DEV_ADMIN_TOKEN = "edgefleet-dev-admin-token"  # noqa: S105 - refused outside dev mode


class CloudSettings(BaseSettings):
    """Unset URLs mean "start the embedded default" (SQLite file, child broker, child Redis)."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="forbid")

    data_dir: Path = Path(".edgefleet")
    database_url: str | None = None
    mqtt_url: str | None = None
    redis_url: str | None = None
    admin_token: str = DEV_ADMIN_TOKEN
    dev_mode: bool = False
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    # The cloud's own broker login (production ACLs give it edgefleet/v1/#).
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    # TLS to the broker, for EDGEFLEET_MQTT_URL=mqtts://host[:8883]: the CA that signed its
    # certificate (unset: the system's trust store) and, for a broker that asks for one
    # (require_certificate true), the cloud's client certificate and key. The broker's host
    # name is always verified. Every connection the cloud makes to the broker uses them.
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    # The fleet service's MQTT client id: the same at every start, so the broker keeps its
    # persistent session (what devices said while it was down). One per replica, e.g.
    # edgefleet-cloud-0; unset: edgefleet-cloud-<random>, made once and kept in the data dir.
    mqtt_client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Several replicas (each with its own client id) split device topics through
    # $share/edgefleet-cloud/…. Off by default: Mosquitto 2.0 gives a share of the messages to
    # offline members too, so a replica removed for good must have its session removed (or
    # expire). Never used with the embedded broker (rumqttd cannot restore such a session).
    mqtt_shared_subscription: bool = False
    # How often the rollout engine looks at active rollouts (it is also woken by the API).
    rollout_tick_s: float = Field(default=0.5, gt=0, le=60)
    # The rollout engine's lease in Redis: a replica that dies is replaced this soon.
    rollout_lease_s: float = Field(default=10.0, ge=1, le=600)
    # Devices the rollout engine moves in one transaction (their new revs, signed documents
    # and targets), then hands to the broker; the lease is checked between batches.
    rollout_batch_size: int = Field(default=50, ge=1, le=1000)
    # The documents of a wave go to the broker together once all are written, so its devices
    # share the chunk carousel's passes; a wave that takes longer to write is released in
    # parts this often (the most a device waits for the rest of its wave).
    rollout_release_after_s: float = Field(default=10.0, ge=0, le=120)
    # -- telemetry history (cloud.history): per device per minute in SQL -------------------
    # Minutes older than this are deleted (checked every prune interval); windows are summed
    # in memory and written every flush interval (what a hard crash may lose of telemetry).
    history_retention_days: float = Field(default=14.0, gt=0, le=3650)
    history_prune_interval_s: float = Field(default=600.0, ge=1, le=86400)
    history_flush_s: float = Field(default=5.0, gt=0, le=300)
    # The broker address devices are told at enrollment (production: the public one).
    device_mqtt_url: str | None = None
    chunk_size: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    # The chunk carousel (cloud/fleet/chunks.py): at most this many chunks unacknowledged by
    # the broker at a time; a pass over an artifact waits for the devices still joining at
    # most this long once the one before is over — silence for a device that asked, so kept
    # well below the 30 s an agent waits without a chunk before it gives a download up
    # (edge_agent/config.py download_give_up_s). A chunk lost on its way costs up to the
    # carousel's silence grace too (Pacing.silence_grace_s, 12 s; the agent says it lost
    # the chunks after 12 s without one): the two together may reach that 30 s only while a
    # wave keeps joining the artifact's next pass.
    chunk_max_in_flight: int = Field(default=8, ge=1, le=100)
    chunk_pass_max_wait_s: float = Field(default=15.0, ge=0, le=20)
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Who gives devices their broker login at enrollment: nobody ("none": the embedded broker
    # has no authentication) or Mosquitto's dynamic-security plugin ("dynsec"), administered
    # with the cloud's own login above (deploy/mosquitto/README.md).
    broker_accounts: Literal["none", "dynsec"] = "none"
    # With "dynsec", the cloud's admin password and every device's token are MQTT passwords:
    # outside dev mode a plain mqtt:// URL to a broker off this host is refused, unless this
    # says the network is private (the operator's call, on purpose).
    allow_plaintext_mqtt: bool = False
    broker_timeout_s: float = Field(default=3.0, gt=0, le=60)
    # The broker started when no mqtt_url is set: "auto" is Mosquitto with per-device logins
    # where the machine has it (and its dynamic-security plugin), else rumqttd, which has no
    # authentication at all.
    embedded_broker: Literal["auto", "mosquitto", "rumqttd"] = "auto"
    # A signed desired state is valid this long; the fleet service looks this often for
    # documents with less than a third of their lifetime left and re-signs them.
    desired_lifetime_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    desired_renewal_interval_s: float = Field(default=600.0, gt=0)
    # -- the inference service (cloud.inference) ----------------------------------------------
    # KServe v2 gRPC beside the REST routes: unset is api_port + 1 (a free port when api_port
    # is 0); 0 picks a free port.
    grpc_port: int | None = Field(default=None, ge=0, le=65535)
    grpc_workers: int = Field(default=16, ge=1, le=256)
    # Execution providers in order of preference; those onnxruntime lists are used.
    inference_providers: list[str] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
        min_length=1,
    )
    inference_threads: int = Field(default=0, ge=0, le=256)  # per session; 0: onnxruntime's
    # Warm sessions kept within this many bytes of ONNX (least recently used evicted first).
    inference_memory_bytes: int = Field(default=2 * 1024**3, ge=1024)
    # Dynamic batching defaults; a version's ONNX metadata may set its own
    # (edgefleet.max_batch_size, edgefleet.max_queue_delay_ms). A delay of 0 (Triton's default
    # too) batches what queued while the engine was busy and never holds a lone request
    # back; B3 measured a 2 ms delay costing more than it gained on a fast model.
    inference_max_batch_size: int = Field(default=32, ge=1, le=4096)
    inference_max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000)
    # Requests waiting per model version; past it the answer is 503 with Retry-After.
    inference_max_queue: int = Field(default=256, ge=1, le=100_000)
    # A request still queued after this long is answered 503: no wait is unbounded.
    inference_queue_timeout_s: float = Field(default=10.0, gt=0, le=600)
    inference_max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    inference_max_request_rows: int = Field(default=1024, ge=1)
    # Tokens and model versions are read from SQL at most this often (a rotated token keeps
    # working up to this long; a new "latest" is seen within it).
    inference_token_ttl_s: float = Field(default=10.0, ge=0, le=3600)
    inference_catalog_ttl_s: float = Field(default=5.0, ge=0, le=3600)
    # Per-device requests per window (Redis); 0 turns the limit off.
    inference_rate_limit: int = Field(default=0, ge=0)
    inference_rate_window_s: float = Field(default=1.0, gt=0, le=3600)
    # Answers kept in Redis by model, version and input hash.
    inference_result_cache: bool = False
    inference_result_cache_ttl_s: float = Field(default=60.0, gt=0, le=86400)
    inference_result_cache_max_bytes: int = Field(default=1024 * 1024, ge=0)
    # -- the offload budget (cloud.inference.budget; topic cloud/budget) ----------------------
    # When the queue wait stays past the bound for hold_s, devices are told (retained MQTT) to
    # offload less, cut again every hold_s while it lasts; once no replica is saturated the
    # budget relaxes a step every relax_s, then clears. A budget not renewed within ttl_s
    # expires on the devices (a dead cloud does not throttle them forever).
    inference_budget: bool = True
    inference_budget_queue_ms: float = Field(default=100.0, gt=0, le=60_000)
    inference_budget_hold_s: float = Field(default=2.0, gt=0, le=600)
    inference_budget_relax_s: float = Field(default=5.0, gt=0, le=3600)
    inference_budget_ttl_s: float = Field(default=30.0, gt=0, le=86_400)
    inference_budget_min: float = Field(default=0.01, ge=0, lt=1)
    inference_budget_interval_s: float = Field(default=0.5, gt=0, le=60)

    @model_validator(mode="after")
    def _no_default_secret_in_production(self) -> CloudSettings:
        if not self.dev_mode and self.admin_token == DEV_ADMIN_TOKEN:
            raise ValueError(
                "EDGEFLEET_ADMIN_TOKEN is the built-in development token; set a secret "
                "(e.g. `openssl rand -hex 32`) or run in dev mode (EDGEFLEET_DEV_MODE=1)"
            )
        if len(self.admin_token) < 16:
            raise ValueError("EDGEFLEET_ADMIN_TOKEN must be at least 16 characters")
        self._broker_urls_and_tls()
        self._no_logins_in_clear()
        if self.broker_accounts == "dynsec" and not (self.mqtt_username and self.mqtt_password):
            raise ValueError(
                "EDGEFLEET_BROKER_ACCOUNTS=dynsec needs EDGEFLEET_MQTT_USERNAME and "
                "EDGEFLEET_MQTT_PASSWORD: the cloud's broker login, admin of dynamic security"
            )
        if self.inference_budget_ttl_s < 4 * self.inference_budget_interval_s:
            raise ValueError(
                "EDGEFLEET_INFERENCE_BUDGET_TTL_S must be at least 4 x "
                "EDGEFLEET_INFERENCE_BUDGET_INTERVAL_S, or a budget expires before it is renewed"
            )
        if self.desired_renewal_interval_s >= self.desired_lifetime_s / 3:
            raise ValueError(
                "EDGEFLEET_DESIRED_RENEWAL_INTERVAL_S must be under a third of "
                "EDGEFLEET_DESIRED_LIFETIME_S, or documents expire before they are renewed"
            )
        return self

    def _broker_urls_and_tls(self) -> None:
        for url in (self.mqtt_url, self.device_mqtt_url):
            if url is not None:
                parse_mqtt_url(url)
        tls = self.mqtt_tls
        if tls is None:
            return
        if self.mqtt_url is None or not parse_mqtt_url(self.mqtt_url).tls:
            raise ValueError(
                "EDGEFLEET_MQTT_CA_FILE, _CERT_FILE and _KEY_FILE are for a TLS broker: set "
                "EDGEFLEET_MQTT_URL=mqtts://host[:port] (the embedded broker has no TLS)"
            )
        tls.check()

    def _no_logins_in_clear(self) -> None:
        if self.dev_mode or self.broker_accounts != "dynsec" or self.allow_plaintext_mqtt:
            return
        urls = (("EDGEFLEET_MQTT_URL", self.mqtt_url),
                ("EDGEFLEET_DEVICE_MQTT_URL", self.device_mqtt_url))  # fmt: skip
        for name, url in urls:
            endpoint = None if url is None else parse_mqtt_url(url)
            if endpoint is None or endpoint.tls or _loopback(endpoint.host):
                continue
            raise ValueError(
                f"{name} is plain MQTT to {endpoint.host}:{endpoint.port} while "
                "EDGEFLEET_BROKER_ACCOUNTS=dynsec: the cloud's admin password and every "
                "device's token would cross the network in clear. Use mqtts:// (see "
                "EDGEFLEET_MQTT_CA_FILE), or set EDGEFLEET_ALLOW_PLAINTEXT_MQTT=true if this "
                "network is private"
            )

    @property
    def mqtt_tls(self) -> MqttTls | None:
        """TLS files for the cloud's broker connections (None: none given)."""
        return MqttTls.from_files(self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @property
    def resolved_grpc_port(self) -> int:
        if self.grpc_port is not None:
            return self.grpc_port
        return self.api_port + 1 if 0 < self.api_port < 65535 else 0

    @property
    def artifact_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def signing_key_path(self) -> Path:
        return self.data_dir / "keys" / "signing_ed25519.pem"


def _loopback(host: str) -> bool:
    """A broker on this host: its logins never leave the machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
