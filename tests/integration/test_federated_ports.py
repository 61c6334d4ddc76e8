"""What devices can reach of a real Flower SuperLink (issue 11): on the federated port, the
Fleet API only; the Control API (start a run = run code on the cloud, register nodes, list
runs) and the Runtime API answer 404 from the gateway and never reach the SuperLink, which
serves them on 127.0.0.1 to the cloud alone. Flower's processes start without the cloud's
secrets in their environment."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import pytest
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    ListRunsResponse,
    RegisterNodeRequest,
    StartRunRequest,
)
from flwr.proto.run_pb2 import GetRunRequest
from google.protobuf.message import Message

from cloud.embedded.processes import port_open
from tests.federated_support import federation

pytestmark = pytest.mark.federated

PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}
SECRETS = {
    "EDGEFLEET_ADMIN_TOKEN": "a-very-secret-admin-token",
    "EDGEFLEET_DATABASE_URL": "postgresql+psycopg://edgefleet:hunter2@db.internal/edgefleet",
    "EDGEFLEET_MQTT_PASSWORD": "broker-secret",
    "EDGEFLEET_MQTT_KEY_FILE": "/etc/edgefleet/cloud.key",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
}


def _post(url: str, message: Message) -> httpx.Response:
    return httpx.post(url, content=message.SerializeToString(), headers=PROTOBUF, timeout=30)


def test_the_devices_port_serves_the_fleet_api_and_refuses_the_control_api(
    tmp_path: Path,
) -> None:
    """Through the port devices use, start-run, list-runs and register-node are refused in
    JSON; a Fleet call reaches the SuperLink (which answers it: an unsigned call is its 401).
    The cloud's `flwr` address still lists runs, and there are none."""
    with federation(tmp_path) as fed:
        public = f"http://{fed.link.address}"
        refused = {
            "/v1/control/start-run": StartRunRequest(),
            "/v1/control/list-runs": ListRunsRequest(),
            "/v1/control/register-node": RegisterNodeRequest(public_key=b"\x04" * 65),
            "/v1/runtime/acquire-task": ListRunsRequest(),
        }
        for path, message in refused.items():
            response = _post(public + path, message)

            assert response.status_code == 404, (path, response.status_code, response.content)
            assert "Fleet API" in response.json()["error"]

        fleet = _post(public + "/v1/fleet/get-run", GetRunRequest(run_id=1))
        assert fleet.status_code == 401
        assert fleet.json() == {"detail": "Invalid SuperNode authentication"}

        control = _post(f"http://{fed.settings.control_address}/v1/control/list-runs",
                        ListRunsRequest())  # fmt: skip
        assert control.status_code == 200
        assert dict(ListRunsResponse.FromString(control.content).run_dict) == {}
    # Stopped together.
    assert not port_open("127.0.0.1", fed.settings.port)
    assert not port_open("127.0.0.1", fed.settings.superlink_port)


def test_flower_processes_do_not_inherit_the_clouds_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SuperLink and the SuperExec it starts (which starts every ServerApp) see neither
    the admin token, nor the database or broker logins, nor the key paths."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    with federation(tmp_path) as fed:
        superlink = psutil.Process(fed.link.child.pid)
        processes = [superlink, *superlink.children(recursive=True)]
        names = [" ".join(p.cmdline()[:2]) for p in processes]
        assert any("flower-superexec" in name for name in names), names
        for process in processes:
            environ = process.environ()

            leaked = set(SECRETS) & set(environ)
            assert not leaked, (process.cmdline()[:2], leaked)
            assert not any(v in value for v in SECRETS.values() for value in environ.values())
            assert environ["FLWR_TELEMETRY_ENABLED"] == "0"
