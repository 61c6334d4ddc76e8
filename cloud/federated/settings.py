"""Federated learning's settings (env prefix ``EDGEFLEET_FEDERATED_``), validated once at start:
where the devices' fleet gateway and the SuperLink behind it listen, the TLS files, SuperNode
authentication, and run defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FederatedSettings"]


class FederatedSettings(BaseSettings):
    """Kept apart from ``CloudSettings`` so that the SuperLink's process and the API's read
    the same variables without either needing the other's."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FEDERATED_", extra="forbid")

    # The port devices reach: the fleet gateway (cloud.federated.gateway), which forwards only
    # the Fleet API SuperNodes call. Not Flower's default 8000: that is the EdgeFleet API's.
    host: str = "127.0.0.1"
    port: int = Field(default=9092, ge=1, le=65535)
    # The largest request body the gateway forwards (Flower reads each one whole into
    # memory). Flower pushes a model's arrays in objects of at most 5 MiB each; 256 MiB is
    # headroom for heads and FABs far larger than ours. Larger: a JSON 413.
    max_body_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, le=4 * 1024**3)
    # The gateway's port faces the devices' networks: a request head not all in this long
    # after its connection (or the last answer on it) is a JSON 408 and the connection ends;
    # one address holds at most this many connections at once (0: no cap; devices behind
    # one NAT share an address); a request body slower on average than this many bytes/s
    # after its first 10 s is a 408 (0: no floor).
    head_timeout_s: float = Field(default=15.0, gt=0, le=300)
    connections_per_address: int = Field(default=256, ge=0, le=1_000_000)
    min_body_rate: float = Field(default=1024.0, ge=0, le=1024**3)
    # The SuperLink's own port, on 127.0.0.1 only: Flower 1.41 serves its Fleet, Control
    # (start a run = run code on the cloud) and Runtime APIs on one port, so devices must
    # never reach it. Unset: port + 1 (port - 1 for 65535), the same in every process.
    internal_port: int | None = Field(default=None, ge=1, le=65535)
    # Where the cloud's `flwr` calls reach the SuperLink's Control API (unset: 127.0.0.1 on
    # the internal port). The gateway refuses the Control API: never point this at `port`.
    address: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\[\]:-]+:\d{1,5}$")
    # TLS for the gateway and the SuperLink behind it; required outside dev mode.
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_ca_certfile: Path | None = None
    # Only SuperNodes whose public keys were registered (`edgefleet federated register-node`)
    # may connect; needs TLS.
    supernode_auth: bool = False
    # How long a run waits for its minimum number of devices before it ends TOO_FEW_CLIENTS.
    wait_for_clients_s: float = Field(default=120.0, gt=0, le=86400)
    # How long a round waits for replies; a device that has not answered by then is dropped
    # from the run (its update, if it comes later, is not used).
    round_timeout_s: float = Field(default=120.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _tls(self) -> FederatedSettings:
        files = (self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile)
        if any(f is not None for f in files) and not all(f is not None for f in files):
            raise ValueError(
                "EDGEFLEET_FEDERATED_SSL_CERTFILE, _SSL_KEYFILE and _SSL_CA_CERTFILE go together"
            )
        for path in files:
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        if self.supernode_auth and not self.tls:
            raise ValueError("EDGEFLEET_FEDERATED_SUPERNODE_AUTH needs the SuperLink's TLS files")
        if self.superlink_port == self.port:
            raise ValueError(
                "EDGEFLEET_FEDERATED_INTERNAL_PORT must differ from EDGEFLEET_FEDERATED_PORT"
            )
        if self.address is not None and self.address.rpartition(":")[2] == str(self.port):
            # Before issue 11 this was the SuperLink's one port; now the gateway's, which
            # refuses the Control API every `flwr` call needs.
            raise ValueError(
                "EDGEFLEET_FEDERATED_ADDRESS names EDGEFLEET_FEDERATED_PORT, the devices' fleet "
                "gateway, which serves no Control API: unset it (the cloud then calls "
                "127.0.0.1 on EDGEFLEET_FEDERATED_INTERNAL_PORT)"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def superlink_port(self) -> int:
        if self.internal_port is not None:
            return self.internal_port
        return self.port + 1 if self.port < 65535 else self.port - 1

    @property
    def control_address(self) -> str:
        """Where the cloud's `flwr` calls reach the SuperLink's Control API."""
        if self.address is not None:
            return self.address
        return f"127.0.0.1:{self.superlink_port}"

    @property
    def fleet_address(self) -> str:
        """The gateway as a SuperNode on this host reaches it (0.0.0.0 is asked on 127.0.0.1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"
