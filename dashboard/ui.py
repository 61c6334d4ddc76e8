"""What every page shares: its configuration and API client, errors shown as one clear
message (never a traceback), live parts that refresh in place, time ranges and formatting."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient, ApiError, ApiUnauthorized, ApiUnreachable, NotFound
from dashboard.config import ConfigError, DashboardConfig
from shared.errors import ProtocolError
from shared.topics import validate_device_id

__all__ = [
    "RANGES",
    "Render",
    "device_id",
    "frame",
    "history",
    "live",
    "not_available",
    "optional",
    "percent",
    "run_page",
    "show_error",
    "summary_cached",
    "time_range",
    "when",
    "window",
]

_LOGGER = logging.getLogger(__name__)

Render = Callable[[ApiClient], None]
RANGES: dict[str, timedelta] = {
    "last hour": timedelta(hours=1),
    "last 6 hours": timedelta(hours=6),
    "last 24 hours": timedelta(hours=24),
    "last 7 days": timedelta(days=7),
}


@st.cache_resource(show_spinner=False)
def _client(config: DashboardConfig) -> ApiClient:
    # One client (one connection pool) per configuration, shared by every browser session.
    return ApiClient(config)


def show_error(exc: Exception) -> None:
    """One line that says what is wrong and what to do; details go to the log only."""
    if isinstance(exc, ApiUnreachable):
        st.error(f"The EdgeFleet API is unavailable: {exc.message}", icon=":material/power_off:")
    elif isinstance(exc, ApiUnauthorized):
        st.error(f"Not authorized: {exc.message}", icon=":material/key:")
    elif isinstance(exc, ApiError):
        st.error(exc.message)
    elif isinstance(exc, ConfigError):
        st.error(str(exc), icon=":material/settings:")
    else:
        _LOGGER.exception("dashboard page failed")
        st.error(f"This page failed: {type(exc).__name__}: {exc}. The dashboard's log has more.")


def run_page(title: str, render: Render) -> None:
    """A page: its title, then ``render`` with the API client, any failure one message."""
    st.title(title)
    try:
        config = DashboardConfig.from_env()
    except ConfigError as exc:
        show_error(exc)
        return
    try:
        render(_client(config))
    except Exception as exc:  # st.rerun and st.stop raise BaseException: they pass through
        show_error(exc)


def live(api: ApiClient, body: Render) -> None:
    """``body`` as a fragment that refreshes itself in place every ``refresh_s`` (only it
    reruns: the filters around it keep their state and the page does not flicker)."""
    every = api.config.refresh_s or None

    @st.fragment(run_every=every)
    def _part() -> None:
        try:
            body(api)
        except Exception as exc:
            show_error(exc)

    _part()


def device_id(typed: str) -> str | None:
    """What the operator typed, if a device may have it as its id; else None, and a warning.
    It goes into a URL path: "." or "cam-1?x" would ask for another URL (another device's,
    or the list's) and show what that answers as this device's."""
    try:
        return validate_device_id(typed)
    except ProtocolError:
        st.warning(
            f"{typed!r} is not a device id: 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or a digit."
        )
        return None


def not_available(what: str, path: str) -> None:
    st.info(
        f"{what} is not available on this cloud yet (GET {path} answered 404).",
        icon=":material/info:",
    )


def time_range(key: str) -> timedelta:
    """The span the operator chose; a live part turns it into instants with :func:`window`
    each time it runs (instants taken once would freeze its charts at the page's load)."""
    choice = st.selectbox("Time range", list(RANGES), key=key)
    return RANGES[str(choice)]


def window(span: timedelta) -> tuple[datetime, datetime]:
    """The ``span`` that ends now."""
    end = datetime.now(UTC)
    return end - span, end


# Ranges longer than this are read again only every span / _READS_PER_SPAN (6 hours: 30 s,
# 24 hours: 2 min, 7 days: 14 min), once for every browser session: a day of a 1,000-device
# fleet is 1.4 M rows the database sums (B8: 1-3 s), and a live part refreshed every few
# seconds in each open page would keep it summing them without end, for charts whose
# buckets (15 min, 1 h) hardly move between two refreshes.
_FRESH_RANGE = timedelta(hours=1)
_READS_PER_SPAN = 720
_HISTORY_KEPT = 64
_RETRY_SLOW_S = 60.0
_histories: dict[tuple[Any, ...], tuple[float, Any]] = {}
_histories_lock = threading.Lock()


def history(api: ApiClient, path: str, params: dict[str, Any], span: timedelta) -> Any:
    """GET ``path`` (a /history route) for the ``span`` that ends now."""

    def read() -> Any:
        start, end = window(span)
        return api.get(path, params={**params, "from": start.isoformat(), "to": end.isoformat()})

    if span <= _FRESH_RANGE:
        return read()
    key = (id(api), path, tuple(sorted(params.items())), span)
    now = time.monotonic()
    with _histories_lock:
        kept = _histories.get(key)
    if kept is not None and kept[0] > now:
        if isinstance(kept[1], ApiUnreachable):
            raise kept[1]
        return kept[1]
    fresh_s = span.total_seconds() / _READS_PER_SPAN
    try:
        body = read()
    except ApiUnreachable as exc:
        # Too slow (or failing): asking again at the next refresh would start one more scan
        # while the cloud is still on the last one. Say the same for a while instead.
        body, fresh_s = exc, min(fresh_s, _RETRY_SLOW_S)
    with _histories_lock:
        for old in [k for k, (until, _) in _histories.items() if until <= now]:
            del _histories[old]
        if len(_histories) >= _HISTORY_KEPT:
            _histories.pop(next(iter(_histories)))
        _histories[key] = (now + fresh_s, body)
    if isinstance(body, ApiUnreachable):
        raise body
    return body


def when(value: str | None) -> str:
    """An API timestamp as a person reads it (UTC, to the second), or a dash."""
    if not value:
        return "—"
    at = datetime.fromisoformat(value)
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A table of ``rows`` with exactly ``columns`` (in order), even when there are none."""
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)


def summary_cached(api: ApiClient, params: dict[str, Any] | None = None) -> Any:
    """Fleet counts for filter choices; refreshed with the live parts."""
    return _summary(api, tuple(sorted((params or {}).items())))


@st.cache_data(ttl=5, show_spinner=False, hash_funcs={ApiClient: id})
def _summary(api: ApiClient, params: tuple[tuple[str, Any], ...]) -> Any:
    return api.get("/v1/fleet/summary", params=dict(params))


def optional(api: ApiClient, path: str, params: dict[str, Any] | None = None) -> Any | None:
    """An endpoint that some clouds do not have yet: None when it answers 404."""
    try:
        return api.get(path, params=params)
    except NotFound:
        return None
