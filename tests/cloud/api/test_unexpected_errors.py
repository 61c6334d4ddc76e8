"""An unexpected error (a bug) is a 500 with a JSON body, and the client's next request on
the same keep-alive connection still gets its answer."""

from __future__ import annotations

import httpx

from cloud.api.app import create_app
from cloud.context import CloudContext
from tests.conftest import serve_in_thread


def test_a_500_tells_the_client_to_reconnect_so_the_next_request_is_answered(
    context: CloudContext,
) -> None:
    """The server closes a connection after an unhandled error (Starlette re-raises it once
    the 500 is sent); without `Connection: close` on that 500, a client that reuses the
    connection had its next request reset. A route with a bug stands in for any bug."""
    app = create_app(context)

    @app.get("/v1/test-bug")
    def bug() -> None:
        raise RuntimeError("a bug")

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        answers = [client.get("/v1/test-bug") for _ in range(3)]
        assert client.get("/healthz").status_code == 200
    for answer in answers:
        assert answer.status_code == 500
        assert answer.json() == {"error": "internal error"}
        assert answer.headers["connection"] == "close"
