"""A device token downloads only the artifacts of its own desired state; the admin any."""

from __future__ import annotations

from datetime import timedelta

import httpx

from cloud.fleet.desired import issue, set_deployment
from cloud.registry import repository
from tests.cloud.api.helpers import upload
from tests.conftest import RunningApi
from tests.onnx_models import tiny_classifier


def _point(api: RunningApi, device_id: str, model: str, version: int) -> None:
    """What a deploy does to the registry, without needing a broker here."""
    with api.context.database.session() as s:
        device = repository.lock_device(s, device_id=device_id)
        row = repository.get_version(s, model_name=model, version=version)
        set_deployment(device=device, version=row)
        issue(s, device=device, key=api.context.signing_key, lifetime=timedelta(hours=1))


def _fetch(client: httpx.Client, sha: str) -> tuple[int, int]:
    return (
        client.get(f"/v1/artifacts/{sha}").status_code,
        client.get(f"/v1/artifacts/{sha}/chunks").status_code,
    )


def test_a_device_downloads_only_what_it_was_told_to_run(api: RunningApi) -> None:
    """Two models (one cloud-only), two devices: each sees exactly its own artifact."""
    with api.client() as admin:
        admin.post("/v1/models", json={"name": "edge"})
        admin.post("/v1/models", json={"name": "cloud-only"})
        edge_sha = upload(admin, "edge", tiny_classifier(features=8)).json()["sha256"]
        cloud_sha = upload(admin, "cloud-only", tiny_classifier(features=9)).json()["sha256"]
        token_a = admin.post("/v1/devices", json={"device_id": "cam-a"}).json()["token"]
        token_b = admin.post("/v1/devices", json={"device_id": "cam-b"}).json()["token"]
    _point(api, "cam-a", "edge", 1)

    with api.client(token_a) as a, api.client(token_b) as b, api.client() as admin:
        assert _fetch(a, edge_sha) == (200, 200)
        assert _fetch(a, cloud_sha) == (403, 403)
        assert _fetch(b, edge_sha) == (403, 403)
        refused = b.get(f"/v1/artifacts/{edge_sha}", headers={"Range": "bytes=0-9"})
        assert refused.status_code == 403
        assert "not in device 'cam-b'" in refused.json()["error"]
        assert _fetch(admin, cloud_sha) == (200, 200)


def test_moving_a_device_to_another_version_moves_what_it_may_download(
    api: RunningApi,
) -> None:
    with api.client() as admin:
        admin.post("/v1/models", json={"name": "edge"})
        v1 = upload(admin, "edge", tiny_classifier(features=8)).json()["sha256"]
        v2 = upload(admin, "edge", tiny_classifier(features=10)).json()["sha256"]
        token = admin.post("/v1/devices", json={"device_id": "cam-a"}).json()["token"]
    _point(api, "cam-a", "edge", 1)
    with api.client(token) as device:
        assert _fetch(device, v1) == (200, 200)
        assert _fetch(device, v2) == (403, 403)
    _point(api, "cam-a", "edge", 2)
    with api.client(token) as device:
        assert _fetch(device, v2) == (200, 200)
        assert _fetch(device, v1) == (403, 403)
