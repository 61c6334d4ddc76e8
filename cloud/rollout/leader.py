"""One rollout engine acts at a time: a Redis lease with a fencing token. The lease can be
lost without our knowing (a pause, a partition); the token is what makes that safe, since
every write the engine makes checks it against the highest token that wrote (store.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import redis

__all__ = ["Leadership"]

_LOGGER = logging.getLogger(__name__)

# Renew only a lease that is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Leadership:
    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str = "rollout-engine",
        ttl_s: float = 10.0,
        identity: str | None = None,
    ) -> None:
        self.client = client
        self.key = f"edgefleet:leader:{name}"
        self.fence_key = f"edgefleet:fence:{name}"
        self.ttl_ms = int(ttl_s * 1000)
        # Who leads, readable by an operator: host, process and a nonce (pids are reused).
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.token: int | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> int | None:
        """Our fencing token while we lead (taking the lease if it is free), else None."""
        try:
            if self.token is not None and self._renew(
                keys=[self.key], args=[self.identity, self.ttl_ms]
            ):
                return self.token
            if self.token is not None:
                _LOGGER.warning("rollout engine: lost the lease; another engine leads now")
                self.token = None
            if self.client.set(self.key, self.identity, nx=True, px=self.ttl_ms):
                self.token = int(self.client.incr(self.fence_key))
                _LOGGER.info("rollout engine: leading (fencing token %s)", self.token)
                return self.token
        except redis.RedisError as exc:
            # Without Redis nobody can tell who leads: act on nothing until it is back.
            if self.token is not None:
                _LOGGER.warning("rollout engine: Redis unreachable (%s); standing by", exc)
            self.token = None
        return None

    def leader(self) -> str | None:
        """The identity of whoever holds the lease now (None: nobody)."""
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def release(self) -> None:
        if self.token is None:
            return
        with contextlib.suppress(redis.RedisError):  # else it expires by itself
            self._release(keys=[self.key], args=[self.identity])
        self.token = None
