"""A desired-state document travels as one MQTT message: one that would not fit the broker's
packet limit is refused when it is asked for (deploy 413, rollout 413), never signed, stored
and then lost on the wire (Mosquitto drops the connection of a client that sends one, paho
sends it again after each reconnect, and the device never gets it)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from cloud.context import CloudContext
from cloud.embedded.mosquitto import BROKER_MAX_PAYLOAD
from cloud.fleet import desired
from cloud.fleet.desired import MAX_DOCUMENT_BYTES
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.registry.tables import Device, Rollout
from shared.errors import PayloadTooLarge
from shared.messages import (
    MAX_SECOND_OPINION_WEIGHTS,
    CurvePoint,
    RoutingPolicy,
    RoutingSpec,
    SecondOpinion,
)
from shared.signing import verify_desired_state
from tests.cloud.fleet.desired_support import (
    add_models,
    audit_of,
    clear_desired,
    flush_link,
    retained_desired,
)
from tests.fleet_harness import Cloud, running_cloud
from tests.onnx_models import tiny_classifier

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "mosquitto"


def _widest_second_opinion(seed: int) -> RoutingSpec:
    """A routing spec as large as the pipeline ships: a second opinion with the most weights
    a spec may carry (about 1.3 MB of JSON, 1.8 MB once signed and base64-encoded)."""
    classes = 3
    rng = np.random.default_rng(seed)
    weights = rng.normal(scale=0.01, size=MAX_SECOND_OPINION_WEIGHTS // classes * classes)
    curve = [CurvePoint(offload=i / 20, threshold=0.3 + 0.03 * i) for i in range(21)]
    opinion = SecondOpinion(
        weights=weights.tolist(),
        bias=rng.normal(size=classes).tolist(),
        alpha=0.5,
        knots=[i / 20 for i in range(21)],
    )
    return RoutingSpec(
        policy=RoutingPolicy.MAX_PROB, threshold=0.6, curve=curve, second_opinion=opinion
    )


def _add_routed(context: CloudContext, name: str, seed: int) -> None:
    """Model ``name`` with version 1, routed by the widest second opinion."""
    data = tiny_classifier(seed=seed)
    with context.database.session() as s:
        repository.create_model(s, name=name)
        register_version(
            s, context.artifacts, model_name=name, blocks=[data], max_bytes=len(data),
            precision="fp32", actor="test", routing=_widest_second_opinion(seed),
        )  # fmt: skip


@pytest.fixture
def cloud(context: CloudContext) -> Iterator[Cloud]:
    _add_routed(context, "alpha", 1)
    _add_routed(context, "beta", 2)
    add_models(context, ("small",), versions=1)
    with running_cloud(context) as running:
        yield running
    clear_desired(context)


def test_the_limit_fits_inside_every_shipped_broker_s_packet_limit() -> None:
    for conf in ("edgefleet.conf", "dynsec.conf"):
        lines = (DEPLOY / conf).read_text().splitlines()
        (limit,) = [int(line.split()[1]) for line in lines if line.startswith("max_packet_size")]
        assert limit - 4096 >= MAX_DOCUMENT_BYTES
    assert BROKER_MAX_PAYLOAD - 4096 >= MAX_DOCUMENT_BYTES


def test_a_deploy_whose_document_would_not_fit_one_message_is_a_413_and_changes_nothing(
    cloud: Cloud,
) -> None:
    """alpha alone (1.8 MB signed) fits and reaches the broker; beta beside it would make
    3.7 MB: refused with the sizes named, the device keeps rev 1 (stored and retained), no
    signature is recorded, and the fleet's link stays up."""
    device_id, _ = cloud.enroll()
    with cloud.admin() as c:
        first = c.put(f"/v1/devices/{device_id}/deployments/alpha", json={"version": 1})
        assert first.status_code == 202, first.text
        assert first.json()["published"] is True
        second = c.put(f"/v1/devices/{device_id}/deployments/beta", json={"version": 1})
        current = c.get(f"/v1/devices/{device_id}/desired").json()
    assert second.status_code == 413, second.text
    error = second.json()["error"]
    assert f"over the {MAX_DOCUMENT_BYTES:,} bytes one broker message carries" in error
    assert "alpha" in error
    assert "beta" in error
    assert current["rev"] == 1
    assert current["deployments"] == [{"model": "alpha", "version": 1, "rollout_id": None}]
    assert [e["rev"] for e in audit_of(cloud.context, device_id, "desired.sign")] == [1]
    assert [e["model"] for e in audit_of(cloud.context, device_id, "device.deploy")] == ["alpha"]
    assert device_id not in cloud.fleet.desired.pending()
    flush_link(cloud.fleet, cloud.context.urls.mqtt_url)
    assert cloud.fleet.link.connected
    document = retained_desired(cloud.context.urls.mqtt_url, device_id)
    public_key = cloud.context.signing_key.public_key()
    state = verify_desired_state(document, public_key, device_id=device_id)
    assert state.rev == 1
    # A small model beside alpha still fits.
    with cloud.admin() as c:
        small = c.put(f"/v1/devices/{device_id}/deployments/small", json={"version": 1})
    assert small.status_code == 202, small.text


