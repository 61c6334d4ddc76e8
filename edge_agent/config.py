"""Agent configuration: a JSON file (written by `edge-agent enroll`) plus EDGEFLEET_AGENT_*
environment variables, validated once at start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.messages import RoutingSpec
from shared.mqtt_tls import MqttTls, parse_mqtt_url
from shared.signing import load_public_key
from shared.topics import validate_device_id

__all__ = ["AgentSettings", "load_settings"]

DEFAULT_DATA_DIR = Path("/var/lib/edgefleet-agent")


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_", extra="forbid")

    device_id: str
    token: str = Field(min_length=8)
    cloud_url: str = Field(pattern=r"^https?://")
    mqtt_url: str = Field(description="mqtt://host[:1883], or mqtts://host[:8883] for TLS")
    mqtt_ca_file: Path | None = Field(
        default=None,
        description="for an mqtts:// broker: the CA that signed its certificate (unset: the "
        "system's trust store); the broker's host name is always verified",
    )
    mqtt_cert_file: Path | None = Field(
        default=None, description="client certificate, for a broker that requires one"
    )
    mqtt_key_file: Path | None = Field(default=None, description="the client certificate's key")
    public_key: str
    data_dir: Path = DEFAULT_DATA_DIR
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8470, ge=0, le=65535)
    api_workers: int = Field(
        default=8, ge=1, le=256, description="threads answering local API requests"
    )
    api_max_connections: int = Field(
        default=64, ge=1, le=10_000, description="open local API connections; more wait"
    )
    api_read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="longest a client may take to send a request head or body, and longest "
        "an idle keep-alive connection is kept",
    )
    api_max_request_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, le=1 << 30, description="largest request body"
    )
    api_max_batch_rows: int = Field(
        default=1024, ge=1, description="most rows (first dimension) in one request's tensors"
    )
    threads: int = Field(default=1, ge=1, le=64)
    telemetry_interval_s: float = Field(default=10.0, gt=0)
    telemetry_buffer: int = Field(
        default=360, ge=1, le=100_000, description="windows kept while offline (oldest dropped)"
    )
    download_via: Literal["mqtt", "http"] = "mqtt"
    chunk_wait_s: float = Field(default=3.0, gt=0)
    download_max_stalls: int = Field(default=8, ge=1, description="requests without progress")
    # Longer than the cloud's longest wait before a pass (EDGEFLEET_CHUNK_PASS_MAX_WAIT_S, at
    # most 20 s): a device that asked while the cloud gathers a wave hears nothing meanwhile.
    download_give_up_s: float = Field(
        default=30.0, gt=0, description="a download fails only after this long without a chunk"
    )
    cloud_budget_s: float = Field(default=0.5, gt=0, description="latency budget for offload")
    cloud_breaker_failures: int = Field(
        default=3, ge=1, le=1000, description="consecutive cloud failures that open the breaker"
    )
    cloud_breaker_reset_s: float = Field(
        default=10.0, gt=0, le=3600, description="open breaker: seconds before one trial call"
    )
    routing_override: RoutingSpec | None = None
    # -- federated learning (edge_agent.learning): off unless turned on ------------------------
    federated: bool = Field(
        default=False, description="keep a sample buffer to learn from (and run a SuperNode)"
    )
    federated_superlink: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.\[\]:-]+:\d{1,5}$",
        description="host:port of the SuperLink's Fleet API; unset: a buffer, no SuperNode",
    )
    federated_root_certificates: Path | None = Field(
        default=None, description="CA of the SuperLink's TLS certificate (unset: system store)"
    )
    federated_insecure: bool = Field(
        default=False, description="plain HTTP to the SuperLink: development only"
    )
    federated_node_key: Path | None = Field(
        default=None,
        description="SuperNode authentication: this device's EC private key (OpenSSH format), "
        "its public key registered with the SuperLink",
    )
    federated_supernode: Path | None = Field(
        default=None,
        description="the flower-supernode to run (e.g. from a venv of its own); unset: the "
        "one beside this Python, else on PATH",
    )
    federated_runtime_port: int = Field(default=0, ge=0, le=65535)
    federated_connect_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    samples_max: int = Field(default=2000, ge=1, le=1_000_000)
    samples_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _federated(self) -> AgentSettings:
        if self.federated_insecure and self.federated_root_certificates is not None:
            raise ValueError(
                "federated_insecure and federated_root_certificates exclude each other"
            )
        if self.federated_insecure and self.federated_node_key is not None:
            raise ValueError(
                "SuperNode authentication (federated_node_key) needs TLS: drop federated_insecure"
            )
        for path in (self.federated_root_certificates, self.federated_node_key):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        return self

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return validate_device_id(value)

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        load_public_key(value)
        return value

    @model_validator(mode="after")
    def _tls(self) -> AgentSettings:
        tls = self.mqtt_tls
        if tls is not None and not parse_mqtt_url(self.mqtt_url).tls:
            raise ValueError(
                "mqtt_ca_file, mqtt_cert_file and mqtt_key_file are for a TLS broker: "
                f"mqtt_url {self.mqtt_url!r} must be mqtts://host[:port]"
            )
        if tls is not None:
            tls.check()
        return self

    @property
    def mqtt_tls(self) -> MqttTls | None:
        """TLS files for the broker connection (None: none given)."""
        return MqttTls.from_files(self.mqtt_ca_file, self.mqtt_cert_file, self.mqtt_key_file)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit arguments (the file's content) first, then the environment on top.
        return env_settings, init_settings


def load_settings(config_file: Path | None, **overrides: Any) -> AgentSettings:
    data: dict[str, Any] = {}
    if config_file is not None and config_file.exists():
        data = json.loads(config_file.read_text())
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AgentSettings(**data)
