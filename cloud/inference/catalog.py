"""Which registered version a request names ("latest" or a number), read from the registry
at most once per TTL per name: no SQL query per inference request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud.registry import repository
from cloud.registry.database import Database
from shared.errors import InvalidInput, NotFound
from shared.messages import TensorSpec

__all__ = ["Catalog", "VersionInfo", "parse_version"]

_MAX_VERSION = 2**31 - 1


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """What serving needs to know about one registered version."""

    model: str
    version: int
    sha256: str
    size: int
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    versions: tuple[int, ...]  # every version of the model, for metadata

    @property
    def key(self) -> tuple[str, int]:
        return self.model, self.version


def parse_version(raw: str | None) -> int | None:
    """None for "latest" (or none given), else the version number; 400 for anything else."""
    if raw is None or raw in ("", "latest"):
        return None
    if not raw.isdecimal() or not 1 <= int(raw) <= _MAX_VERSION:
        raise InvalidInput(f"version must be a positive integer or 'latest', not {raw[:40]!r}")
    return int(raw)


class Catalog:
    def __init__(
        self,
        database: Database,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        fp16: bool = False,
    ) -> None:
        self.database = database
        self.ttl_s = ttl_s
        self.clock = clock
        # "latest" may name an FP16 version only where the GPU runs it: on the CPU,
        # onnxruntime computes FP16 nodes through casts, slower than the FP32 parent.
        self.fp16 = fp16
        self._lock = threading.Lock()
        self._models: dict[str, tuple[float, dict[int, VersionInfo]]] = {}

    def resolve(self, model: str, version: int | None) -> VersionInfo:
        """Raise NotFound for an unknown model or version."""
        versions = self._versions(model, fresh=False)
        if version is not None and version not in versions:
            # A version registered since the last read is served without waiting for the TTL.
            versions = self._versions(model, fresh=True)
        if not versions:
            raise NotFound(f"model {model!r} has no versions")
        if version is None:
            latest = self._latest(versions)
            if latest is None:
                raise NotFound(
                    f"model {model!r} has only FP16 versions, served as 'latest' on CUDA "
                    "only; name a version"
                )
            return latest
        info = versions.get(version)
        if info is None:
            raise NotFound(f"model {model!r} has no version {version}")
        return info

    def cached(self, model: str, version: int | None) -> VersionInfo | None:
        """``resolve`` without reading SQL: None when the answer is not cached and fresh."""
        with self._lock:
            cached = self._models.get(model)
        if cached is None or self.clock() - cached[0] >= self.ttl_s or not cached[1]:
            return None
        versions = cached[1]
        return self._latest(versions) if version is None else versions.get(version)

    def _latest(self, versions: dict[int, VersionInfo]) -> VersionInfo | None:
        servable = [n for n, v in versions.items() if self.fp16 or v.precision != "fp16"]
        return versions[max(servable)] if servable else None

    def _versions(self, model: str, *, fresh: bool) -> dict[int, VersionInfo]:
        now = self.clock()
        with self._lock:
            cached = self._models.get(model)
        if cached is not None and not fresh and now - cached[0] < self.ttl_s:
            return cached[1]
        versions = self._read(model)
        with self._lock:
            self._models[model] = (now, versions)
            if len(self._models) > 10_000:  # names seen once must not grow this forever
                self._models.pop(next(iter(self._models)))
        return versions

    def _read(self, model: str) -> dict[int, VersionInfo]:
        with self.database.session() as session:
            rows = repository.list_versions(session, model_name=model)
            numbers = tuple(r.version for r in rows)
            return {
                r.version: VersionInfo(
                    model=model,
                    version=r.version,
                    sha256=r.artifact.sha256,
                    size=r.artifact.size,
                    precision=r.precision,
                    inputs=tuple(TensorSpec.model_validate(s) for s in r.inputs),
                    outputs=tuple(TensorSpec.model_validate(s) for s in r.outputs),
                    versions=numbers,
                )
                for r in rows
            }
