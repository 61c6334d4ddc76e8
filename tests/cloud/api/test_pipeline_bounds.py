"""The pipeline routes bound their numbers in the schema, like the rest of the API."""

from __future__ import annotations

from tests.conftest import RunningApi


def test_quantize_refuses_a_version_number_no_version_can_have(api: RunningApi) -> None:
    """0, negative, past int32 and past int64: a 422 naming the path's version, answered by
    validation before the registry is read (not a 404, nor a database error's 422)."""
    with api.client() as c:
        assert c.post("/v1/models", json={"name": "m"}).status_code == 201
        for version in (0, -1, 2**31, 10**20):
            r = c.post(f"/v1/models/m/versions/{version}/quantize")
            assert r.status_code == 422, (version, r.text)
            assert "path.version" in r.json()["error"], r.text
