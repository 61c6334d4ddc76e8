"""Federated learning's settings (env prefix ``EDGEFLEET_FEDERATED_``), validated once at start:
where the SuperLink listens, its TLS files, SuperNode authentication, and run defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FederatedSettings"]


class FederatedSettings(BaseSettings):
    """Kept apart from ``CloudSettings`` so that the SuperLink's process and the API's read
    the same variables without either needing the other's."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_FEDERATED_", extra="forbid")

    # The SuperLink's one HTTP port (Flower 1.41 serves its Fleet, Control and Runtime APIs
    # there). Not Flower's default 8000: that is the EdgeFleet API's.
    host: str = "127.0.0.1"
    port: int = Field(default=9092, ge=1, le=65535)
    # Where the cloud and `flwr` reach it (unset: host:port; 0.0.0.0 is asked on 127.0.0.1).
    address: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\[\]:-]+:\d{1,5}$")
    # TLS for every SuperLink API; required outside dev mode.
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
        return self

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def resolved_address(self) -> str:
        if self.address is not None:
            return self.address
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"
