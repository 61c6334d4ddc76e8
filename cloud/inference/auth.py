"""Who calls: the admin (bearer token) or an enrolled device (its token), verified from a
short-lived in-process cache, so a stream of inferences costs no SQL query each."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cloud.registry import repository
from cloud.registry.database import Database
from shared.errors import Unauthorized

__all__ = ["Caller", "TokenCache"]

_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    """``device_id`` None: the admin."""

    device_id: str | None

    @property
    def admin(self) -> bool:
        return self.device_id is None


def bearer(header: str | None) -> str:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


class TokenCache:
    """A token's answer (a device, or refused) is kept ``ttl_s``: a rotated or deleted
    device's token keeps working at most that long."""

    def __init__(
        self,
        database: Database,
        *,
        admin_token: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.admin_token = admin_token.encode()
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        # token hash -> (when read, device id or None for an unknown token)
        self._seen: OrderedDict[str, tuple[float, str | None]] = OrderedDict()

    def cached(self, authorization: str | None) -> Caller | None:
        """The caller when known without reading SQL (the admin, or a device seen within the
        TTL); None when ``verify`` must decide."""
        try:
            token = bearer(authorization)
        except Unauthorized:
            return None
        if secrets.compare_digest(token.encode(), self.admin_token):
            return Caller(None)
        with self._lock:
            cached = self._seen.get(repository.hash_token(token))
        if cached is None or cached[1] is None or self.clock() - cached[0] >= self.ttl_s:
            return None
        return Caller(cached[1])

    def verify(self, authorization: str | None) -> Caller:
        token = bearer(authorization)
        if secrets.compare_digest(token.encode(), self.admin_token):
            return Caller(None)
        digest = repository.hash_token(token)
        now = self.clock()
        with self._lock:
            cached = self._seen.get(digest)
        if cached is None or now - cached[0] >= self.ttl_s:
            cached = (now, self._read(token))
            with self._lock:
                self._seen[digest] = cached
                self._seen.move_to_end(digest)
                while len(self._seen) > _MAX_ENTRIES:
                    self._seen.popitem(last=False)
        if cached[1] is None:
            raise Unauthorized("unknown device token")
        return Caller(cached[1])

    def _read(self, token: str) -> str | None:
        with self.database.session() as session:
            try:
                return repository.authenticate_device(session, token=token).id
            except Unauthorized:
                return None
