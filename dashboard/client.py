"""The dashboard's only way to the cloud: its REST API over httpx, each failure turned into
an error that says what to do (API down, token refused, endpoint absent, request refused)."""

from __future__ import annotations

from typing import Any

import httpx

from dashboard.config import DashboardConfig

__all__ = [
    "ApiClient",
    "ApiError",
    "ApiUnauthorized",
    "ApiUnreachable",
    "NotFound",
    "Refused",
]


class ApiError(Exception):
    """Something the page says in one line instead of a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiUnreachable(ApiError):
    """No answer: the API is down, unreachable, too slow, or failing (5xx)."""


class ApiUnauthorized(ApiError):
    """401/403: the admin token is wrong."""


class NotFound(ApiError):
    """404: an unknown object, or an endpoint this cloud does not have (yet)."""


class Refused(ApiError):
    """Another 4xx: the request was refused, and the API said why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error
    return str(body)[:200]


class ApiClient:
    """Thread-safe (one httpx.Client, shared by the pages of every browser session)."""

    def __init__(self, config: DashboardConfig, *, transport: httpx.BaseTransport | None = None):
        self.config = config
        self._http = httpx.Client(
            base_url=config.api_url,
            headers={"Authorization": f"Bearer {config.token}"},
            timeout=config.timeout_s,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body).json()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.config.api_url
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiUnreachable(
                f"the EdgeFleet API at {url} did not answer {method} {path} within "
                f"{self.config.timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiUnreachable(
                f"cannot reach the EdgeFleet API at {url} ({type(exc).__name__}: {exc}); is "
                "`edgefleet serve` running, and is EDGEFLEET_DASHBOARD_API_URL right?"
            ) from None
        status = response.status_code
        if status < 400:
            return response
        reason = _reason(response)
        if status in (401, 403):
            raise ApiUnauthorized(
                f"the API at {url} refused the admin token ({status}: {reason}); set "
                "EDGEFLEET_DASHBOARD_TOKEN to the cloud's EDGEFLEET_ADMIN_TOKEN"
            )
        if status == 404:
            raise NotFound(reason)
        if status >= 500:
            raise ApiUnreachable(f"the API at {url} failed on {method} {path} ({status}: {reason})")
        raise Refused(reason, status)
