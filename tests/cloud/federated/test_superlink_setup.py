"""How the cloud sets the SuperLink up, without starting it: loopback only on its own port,
the devices' port left to the gateway, the cloud's `flwr` pointed at the internal one, and
an environment for Flower's processes that keeps the cloud's secrets out."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from flwr.common import constant
from pydantic import ValidationError

from cloud.embedded.processes import free_port
from cloud.federated.coordinator import flower_cli
from cloud.federated.flower import flower_env
from cloud.federated.settings import FederatedSettings
from cloud.federated.superlink import SuperLink, superlink_argv
from shared.errors import ServiceUnavailable


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_superlink_listens_on_loopback_on_its_internal_port(tmp_path: Path) -> None:
    """Published on 0.0.0.0:9092, the SuperLink still binds 127.0.0.1, on 9093 by default."""
    settings = FederatedSettings(host="0.0.0.0", port=9092)

    argv = superlink_argv(settings, data_dir=tmp_path, dev_mode=True)

    assert (_option(argv, "--host"), _option(argv, "--port")) == ("127.0.0.1", "9093")
    assert settings.fleet_address == "127.0.0.1:9092"
    assert settings.control_address == "127.0.0.1:9093"


def test_an_internal_port_set_is_used_everywhere_the_cloud_calls(tmp_path: Path) -> None:
    settings = FederatedSettings(port=9092, internal_port=19000)

    argv = superlink_argv(settings, data_dir=tmp_path, dev_mode=True)
    cli = flower_cli(tmp_path, settings)

    assert _option(argv, "--port") == "19000"
    assert cli.address == "127.0.0.1:19000"
    assert '"127.0.0.1:19000"' in (cli.home / "config.toml").read_text()


def test_the_internal_port_cannot_be_the_devices_port() -> None:
    with pytest.raises(ValidationError, match="INTERNAL_PORT must differ"):
        FederatedSettings(port=9092, internal_port=9092)
    assert FederatedSettings(port=65535).superlink_port == 65534


def test_an_address_naming_the_devices_port_is_refused_at_start() -> None:
    """A setting from before the gateway (the SuperLink's one port) would send every `flwr`
    call to the gateway's 404: said when the settings are read, not at the first run."""
    with pytest.raises(ValidationError, match="fleet gateway"):
        FederatedSettings(port=9092, address="cloud.example:9092")
    assert FederatedSettings(port=9092, address="localhost:9093").control_address == (
        "localhost:9093"
    )


def test_flower_processes_get_an_allow_listed_environment(tmp_path: Path) -> None:
    environ = {
        "PATH": "/usr/bin", "HOME": "/home/cloud", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "FLWR_LOG_LEVEL": "DEBUG", "OMP_NUM_THREADS": "1",
        "EDGEFLEET_ADMIN_TOKEN": "secret-token-0123456789",
        "EDGEFLEET_DATABASE_URL": "postgresql+psycopg://u:pw@db/edgefleet",
        "EDGEFLEET_MQTT_PASSWORD": "pw", "EDGEFLEET_MQTT_KEY_FILE": "/etc/k.pem",
        "AWS_SECRET_ACCESS_KEY": "x", "HTTPS_PROXY": "http://proxy:3128",
    }  # fmt: skip

    env = flower_env(tmp_path / "home", environ)

    assert env == {
        "PATH": "/usr/bin", "HOME": "/home/cloud", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "FLWR_LOG_LEVEL": "DEBUG", "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_INTERNAL_GRPC_CONTROL_API": "0", "FLWR_INTERNAL_GRPC_FLEET_API": "0",
        "FLWR_HOME": str(tmp_path / "home"),
    }  # fmt: skip


def test_flower_variables_are_kept_by_name_and_its_grpc_apis_forced_off(tmp_path: Path) -> None:
    """FLWR_INTERNAL_GRPC_CONTROL_API=1 in the cloud's environment would have
    `flower-superlink` open an unauthenticated gRPC Control API on 0.0.0.0, and
    FLWR_MODEL_API_KEY is a secret a ServerApp could read: neither gets through, whatever
    the cloud was started with (the names are Flower's own, read from flwr)."""
    environ = {
        "PATH": "/usr/bin",
        constant.FLWR_INTERNAL_GRPC_CONTROL_API: "1",
        constant.FLWR_INTERNAL_GRPC_FLEET_API: "1",
        "FLWR_MODEL_API_KEY": "sk-secret",
        "FLWR_MODEL_API_ENDPOINT": "https://models.example/v1",
        "FLWR_TELEMETRY_ENABLED": "1",
        "FLWR_HOME": "/elsewhere",
        "FLWR_LOG_LEVEL": "INFO",
    }

    env = flower_env(tmp_path / "home", environ)

    assert env[constant.FLWR_INTERNAL_GRPC_CONTROL_API] == "0"
    assert env[constant.FLWR_INTERNAL_GRPC_FLEET_API] == "0"
    assert "FLWR_MODEL_API_KEY" not in env
    assert "FLWR_MODEL_API_ENDPOINT" not in env
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_LOG_LEVEL"] == "INFO"
    assert "sk-secret" not in env.values()


def test_a_taken_devices_port_stops_the_start_before_any_superlink(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        settings = FederatedSettings(port=taken.getsockname()[1], internal_port=free_port())
        link = SuperLink(settings, data_dir=tmp_path, dev_mode=True)

        with pytest.raises(ServiceUnavailable, match="could not listen"):
            link.start()

    assert link.child.pid is None
    assert not link.gateway.running


def test_the_gateways_limits_on_slow_clients_come_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_FEDERATED_HEAD_TIMEOUT_S", "7.5")
    monkeypatch.setenv("EDGEFLEET_FEDERATED_CONNECTIONS_PER_ADDRESS", "0")
    monkeypatch.setenv("EDGEFLEET_FEDERATED_MIN_BODY_RATE", "512")

    link = SuperLink(FederatedSettings(), data_dir=tmp_path, dev_mode=True)

    protocol = link.gateway.server.config.http
    assert not isinstance(protocol, str)
    assert protocol.head_timeout_s == 7.5
    assert protocol.connections_per_peer is None
    assert link.gateway.limits.body_min_rate == 512
