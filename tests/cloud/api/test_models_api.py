"""Models and versions over HTTP; bad input gets a clear 4xx and changes nothing."""

from __future__ import annotations

import hashlib

import pytest

from tests.cloud.api.helpers import snapshot, upload
from tests.conftest import RunningApi
from tests.onnx_models import tiny_classifier


@pytest.fixture
def with_model(api: RunningApi) -> RunningApi:
    with api.client() as c:
        assert (
            c.post("/v1/models", json={"name": "digits", "description": "8x8"}).status_code == 201
        )
    return api


def test_an_uploaded_onnx_becomes_a_version_with_its_io_read_from_the_graph(
    with_model: RunningApi,
) -> None:
    data = tiny_classifier()
    with with_model.client() as c:
        r = upload(c, "digits", data, {"precision": "fp32", "trainable": ["head.weight"],
                                       "metrics": {"accuracy": 0.97}})  # fmt: skip
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["version"] == 1
        assert body["sha256"] == hashlib.sha256(data).hexdigest()
        assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
        assert body["outputs"][0]["name"] == "probabilities"
        assert (
            upload(c, "digits", tiny_classifier(seed=1), {"parent_version": 1}).json()[
                "parent_version"
            ]
            == 1
        )
        assert [v["version"] for v in c.get("/v1/models/digits/versions").json()] == [1, 2]
        assert c.get("/v1/models/digits").json()["latest_version"] == 2
        assert c.get("/v1/models/digits/versions/1").json()["metrics"] == {"accuracy": 0.97}
        audit = c.get("/v1/audit").json()
        assert audit[0]["action"] == "version.register"


def test_an_invalid_onnx_is_refused_and_leaves_no_trace(with_model: RunningApi) -> None:
    before = snapshot(with_model.context)
    with with_model.client() as c:
        r = upload(c, "digits", b"this is not a protobuf at all" * 10)
    assert r.status_code == 422
    assert "not a valid ONNX model" in r.json()["error"]
    assert snapshot(with_model.context) == before


def test_trainable_names_must_exist_in_the_graph(with_model: RunningApi) -> None:
    before = snapshot(with_model.context)
    with with_model.client() as c:
        r = upload(c, "digits", tiny_classifier(), {"trainable": ["no.such.tensor"]})
    assert r.status_code == 400
    assert "no.such.tensor" in r.json()["error"]
    assert snapshot(with_model.context) == before


def test_an_oversize_upload_is_refused_with_413(with_model: RunningApi) -> None:
    before = snapshot(with_model.context)
    with with_model.client() as c:
        r = upload(c, "digits", b"\0" * (4 * 1024 * 1024))
    assert r.status_code == 413
    assert "limit" in r.json()["error"]
    assert snapshot(with_model.context) == before


def test_an_upload_to_an_unknown_model_is_404(with_model: RunningApi) -> None:
    before = snapshot(with_model.context)
    with with_model.client() as c:
        r = upload(c, "nope", tiny_classifier())
        assert c.get("/v1/models/nope").status_code == 404
        assert c.get("/v1/models/digits/versions/9").status_code == 404
    assert r.status_code == 404
    assert r.json() == {"error": "unknown model 'nope'"}
    assert snapshot(with_model.context) == before


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"precision": "int3"}', "precision"),
        ('{"surprise": 1}', "surprise"),
        ('{"routing": {"policy": "coin_flip"}}', "routing.policy"),
    ],
)
def test_bad_metadata_is_refused_and_changes_nothing(
    with_model: RunningApi, metadata: str, match: str
) -> None:
    before = snapshot(with_model.context)
    with with_model.client() as c:
        r = c.post(
            "/v1/models/digits/versions",
            files={"file": ("m.onnx", tiny_classifier(), "application/octet-stream")},
            data={"metadata": metadata},
        )
    assert r.status_code == 400
    assert match in r.json()["error"]
    assert snapshot(with_model.context) == before


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 422),
        (b'{"name": "bad name!"}', 422),
        (b'{"name": "ok", "extra": 1}', 422),
        (b"[]", 422),
    ],
)
def test_malformed_json_bodies_get_a_clear_error(api: RunningApi, body: bytes, status: int) -> None:
    before = snapshot(api.context)
    with api.client() as c:
        r = c.post("/v1/models", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    assert r.json()["error"].startswith("invalid request")
    assert snapshot(api.context) == before


def test_a_duplicate_model_is_a_conflict(with_model: RunningApi) -> None:
    before = snapshot(with_model.context)
    with with_model.client() as c:
        r = c.post("/v1/models", json={"name": "digits"})
    assert r.status_code == 409
    assert snapshot(with_model.context) == before


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token", ""])
def test_missing_or_wrong_admin_token_is_401(with_model: RunningApi, token: str | None) -> None:
    before = snapshot(with_model.context)
    with with_model.client(token) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/models", json={"name": "other"})
        assert upload(c, "digits", tiny_classifier()).status_code == 401
    assert r.status_code == 401
    assert "token" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert snapshot(with_model.context) == before


def test_a_device_token_is_not_an_admin_token(with_model: RunningApi) -> None:
    with with_model.client() as c:
        token = c.post("/v1/devices", json={"device_id": "cam-1"}).json()["token"]
    with with_model.client(token) as c:
        assert c.post("/v1/models", json={"name": "x"}).status_code == 401


def test_a_request_body_over_the_general_limit_is_413(api: RunningApi) -> None:
    with api.client() as c:
        r = c.post("/v1/models", content=b"{" + b" " * 300_000 + b"}",
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413
