"""What `edgefleet demo` does before its agents: the reference models, one at a time, so
that a Ctrl-C during a long first build is heard between two models."""

from __future__ import annotations

import threading

from cloud.context import CloudContext
from cloud.demo.session import DemoSession
from cloud.registry import repository
from tests.conftest import seed_reference_cache


def test_a_ctrl_c_during_the_reference_build_is_heard_between_two_models(
    context: CloudContext, reference_onnx: dict[str, bytes]
) -> None:
    """Ctrl-C comes while digits-cloud is registered: the demo registers nothing more and
    does not say it is ready. Before, it built and quantized every model first (a minute or
    more on a first start), which invited a second Ctrl-C."""
    seed_reference_cache(context.settings, reference_onnx)
    stop = threading.Event()
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if line.strip() == "digits-cloud: done":
            stop.set()  # as the signal reader does on the first Ctrl-C

    DemoSession(1, say=say, banner=lambda *_: None).ready(context, "http://127.0.0.1:1", stop)
    with context.database.session() as s:
        assert [m.name for m in repository.list_models(s)] == ["digits-cloud"]
    assert "Ctrl-C stops everything." not in said
    assert not any("Local edge agents" in line for line in said)


def test_each_reference_model_is_said_once(
    context: CloudContext, reference_onnx: dict[str, bytes]
) -> None:
    """Registered one by one, each edge model brings digits-cloud along: said once."""
    seed_reference_cache(context.settings, reference_onnx)
    said: list[str] = []
    DemoSession(0, say=said.append, banner=lambda *_: None).ready(
        context, "http://127.0.0.1:1", threading.Event()
    )
    assert said.count("  digits-cloud: building") == 1
    assert said.count("  digits-cloud: done") == 1
    assert "  digits-cloud: already registered" not in said
    assert "  registered digits-cloud:1, digits-edge:1, digits-edge:2, digits-edge-weak:1" in said
    assert said[-1] == "Ctrl-C stops everything."
