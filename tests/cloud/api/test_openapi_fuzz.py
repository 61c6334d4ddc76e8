"""Schemathesis against the served OpenAPI: no generated request may cause a 5xx."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.fleet.service import FleetService
from cloud.registry import repository
from tests.conftest import ADMIN_TOKEN, serve_in_thread

EXAMPLES_PER_OPERATION = 40


def test_no_generated_request_causes_a_server_error(context: CloudContext) -> None:
    """Every operation of /openapi.json, fuzzed as the admin and anonymously, over real HTTP,
    against the whole cloud (API and fleet service on the embedded broker)."""
    with context.database.session() as s:
        repository.create_model(s, name="digits")
        repository.enroll_device(s, device_id="cam-1")
    failures: list[str] = []
    calls: list[int] = []
    fleet = FleetService(context)
    fleet.start()
    with serve_in_thread(create_app(context, fleet)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 10

        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: Any) -> None:
                for headers in ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, {}):
                    response = case.call(base_url=url, headers=headers, timeout=30)
                    calls.append(response.status_code)
                    if response.status_code >= 500:
                        failures.append(
                            f"{case.method} {case.formatted_path} -> {response.status_code}: "
                            f"{response.text[:200]}"
                        )

            fuzz()
    fleet.stop()
    assert failures == []
    # The fuzzer really reached the handlers: some requests passed auth and validation.
    assert len(calls) > 10 * len(operations)
    assert any(200 <= code < 300 for code in calls)
    assert any(code in (400, 404, 409, 413, 422) for code in calls)
