"""The dashboard's configuration, from the environment: which API, which admin token, how
often pages refresh. Read once per page run; a bad value is a message, not a traceback."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ConfigError", "DashboardConfig"]

DEFAULT_API_URL = "http://127.0.0.1:8000"


class ConfigError(Exception):
    """The environment does not say how to reach the API."""


class DashboardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_url: str = DEFAULT_API_URL
    token: str = Field(min_length=1)
    # Live parts of each page refresh this often (0: only when the operator acts).
    refresh_s: float = Field(default=5.0, ge=0, le=3600)
    timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("api_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"the API URL must start with http:// or https://, not {value!r}")
        return value.rstrip("/")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DashboardConfig:
        """EDGEFLEET_DASHBOARD_API_URL, EDGEFLEET_DASHBOARD_TOKEN (else the cloud's own
        EDGEFLEET_ADMIN_TOKEN), EDGEFLEET_DASHBOARD_REFRESH_S, EDGEFLEET_DASHBOARD_TIMEOUT_S."""
        env = os.environ if env is None else env
        token = env.get("EDGEFLEET_DASHBOARD_TOKEN") or env.get("EDGEFLEET_ADMIN_TOKEN")
        if not token:
            raise ConfigError(
                "no admin token: set EDGEFLEET_DASHBOARD_TOKEN (or EDGEFLEET_ADMIN_TOKEN) to "
                "the cloud's admin token"
            )
        values: dict[str, str] = {"token": token}
        for field, name in (
            ("api_url", "EDGEFLEET_DASHBOARD_API_URL"),
            ("refresh_s", "EDGEFLEET_DASHBOARD_REFRESH_S"),
            ("timeout_s", "EDGEFLEET_DASHBOARD_TIMEOUT_S"),
        ):
            if env.get(name):
                values[field] = env[name]
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"dashboard configuration: {where}: {first['msg']}") from None
