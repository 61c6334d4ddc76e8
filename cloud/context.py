"""Everything a running cloud process holds: settings, registry, artifacts, Redis, key."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.artifacts.store import ArtifactStore
from cloud.embedded.services import ServiceUrls
from cloud.registry.database import Database
from cloud.settings import CloudSettings
from shared.signing import load_or_create_private_key

__all__ = ["CloudContext"]


@dataclass(slots=True)
class CloudContext:
    settings: CloudSettings
    urls: ServiceUrls
    database: Database
    artifacts: ArtifactStore
    redis: redis.Redis
    signing_key: Ed25519PrivateKey

    @classmethod
    def open(cls, settings: CloudSettings, urls: ServiceUrls) -> CloudContext:
        """Connect to the services, migrate the registry, load (or create) the signing key."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        database = Database(urls.database_url)
        database.migrate()
        return cls(
            settings=settings,
            urls=urls,
            database=database,
            artifacts=ArtifactStore(settings.artifact_dir, chunk_size=settings.chunk_size),
            redis=redis.Redis.from_url(urls.redis_url, socket_timeout=2, socket_connect_timeout=2),
            signing_key=load_or_create_private_key(settings.signing_key_path),
        )

    def close(self) -> None:
        self.redis.close()
        self.database.dispose()
