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
# Take the lease (free, or already ours) and a fencing token in one step: a crash between
# the two would leave a lease without a token. The token is above the counter and above
# ARGV[3], the highest fence the registry holds (the counter may have gone backwards: Redis
# restarted without it, a failover lost increments). ARGV[4] = '1': only a lease already ours.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
if ARGV[4] == '1' and not holder then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
if counter < tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[3]) end
return redis.call('INCR', KEYS[2])
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
        self._acquire = client.register_script(_ACQUIRE)

    @property
    def ttl_s(self) -> float:
        return self.ttl_ms / 1000

    def hold(self) -> int | None:
        """Our fencing token while we lead (taking the lease if it is free), else None."""
        if self.token is not None and self.renew():
            return self.token
        try:
            token = self._acquire(
                keys=[self.key, self.fence_key], args=[self.identity, self.ttl_ms, 0, 0]
            )
        except redis.RedisError as exc:
            _LOGGER.debug("rollout engine: Redis unreachable (%s); standing by", exc)
            return None
        if token is None:
            return None
        self.token = int(token)
        _LOGGER.info("rollout engine: leading (fencing token %s)", self.token)
        return self.token

    def renew(self) -> bool:
        """Extend the lease we hold (a round may outlast it); False, and no token, once it is
        not ours any more or Redis cannot say."""
        if self.token is None:
            return False
        try:
            if self._renew(keys=[self.key], args=[self.identity, self.ttl_ms]):
                return True
            _LOGGER.warning("rollout engine: lost the lease; another engine leads now")
        except redis.RedisError as exc:
            # Without Redis nobody can tell who leads: act on nothing until it is back.
            _LOGGER.warning("rollout engine: Redis unreachable (%s); standing by", exc)
        self.token = None
        return False

    def refence(self, above: int) -> int | None:
        """A new token above ``above`` (the highest fence the registry holds) while the lease is
        still ours: a write refused with our token while we hold the lease means the counter
        went backwards, not that another engine leads. None, and no token, otherwise."""
        try:
            token = self._acquire(
                keys=[self.key, self.fence_key], args=[self.identity, self.ttl_ms, above, 1]
            )
        except redis.RedisError as exc:
            _LOGGER.warning("rollout engine: Redis unreachable (%s); standing by", exc)
            token = None
        if token is None:
            self.token = None
            return None
        _LOGGER.warning(
            "rollout engine: the fencing counter was behind the registry (fence %s); token %s",
            above, token,
        )  # fmt: skip
        self.token = int(token)
        return self.token

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
