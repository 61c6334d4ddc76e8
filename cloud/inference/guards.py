"""What Redis keeps for the inference service: a per-device rate limit (fixed window) and
an optional result cache keyed by model, version and a hash of the inputs. Redis being
down never stops inference: the limit and the cache are skipped, with a warning."""

from __future__ import annotations

import hashlib
import logging
import math
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy.typing as npt
import redis

from shared.errors import TooManyRequests
from shared.tensors import InferResponse, decode_response, encode_response

__all__ = ["RateLimiter", "ResultCache", "input_digest"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]


class RateLimiter:
    """At most ``limit`` requests per device in each ``window_s`` window (0: no limit)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        limit: int,
        window_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.limit = limit
        self.window_s = window_s
        self.clock = clock

    def hit(self, device_id: str) -> None:
        if self.limit <= 0:
            return
        now = self.clock()
        window = math.floor(now / self.window_s)
        key = f"edgefleet:ratelimit:{device_id}:{window}"
        try:
            pipe = self.client.pipeline()
            pipe.incr(key)
            pipe.expire(key, max(1, math.ceil(self.window_s)) + 1)
            count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            _LOGGER.warning("rate limit skipped, Redis failed: %s", exc)
            return
        if count > self.limit:
            retry = (window + 1) * self.window_s - now
            raise TooManyRequests(
                f"device {device_id!r} is over its limit of {self.limit} requests per "
                f"{self.window_s:g}s",
                retry_after_s=retry,
            )


def input_digest(inputs: dict[str, Array], outputs: Sequence[str]) -> str:
    """Names, datatypes, shapes and bytes of every input, and the outputs asked for."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        if array.dtype.kind == "O":
            for item in array.reshape(-1):
                data = item if isinstance(item, bytes) else str(item).encode()
                digest.update(struct.pack("<I", len(data)) + data)
        else:
            digest.update(array.tobytes())
    digest.update(("|".join(outputs)).encode())
    return digest.hexdigest()


class ResultCache:
    def __init__(self, client: redis.Redis, *, ttl_s: float, max_bytes: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes

    @staticmethod
    def key(model: str, version: int, digest: str) -> str:
        return f"edgefleet:infer:{model}:{version}:{digest}"

    def get(self, key: str) -> dict[str, Array] | None:
        try:
            raw = self.client.get(key)
        except redis.RedisError as exc:
            _LOGGER.warning("result cache skipped, Redis failed: %s", exc)
            return None
        if not isinstance(raw, bytes) or len(raw) < 4:
            return None
        (length,) = struct.unpack_from("<I", raw)
        return decode_response(raw[4:], length).outputs

    def put(self, key: str, outputs: dict[str, Array]) -> None:
        body, headers = encode_response(InferResponse("", outputs), binary=True)
        length = int(headers.get("Inference-Header-Content-Length", len(body)))
        if len(body) > self.max_bytes:
            return
        try:
            self.client.set(key, struct.pack("<I", length) + body, px=int(self.ttl_s * 1000))
        except redis.RedisError as exc:
            _LOGGER.warning("result not cached, Redis failed: %s", exc)
