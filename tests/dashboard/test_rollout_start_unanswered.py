"""A start of a rollout that the cloud does not answer in time may still have started it: the
page must not say it was not started (an operator would start it again)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from streamlit.testing.v1 import AppTest

from tests.conftest import serve_in_thread

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.fixture
def slow_cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """A stand-in cloud with one model and no rollouts, which takes its time to start one
    (it does start it: the answer is what is late)."""
    started: list[dict[str, Any]] = []
    app = FastAPI()

    @app.get("/v1/rollouts")
    def rollouts() -> list[dict[str, Any]]:
        return []

    @app.get("/v1/models")
    def models() -> list[dict[str, Any]]:
        return [{"name": "digits-edge"}]

    @app.post("/v1/rollouts")
    def start(body: dict[str, Any]) -> dict[str, Any]:
        started.append(body)
        time.sleep(2.0)
        return {"id": 1, "devices": 1, "waves": 1}

    with serve_in_thread(app) as url:
        monkeypatch.setenv("EDGEFLEET_DASHBOARD_API_URL", url)
        monkeypatch.setenv("EDGEFLEET_DASHBOARD_TOKEN", "t" * 20)
        monkeypatch.setenv("EDGEFLEET_DASHBOARD_TIMEOUT_S", "0.5")
        yield started


def test_a_start_without_an_answer_says_it_may_have_started(
    slow_cloud: list[dict[str, Any]],
) -> None:
    at = AppTest.from_file(APP, default_timeout=30).run()
    at.switch_page("screens/rollouts.py").run()
    at.form_submit_button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(slow_cloud) == 1
    (error,) = at.error
    assert "may have started" in error.value
    assert "not started" not in error.value
