"""Bulk enrollment on a real Mosquitto with dynamic security: every device of the batch logs
in with its own token; a leftover device login is replaced; a name that is another kind of
login, or a broker that is down, refuses the whole batch and leaves no login behind; a device
another replica enrolled meanwhile keeps its login."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from cloud.broker.dynsec import Command, DynsecClient
from cloud.broker.provisioning import DynsecAccounts
from cloud.embedded.services import ServiceUrls
from cloud.registry import repository
from cloud.registry.tables import Device
from tests.brokers import DynsecBroker, MqttProbe, dynsec_cloud_api, dynsec_mosquitto
from tests.cloud.api.helpers import snapshot
from tests.conftest import RunningApi


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DynsecBroker]:
    with dynsec_mosquitto(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def api(tmp_path: Path, broker: DynsecBroker, embedded: ServiceUrls) -> Iterator[RunningApi]:
    with dynsec_cloud_api(tmp_path / "cloud", broker, embedded.redis_url) as running:
        yield running


@pytest.fixture
def probes() -> Iterator[list[MqttProbe]]:
    opened: list[MqttProbe] = []
    yield opened
    for probe in opened:
        probe.close()


def _logs_in(probes: list[MqttProbe], broker: DynsecBroker, user: str, password: str) -> bool:
    probe = MqttProbe(broker.port, user, password, client_id=f"agent-{user}")
    probes.append(probe)
    return probe.connect()


def _bulk(api: RunningApi, device_ids: list[str]) -> tuple[int, dict[str, object]]:
    with api.client() as c:
        r = c.post("/v1/devices/bulk", json={"devices": [{"device_id": d} for d in device_ids]})
    body: dict[str, object] = r.json()
    return r.status_code, body


def test_every_device_of_a_batch_logs_in_with_its_own_token(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    """150 devices (two plugin messages' worth): the first, one of the second message and the
    last log in with their tokens; a token of another device is refused."""
    ids = [f"cam-{i:03d}" for i in range(150)]
    status, body = _bulk(api, ids)
    assert status == 201, body
    tokens = {d["device"]["id"]: d["token"] for d in body["devices"]}  # type: ignore[attr-defined]
    assert sorted(tokens) == ids
    for device_id in ("cam-000", "cam-120", "cam-149"):
        assert _logs_in(probes, broker, device_id, tokens[device_id])
    assert not _logs_in(probes, broker, "cam-001", tokens["cam-002"])


def test_a_leftover_device_login_is_replaced(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    """The broker still has a device login the registry forgot (a deletion that stopped half
    way): the batch replaces it, and only the new token works."""
    accounts = DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    )
    accounts.provision_device("cam-old", "efd_old-token-0123456789")
    status, body = _bulk(api, ["cam-new", "cam-old"])
    assert status == 201, body
    tokens = {d["device"]["id"]: d["token"] for d in body["devices"]}  # type: ignore[attr-defined]
    assert _logs_in(probes, broker, "cam-old", tokens["cam-old"])
    assert not _logs_in(probes, broker, "cam-old", "efd_old-token-0123456789")
    assert _logs_in(probes, broker, "cam-new", tokens["cam-new"])


def test_a_name_that_is_another_login_refuses_the_batch_and_leaves_no_login(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    """One device id of the batch is the cloud's own broker login: 409, no device enrolled,
    and the logins made for the others are gone again; the cloud's login is untouched."""
    before = snapshot(api.context)
    status, body = _bulk(api, ["cam-a", broker.cloud_username, "cam-b"])
    assert status == 409, body
    assert snapshot(api.context)["rows"]["devices"] == before["rows"]["devices"]
    accounts = DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    )
    with accounts.connect() as dynsec:
        assert dynsec.get_client("cam-a") is None
        assert dynsec.get_client("cam-b") is None
    assert _logs_in(probes, broker, broker.cloud_username, broker.cloud_password)


def test_a_broker_that_is_down_refuses_the_batch(api: RunningApi, broker: DynsecBroker) -> None:
    broker.stop()
    before = snapshot(api.context)
    status, body = _bulk(api, ["cam-a", "cam-b"])
    assert status == 503, body
    assert "broker" in str(body["error"])
    assert snapshot(api.context) == before


def test_a_device_another_replica_enrolled_meanwhile_keeps_its_login(
    api: RunningApi,
    broker: DynsecBroker,
    probes: list[MqttProbe],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replica B enrolls cam-2 (its login, then its row) while this replica's batch is between
    its broker logins and its rows: the batch meets B's row, answers 409 and stores nothing;
    the logins it made for the others go, but cam-2 keeps B's (removing it would lock that
    device out — the rule of the one-device route). Before, every login of the batch went."""
    accounts = DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    )
    token_of_b = "efd_replica-b-token-0123456789abcdef"
    real = repository.enroll_device

    def replica_b_first(session: Session, **kwargs: object) -> tuple[Device, str]:
        if kwargs["device_id"] == "cam-0":
            accounts.provision_device("cam-2", token_of_b)
            with api.context.database.session() as other:
                real(other, device_id="cam-2", token=token_of_b)
        return real(session, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "enroll_device", replica_b_first)
    status, body = _bulk(api, [f"cam-{i}" for i in range(5)])
    assert status == 409, body
    assert "cam-2" in str(body["error"])
    assert _logs_in(probes, broker, "cam-2", token_of_b)
    with accounts.connect() as dynsec:
        assert [d for d in ("cam-0", "cam-1", "cam-3", "cam-4") if dynsec.get_client(d)] == []
    with api.context.database.session() as s:
        assert s.get(Device, "cam-0") is None


def test_a_batch_asks_the_broker_about_its_own_names_only(
    broker: DynsecBroker, probes: list[MqttProbe], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker holds 300 other device logins (and the cloud's): enrolling two devices, one
    of them a leftover login, sends and gets back nothing about the 300 — what a batch costs
    the broker does not grow with the fleet (an answer listing 100,000 logins nears the
    broker's 2 MiB packet limit). Before, every batch listed every login."""
    accounts = DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    )
    accounts.provision_devices([(f"other-{i:03d}", f"efd_other-token-{i:03d}") for i in range(300)])
    accounts.provision_device("cam-old", "efd_old-token-0123456789")
    exchanged: list[str] = []
    real = DynsecClient.request

    def spied(self: DynsecClient, commands: Sequence[Command]) -> list[dict[str, Any]]:
        responses = real(self, commands)
        exchanged.append(json.dumps([c.args for c in commands]) + json.dumps(responses))
        return responses

    monkeypatch.setattr(DynsecClient, "request", spied)
    accounts.provision_devices([("cam-new", "efd_new-token-0123456789"), ("cam-old", "efd_old-2")])
    assert exchanged
    assert not [text for text in exchanged if "other-" in text]
    assert _logs_in(probes, broker, "cam-new", "efd_new-token-0123456789")
    assert _logs_in(probes, broker, "cam-old", "efd_old-2")
    assert not _logs_in(probes, broker, "cam-old", "efd_old-token-0123456789")
    assert _logs_in(probes, broker, "other-007", "efd_other-token-007")
