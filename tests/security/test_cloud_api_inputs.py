"""Hostile inputs to the cloud API: numbers past the database, odd requests, leaked paths.

Each is answered with a 4xx ``{"error": ...}`` on a connection that stays usable, and
leaves the registry as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from onnx import TensorProto, helper

from cloud.api.app import create_app
from cloud.api.errors import PathScrubber
from cloud.api.server import JsonH11Protocol
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.fleet.service import FleetService
from cloud.registry import repository
from cloud.settings import CloudSettings
from tests.cloud.api.helpers import snapshot, upload
from tests.conftest import ADMIN_TOKEN, RunningApi, serve_in_thread
from tests.onnx_models import tiny_classifier
from tests.security.helpers import exchange, serve

HUGE = 10**20


def _is_json_error(response: httpx.Response) -> bool:
    if not response.headers.get("content-type", "").startswith("application/json"):
        return False
    body = response.json()
    return isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)


@pytest.fixture
def registered(backend_api: RunningApi) -> RunningApi:
    """A model ``digits`` with version 1 and an enrolled device ``cam-1``."""
    with backend_api.client() as c:
        assert c.post("/v1/models", json={"name": "digits"}).status_code == 201
        assert upload(c, "digits", tiny_classifier()).status_code == 201
        assert c.post("/v1/devices", json={"device_id": "cam-1"}).status_code == 201
    return backend_api


def test_a_version_number_the_database_cannot_hold_is_422_and_the_connection_lives(
    registered: RunningApi,
) -> None:
    """`/versions/100000000000000000000` was a 500 and a dropped keep-alive (SQLite cannot
    bind past int64, PostgreSQL's int4 column past 2^31 - 1); every number outside
    1..int32 is now refused by validation, on a connection that stays usable."""
    with registered.client() as c:
        for version in (HUGE, 2**63, 2**31, 0, -1):
            r = c.get(f"/v1/models/digits/versions/{version}")
            assert r.status_code == 422, (version, r.text)
            assert _is_json_error(r)
            assert "path.version" in r.json()["error"]
            assert c.get("/v1/models/digits/versions/1").status_code == 200


def test_a_parent_version_past_int64_is_refused_and_stores_nothing(registered: RunningApi) -> None:
    """`parent_version` 10^20 in the upload metadata was a 500; now refused like any bad
    metadata (400, naming the field), with no file and no row left behind."""
    before = snapshot(registered.context)
    with registered.client() as c:
        r = upload(c, "digits", tiny_classifier(seed=5), {"parent_version": HUGE})
        assert r.status_code == 400
        assert _is_json_error(r)
        assert "parent_version" in r.json()["error"]
        assert c.get("/v1/models/digits").status_code == 200
    assert snapshot(registered.context) == before


def test_a_deploy_of_version_past_int64_is_refused_and_leaves_the_device_alone(
    registered: RunningApi,
) -> None:
    """A deploy of version 10^20 reached the fleet service's SQL (500); now a 422, and the
    device has no new desired state."""
    context = registered.context
    fleet = FleetService(context)
    fleet.start()
    try:
        with serve_in_thread(create_app(context, fleet)) as url:
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            with httpx.Client(base_url=url, headers=admin) as c:
                r = c.put("/v1/devices/cam-1/deployments/digits", json={"version": HUGE})
                assert r.status_code == 422
                assert _is_json_error(r)
                assert "version" in r.json()["error"]
                assert c.get("/v1/devices/cam-1").json()["desired_rev"] == 0
    finally:
        fleet.stop()
    with context.database.session() as s:
        assert repository.get_device(s, device_id="cam-1").desired_rev == 0


def test_any_other_number_that_reaches_sql_unbounded_is_still_a_422(
    registered: RunningApi,
) -> None:
    """A route whose schema does not bound its number (the quantize path here) gets a 422
    from the one error handler instead of a 500 (SQLite's OverflowError, PostgreSQL's
    DataError), and the connection stays open."""
    before = snapshot(registered.context)
    with registered.client() as c:
        for version in (HUGE, 2**31):
            r = c.post(f"/v1/models/digits/versions/{version}/quantize")
            assert r.status_code in (404, 422), (version, r.text)
            assert _is_json_error(r)
            assert "SELECT" not in r.text
            assert c.get("/v1/models/digits").status_code == 200
    assert snapshot(registered.context) == before


@pytest.mark.parametrize(
    "metadata",
    ['{"metrics": {"accuracy": NaN}}', '{"metrics": {"accuracy": 1e999}}', "[" * 100_000],
    ids=["NaN", "overflowing float", "deep nesting"],
)
def test_metadata_that_is_not_plain_json_is_refused(registered: RunningApi, metadata: str) -> None:
    """Python's json reads NaN and 1e999 (inf), which PostgreSQL's JSON refused with a 500,
    and 100k nested brackets raised RecursionError: each is now a 400 storing nothing."""
    before = snapshot(registered.context)
    with registered.client() as c:
        r = c.post(
            "/v1/models/digits/versions",
            files={"file": ("m.onnx", tiny_classifier(seed=7), "application/octet-stream")},
            data={"metadata": metadata},
        )
    assert r.status_code == 400, r.text
    assert _is_json_error(r)
    assert snapshot(registered.context) == before


def test_a_value_the_database_refuses_is_a_422_not_a_500(registered: RunningApi) -> None:
    """A NUL character in text is stored by SQLite and refused by PostgreSQL (a 500 and a
    dropped connection): there it is now a 422 that names no SQL and stores nothing."""
    postgres = registered.context.database.engine.dialect.name == "postgresql"
    before = snapshot(registered.context)
    with registered.client() as c:
        r = c.post("/v1/models", json={"name": "nul", "description": "a\u0000b"})
        assert r.status_code == (422 if postgres else 201), r.text
        if postgres:
            assert _is_json_error(r)
            assert "INSERT" not in r.text
            assert snapshot(registered.context) == before
        assert c.get("/v1/models/digits").status_code == 200


def test_every_error_the_api_answers_is_a_json_error(registered: RunningApi) -> None:
    """404, 405, 401, 413, 414, 431, 422 and the artifact Range errors (416 and a malformed
    Range, which Starlette answered in plain text) all carry ``{"error": ...}``."""
    with registered.client() as c:
        sha = c.get("/v1/models/digits/versions/1").json()["sha256"]
        size = c.get("/v1/models/digits/versions/1").json()["size"]
        answers = {
            "unknown route": c.get("/v1/no/such/route"),
            "wrong method": c.delete("/v1/models"),
            "no token": httpx.get(f"{registered.url}/v1/models"),
            "body too large": c.post("/v1/models", content=b"{" * (1024 * 1024)),
            "target too long": c.get("/v1/models/" + "a" * 5000),
            "headers too large": c.get("/v1/models", headers={"X-Big": "b" * 9000}),
            "invalid body": c.post("/v1/models", json={"name": "no spaces allowed"}),
            "range past the end": c.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=999999-"}),
            "range backwards": c.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=9-2"}),
            "range in items": c.get(f"/v1/artifacts/{sha}", headers={"Range": "items=0-1"}),
        }
        statuses = {what: r.status_code for what, r in answers.items()}
        assert statuses == {
            "unknown route": 404,
            "wrong method": 405,
            "no token": 401,
            "body too large": 413,
            "target too long": 414,
            "headers too large": 431,
            "invalid body": 422,
            "range past the end": 416,
            "range backwards": 400,
            "range in items": 400,
        }
        assert [what for what, r in answers.items() if not _is_json_error(r)] == []
        # What the status needs beside the body is still there.
        assert answers["range past the end"].headers["content-range"] == f"bytes */{size}"
        assert "POST" in answers["wrong method"].headers["allow"]
        # A valid range is still the bytes.
        part = c.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=0-3"})
        assert part.status_code == 206
        assert len(part.content) == 4


def _external_data_model() -> bytes:
    """A graph whose initializer claims its data lives in a file outside the model's folder."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()  # unchecked: a model the checker refuses
    return data


@pytest.mark.parametrize(
    "data", [b"not a protobuf at all" * 10, _external_data_model()], ids=["garbage", "external"]
)
def test_a_refused_model_names_no_server_path(registered: RunningApi, data: bytes) -> None:
    """The ONNX checker's words carried the path of the stored upload (the data folder under
    /tmp here); the error keeps the words and hides the path."""
    data_dir = str(registered.context.settings.data_dir.resolve())
    before = snapshot(registered.context)
    with registered.client() as c:
        r = upload(c, "digits", data)
    assert r.status_code == 422
    message = r.json()["error"]
    assert "not a valid ONNX model" in message
    assert data_dir not in message
    assert "/tmp" not in message
    assert snapshot(registered.context) == before


def test_the_scrubber_hides_whole_server_paths_only() -> None:
    """Paths under a root go, with what follows up to a delimiter; a root inside a longer
    path or a longer name that starts like a root is left alone."""
    scrub = PathScrubber([Path("/srv/edgefleet"), Path("/tmp")])
    assert scrub("cannot open '/srv/edgefleet/artifacts/ab/abcd': gone") == (
        "cannot open '<server path>': gone"
    )
    assert scrub("file: /tmp/x/data. Please check") == "file: <server path> Please check"
    assert scrub("a/tmp/b and /tmpfoo and /srv/other") == "a/tmp/b and /tmpfoo and /srv/other"


def test_a_relative_data_dir_is_hidden_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, embedded: ServiceUrls
) -> None:
    """The default data dir is relative (``.edgefleet``): the checker's message named
    ``state/artifacts/…`` then, which no absolute prefix matches."""
    monkeypatch.chdir(tmp_path)
    settings = CloudSettings(data_dir=Path("state"), admin_token=ADMIN_TOKEN)
    context = CloudContext.open(
        settings, ServiceUrls(settings.resolved_database_url, embedded.mqtt_url, embedded.redis_url)
    )
    try:
        with serve_in_thread(create_app(context)) as url:
            api = RunningApi(url, context)
            with api.client() as c:
                assert c.post("/v1/models", json={"name": "m"}).status_code == 201
                r = upload(c, "m", b"not a protobuf at all" * 10)
        assert r.status_code == 422
        message = r.json()["error"]
        assert "not a valid ONNX model" in message
        assert "state/" not in message
        assert str(tmp_path) not in message
    finally:
        context.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 100_000, 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000, 431),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ],
    ids=["request line", "headers", "garbage"],
)
def test_what_the_server_refuses_before_the_app_is_a_json_error_too(
    api: RunningApi, request_bytes: bytes, status: int
) -> None:
    """A head still unfinished past the server's 16 KiB buffer never reaches the app: uvicorn
    answered it with a plain-text 400 (h11) or kept buffering it (httptools). Served with the
    cloud's protocol it gets 414 (request line) / 431 (headers), and garbage a 400, as
    ``{"error"}``."""
    with serve(create_app(api.context), http=JsonH11Protocol) as url:
        code, headers, body = exchange(url, request_bytes)
        assert code == status
        assert headers["content-type"] == "application/json"
        assert set(json.loads(body)) == {"error"}
        # The server goes on serving.
        assert httpx.get(f"{url}/healthz").status_code == 200