def test_a_rollout_that_would_overfill_a_device_s_document_is_refused_up_front(
    cloud: Cloud,
) -> None:
    """Two devices labelled site=lab, one running alpha already: a rollout of beta to the
    lab would give that one a document no broker message carries, so it is refused (413)
    before any rollout exists; to a device that runs nothing, beta fits and starts."""
    loaded, _ = cloud.enroll()
    empty, _ = cloud.enroll()
    with cloud.context.database.session() as s:
        for device_id in (loaded, empty):
            row = s.get(Device, device_id)
            assert row is not None
            row.labels = {"site": "lab", "id": device_id}
    with cloud.admin() as c:
        assert (
            c.put(f"/v1/devices/{loaded}/deployments/alpha", json={"version": 1}).status_code == 202
        )
        refused = c.post(
            "/v1/rollouts", json={"model": "beta", "version": 1, "selector": {"site": "lab"}}
        )
        with cloud.context.database.session() as s:
            rollouts = s.scalar(select(func.count()).select_from(Rollout))
        accepted = c.post(
            "/v1/rollouts", json={"model": "beta", "version": 1, "selector": {"id": empty}}
        )
    assert refused.status_code == 413, refused.text
    assert f"device {loaded!r} would be" in refused.json()["error"]
    assert rollouts == 0
    assert accepted.status_code == 201, accepted.text


def test_the_rollout_check_bounds_the_signed_size_from_above_and_closely(
    context: CloudContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollout check measures each version's entry once rather than signing a document
    per device: for a device already signed with alpha, moving it to alpha again is judged
    no smaller than the document it has (refused at a limit one byte below it) and at most
    64 bytes larger (accepted at that)."""
    _add_routed(context, "alpha", 1)
    with context.database.session() as s:
        repository.enroll_device(s, device_id="cam-1")
        device = repository.lock_device(s, device_id="cam-1")
        row = repository.get_version(s, model_name="alpha", version=1)
        desired.set_deployment(device=device, version=row, rollout_id=7)
        desired.issue(s, device=device, key=context.signing_key, lifetime=timedelta(days=1))
        signed = len(device.desired_document or "")
        assert signed > 1_500_000
        monkeypatch.setattr(desired, "MAX_DOCUMENT_BYTES", signed - 1)
        with pytest.raises(PayloadTooLarge, match="device 'cam-1' would be"):
            desired.check_documents_fit(s, device_ids=["cam-1"], version=row)
        monkeypatch.setattr(desired, "MAX_DOCUMENT_BYTES", signed + 64)
        desired.check_documents_fit(s, device_ids=["cam-1"], version=row)
