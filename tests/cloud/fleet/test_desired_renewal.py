"""Desired state that does not rot: renewed before expiry, given back from SQL to any broker."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud.embedded.processes import ChildProcess, free_port
from cloud.embedded.services import EmbeddedServices, ServiceUrls
from cloud.fleet.desired import stored_state
from cloud.fleet.keeper import DesiredStateKeeper
from cloud.registry import repository
from cloud.settings import CloudSettings
from shared import topics
from shared.errors import ExpiredDocument
from shared.messages import DesiredState
from shared.signing import verify_desired_state
from shared.topics import DeviceTopic
from tests.cloud.fleet.desired_support import (
    Watcher,
    add_models,
    audit_of,
    enroll,
    flush_link,
    open_context,
    retained_desired,
    running_fleet,
)
from tests.fleet_harness import wait_for


def _models(state: DesiredState | None) -> dict[str, int]:
    assert state is not None
    return {d.manifest.model: d.manifest.version for d in state.deployments}


def test_a_document_is_renewed_under_its_rev_once_a_third_of_its_life_is_left(
    tmp_path: Path, embedded: ServiceUrls
) -> None:
    """Renewal re-signs the same rev and models with a fresh window (the agent ignores an
    equal rev it already took, so nothing is redeployed), and only once it is due."""
    context = open_context(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'r.db'}", mqtt_url=embedded.mqtt_url,
        redis_url=embedded.redis_url,
    )  # fmt: skip
    try:
        add_models(context, ("alpha", "beta"))
        device_id = enroll(context)
        sent: list[str] = []
        keeper = DesiredStateKeeper(context, lambda _t, doc: sent.append(doc) is None)
        keeper.deploy(device_id=device_id, model="alpha", version=2)
        first = keeper.deploy(device_id=device_id, model="beta", version=1)
        lifetime = first.expires_at - first.issued_at
        assert lifetime == timedelta(days=30)

        assert keeper.renew_due(now=first.issued_at + lifetime * 0.6) == 0
        later = first.issued_at + lifetime * 0.7
        assert keeper.renew_due(now=later) == 1

        with context.database.session() as s:
            renewed = stored_state(repository.get_device(s, device_id=device_id))
        assert renewed is not None
        assert (renewed.rev, renewed.issued_at, renewed.expires_at) == (2, later, later + lifetime)
        assert renewed.deployments == first.deployments
        pushed = verify_desired_state(
            sent[-1], context.signing_key.public_key(), device_id=device_id, now=later
        )
        assert pushed == renewed
        assert [e["rev"] for e in audit_of(context, device_id, "desired.sign")] == [1, 2]
        assert [e["rev"] for e in audit_of(context, device_id, "desired.renew")] == [2]
        assert keeper.renew_due(now=later + lifetime * 0.6) == 0
    finally:
        context.close()


def test_the_fleet_renews_documents_so_a_device_offline_past_expiry_gets_a_valid_one(
    tmp_path: Path, embedded: ServiceUrls
) -> None:
    """Documents live 3 s here and the fleet service looks every 0.1 s. A device that stays
    offline until its first document has expired connects and finds a renewed, valid
    document of the same rev retained on the broker."""
    context = open_context(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'r.db'}", mqtt_url=embedded.mqtt_url,
        redis_url=embedded.redis_url, desired_lifetime_s=3.0, desired_renewal_interval_s=0.1,
    )  # fmt: skip
    try:
        add_models(context, ("alpha",))
        device_id = enroll(context)
        public_key = context.signing_key.public_key()
        with running_fleet(context, [device_id]) as fleet:
            original = fleet.deploy(device_id=device_id, model="alpha", version=1)
            first_document = retained_desired(context.urls.mqtt_url, device_id)
            wait_for(lambda: datetime.now(UTC) > original.expires_at, 10, "the first expiry")
            with pytest.raises(ExpiredDocument):
                verify_desired_state(first_document, public_key, device_id=device_id)

            flush_link(fleet, context.urls.mqtt_url)
            received = retained_desired(context.urls.mqtt_url, device_id)

        state = verify_desired_state(received, public_key, device_id=device_id)
        assert state.rev == original.rev
        assert state.deployments == original.deployments
        assert state.issued_at > original.issued_at
        assert audit_of(context, device_id, "desired.renew")
    finally:
        context.close()


def test_a_document_signed_before_sql_kept_them_is_rebuilt_under_its_rev(
    tmp_path: Path, embedded: ServiceUrls
) -> None:
    """A row from before migration 0004 has a rev and a model set but no stored document;
    the migration makes it due, and renewal signs that rev's models into SQL."""
    context = open_context(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'r.db'}", mqtt_url=embedded.mqtt_url,
        redis_url=embedded.redis_url,
    )  # fmt: skip
    try:
        add_models(context, ("alpha",))
        device_id = enroll(context)
        with context.database.session() as s:
            version = repository.get_version(s, model_name="alpha", version=2)
            device = repository.get_device(s, device_id=device_id)
            device.desired = {"alpha": {"version_id": version.id, "rollout_id": 7}}
            device.desired_rev = 4
            device.desired_renew_at = datetime(1970, 1, 1, tzinfo=UTC)
        keeper = DesiredStateKeeper(context, lambda _t, _doc: True)

        assert keeper.renew_due() == 1

        with context.database.session() as s:
            device = repository.get_device(s, device_id=device_id)
            state = stored_state(device)
        assert state is not None
        assert state.rev == 4
        assert _models(state) == {"alpha": 2}
        assert state.deployments[0].rollout_id == 7
        assert device.desired_rev == 4
    finally:
        context.close()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[tuple[str, ChildProcess]]:
    """A Mosquitto of this test's own that keeps nothing when it restarts."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
            pytest.fail("mosquitto is not installed, and EDGEFLEET_REQUIRE_SERVICES=1 requires it")
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    broker = ChildProcess([binary, "-c", str(conf)])
    broker.start(host="127.0.0.1", port=port)
    try:
        yield f"mqtt://127.0.0.1:{port}", broker
    finally:
        broker.stop()


def test_a_restarted_broker_and_a_flushed_redis_lose_no_document(
    tmp_path: Path, private_broker: tuple[str, ChildProcess]
) -> None:
    """The broker restarts empty and Redis is flushed (the embedded ones restarted): when
    the fleet service reconnects it gives back every document of its registry (and only
    those) from SQL, so a device connecting then still gets its desired state."""
    mqtt_url, broker = private_broker
    with EmbeddedServices(
        data_dir=tmp_path / "services", database_url="sqlite://", mqtt_url=mqtt_url,
        redis_url=None,
    ) as services:  # fmt: skip
        assert services.urls is not None
        context = open_context(
            tmp_path, database_url=f"sqlite:///{tmp_path / 'r.db'}", mqtt_url=mqtt_url,
            redis_url=services.urls.redis_url,
        )  # fmt: skip
        try:
            add_models(context, ("alpha",))
            devices = [enroll(context), enroll(context)]
            with running_fleet(context, devices) as fleet:
                for version, device_id in enumerate(devices, start=1):
                    fleet.deploy(device_id=device_id, model="alpha", version=version)
                flush_link(fleet, mqtt_url)

                context.redis.flushall()
                broker.stop()
                broker.start(host="127.0.0.1", port=int(mqtt_url.rsplit(":", 1)[1]))

                watcher = Watcher(mqtt_url)
                try:
                    watcher.watch(topics.fleet_filter(DeviceTopic.DESIRED))
                    wanted = {topics.device_topic(d, DeviceTopic.DESIRED) for d in devices}
                    wait_for(lambda: watcher.topics() >= wanted, 20, "documents given back")
                    assert watcher.topics() == wanted
                finally:
                    watcher.close()
                received = {d: retained_desired(mqtt_url, d) for d in devices}
        finally:
            context.close()

    public_key = context.signing_key.public_key()
    for version, device_id in enumerate(devices, start=1):
        state = verify_desired_state(received[device_id], public_key, device_id=device_id)
        assert (state.rev, _models(state)) == (1, {"alpha": version})


def test_a_renewal_interval_that_would_let_documents_expire_is_refused(tmp_path: Path) -> None:
    """Renewal starts when a third of the lifetime is left: looking less often than that
    would let documents expire between two looks."""
    with pytest.raises(ValidationError, match="DESIRED_RENEWAL_INTERVAL_S"):
        CloudSettings(
            data_dir=tmp_path, dev_mode=True, desired_lifetime_s=3.0,
            desired_renewal_interval_s=1.0,
        )  # fmt: skip
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True)
    assert settings.desired_lifetime_s == 30 * 24 * 3600
