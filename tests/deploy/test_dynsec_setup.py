"""`edgefleet broker init` and the shipped dynsec.conf: one command gives a broker whose
cloud login administers device logins and reads all of EdgeFleet, and nothing else."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path

from typer.testing import CliRunner

from cloud.broker.provisioning import DynsecAccounts
from cloud.broker.setup import hash_password
from cloud.cli_broker import app
from tests.brokers import ROOT, MqttProbe, dynsec_mosquitto

DEPLOY = ROOT / "deploy" / "mosquitto"


def _directives(path: Path) -> dict[str, str]:
    pairs = (line.split(" ", 1) for line in path.read_text().splitlines())
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2 and not p[0].startswith("#")}


def test_init_writes_a_private_file_and_never_replaces_one_by_accident(tmp_path: Path) -> None:
    target = tmp_path / "broker" / "dynsec.json"
    first = CliRunner().invoke(
        app, ["init", "--dynsec-file", str(target)], env={"EDGEFLEET_MQTT_PASSWORD": None}
    )
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    written = target.read_bytes()
    again = CliRunner().invoke(
        app, ["init", "--dynsec-file", str(target)], env={"EDGEFLEET_MQTT_PASSWORD": "x" * 20}
    )
    assert again.exit_code == 1
    assert "refusing to replace" in again.output
    assert target.read_bytes() == written
    forced = CliRunner().invoke(
        app,
        ["init", "--dynsec-file", str(target), "--force"],
        env={"EDGEFLEET_MQTT_PASSWORD": "y" * 20},
    )
    assert forced.exit_code == 0, forced.output
    assert "y" * 20 not in forced.output
    assert target.read_bytes() != written


def test_the_cloud_login_from_init_runs_the_broker(tmp_path: Path) -> None:
    """The printed password logs in; it provisions devices, reads $SYS and subscribes through
    its shared-subscription group, but nothing outside EdgeFleet's topics."""
    folder = tmp_path / "broker"
    result = CliRunner().invoke(
        app,
        ["init", "--dynsec-file", str(folder / "dynsec.json")],
        env={"EDGEFLEET_MQTT_PASSWORD": None, "EDGEFLEET_MQTT_USERNAME": None},
    )
    match = re.search(r"EDGEFLEET_MQTT_PASSWORD=(\S+)", result.output)
    assert match, result.output
    with dynsec_mosquitto(folder, cloud_password=match.group(1), initialised=True) as broker:
        DynsecAccounts(
            broker.url, username=broker.cloud_username, password=broker.cloud_password
        ).provision_device("cam-1", "token-1")
        cloud = MqttProbe(broker.port, broker.cloud_username, broker.cloud_password)
        device = MqttProbe(broker.port, "cam-1", "token-1", client_id="agent-cam-1")
        try:
            assert cloud.connect()
            assert cloud.subscribe("$share/edgefleet-cloud/edgefleet/v1/dev/+/status")
            assert cloud.subscribe("$SYS/broker/version")
            assert not cloud.subscribe("other/#")
            assert cloud.wait(lambda: any(t == "$SYS/broker/version" for t, _ in cloud.messages))
            assert device.connect()
            device.publish("edgefleet/v1/dev/cam-1/status", b"shared")
            assert cloud.received(b"shared")
        finally:
            cloud.close()
            device.close()


def test_dynsec_conf_keeps_the_same_queue_limits_as_edgefleet_conf() -> None:
    """Two shipped configs, one set of limits: drift would drop chunks on one of them."""
    limits = {"max_queued_messages", "max_queued_bytes", "max_inflight_messages"}
    limits |= {"max_packet_size", "persistent_client_expiration"}
    dynsec, classic = _directives(DEPLOY / "dynsec.conf"), _directives(DEPLOY / "edgefleet.conf")
    assert {k: dynsec.get(k) for k in limits} == {k: classic.get(k) for k in limits}
    assert dynsec["allow_anonymous"] == "false"
    assert "password_file" not in dynsec
    assert "acl_file" not in dynsec


def _cloud_password_is(dynsec_file: Path, password: str) -> bool:
    client = json.loads(dynsec_file.read_text())["clients"][0]
    salt = base64.b64decode(client["salt"])
    expected = hash_password(password, salt=salt, iterations=client["iterations"])
    return bool(expected["password"] == client["password"])


def test_the_password_is_never_a_command_line_argument(tmp_path: Path) -> None:
    """A command line shows in `ps` and the shell's history: --password is refused; the
    password comes from --password-file (a file or standard input), else the environment."""
    target = tmp_path / "dynsec.json"
    argument = CliRunner().invoke(
        app, ["init", "--dynsec-file", str(target), "--password", "p" * 20]
    )
    assert argument.exit_code == 2
    assert "--password" in argument.output
    assert not target.exists()

    secret = tmp_path / "secret"
    secret.write_text("from-a-file-0123456789\nignored\n")
    from_file = CliRunner().invoke(
        app,
        ["init", "--dynsec-file", str(target), "--password-file", str(secret)],
        env={"EDGEFLEET_MQTT_PASSWORD": "from-the-environment"},
    )
    assert from_file.exit_code == 0, from_file.output
    assert "from-a-file" not in from_file.output
    assert _cloud_password_is(target, "from-a-file-0123456789")

    from_stdin = CliRunner().invoke(
        app,
        ["init", "--dynsec-file", str(target), "--password-file", "-", "--force"],
        input="from-stdin-0123456789\n",
    )
    assert from_stdin.exit_code == 0, from_stdin.output
    assert _cloud_password_is(target, "from-stdin-0123456789")

    from_env = CliRunner().invoke(
        app,
        ["init", "--dynsec-file", str(target), "--force"],
        env={"EDGEFLEET_MQTT_PASSWORD": "from-the-environment"},
    )
    assert from_env.exit_code == 0, from_env.output
    assert _cloud_password_is(target, "from-the-environment")

    secret.write_text("\n")
    empty = CliRunner().invoke(
        app, ["init", "--dynsec-file", str(target), "--password-file", str(secret), "--force"]
    )
    assert empty.exit_code == 1
    assert "empty" in empty.output
    assert _cloud_password_is(target, "from-the-environment")
