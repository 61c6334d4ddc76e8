"""Deployer: each rev walks QUEUED → … → ACTIVE, and whatever raises on the way ends in
FAILED with a reason (ROLLED_BACK when an older version keeps serving) — never a deployment
left at an intermediate state — while the deployer thread goes on with the next rev."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from edge_agent.deployer import Deployer
from edge_agent.model_store import Installed, ModelStore
from edge_agent.runtime import Runtime
from shared.errors import ServiceUnavailable
from shared.messages import ArtifactRef, GoldenExample, Manifest, StatusEvent, TensorSpec
from shared.signing import generate_key
from tests.edge_agent.support import (
    CHUNK,
    DEVICE,
    golden_for,
    lookup_model,
    manifest_for,
    put_blob,
    signed_document,
    tiny_classifier,
    wait_for,
)

ROW = [0.1, -0.2, 0.3, 0.4]


class ChunkFetcher:
    """Writes an artifact's chunks into the store as a delivery would; a test may make it
    raise, or hold it (a download that lasts until the deployer stops)."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.blobs: dict[str, bytes] = {}
        self.error: Exception | None = None
        self.hold = False
        self.started = threading.Event()

    def offer(self, data: bytes) -> None:
        self.blobs[ArtifactRef.of(data, CHUNK).sha256] = data

    def fetch(
        self, ref: ArtifactRef, progress: Callable[[int], None], stop: threading.Event
    ) -> None:
        self.started.set()
        if self.hold:
            stop.wait(10)
            return
        if self.error is not None:
            raise self.error
        data = self.blobs[ref.sha256]
        for index in self.store.missing_chunks(ref):
            assert self.store.write_chunk(ref, index, data[index * CHUNK : (index + 1) * CHUNK])
            progress(self.store.bytes_done(ref))


@dataclass
class Rig:
    root: Path
    store: ModelStore
    runtime: Runtime
    fetcher: ChunkFetcher
    deployer: Deployer
    events: list[StatusEvent] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)
    key: object = field(default_factory=generate_key)

    def send(self, rev: int, *manifests: Manifest) -> None:
        self.deployer.on_desired("desired", signed_document(self.key, rev, *manifests))  # type: ignore[arg-type]

    def deploy(self, rev: int, *manifests: Manifest) -> None:
        self.send(rev, *manifests)
        wait_for(self.deployer.idle, 20, f"rev {rev} to be handled")

    def states(self, version: int) -> list[str]:
        return [e.state.value for e in self.events if e.version == version]

    def last(self, version: int, state: str) -> StatusEvent:
        return [e for e in self.events if e.version == version and e.state.value == state][-1]


def _rig(root: Path, key: object | None = None) -> Rig:
    store = ModelStore(root / "store")
    runtime = Runtime(threads=1)
    fetcher = ChunkFetcher(store)
    events: list[StatusEvent] = []
    applied: list[int] = []
    key = key or generate_key()
    deployer = Deployer(
        device_id=DEVICE,
        public_key=key.public_key(),  # type: ignore[attr-defined]
        store=store,
        runtime=runtime,
        fetcher=fetcher,
        publish_status=events.append,
        on_applied=lambda: applied.append(store.state.rev_applied),
    )
    deployer.start()
    return Rig(root, store, runtime, fetcher, deployer, events, applied, key)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    running = _rig(tmp_path)
    yield running
    running.deployer.stop()


def _version(rig: Rig, version: int, seed: int) -> Manifest:
    """A tiny classifier the fetcher can deliver, with a golden example that it passes."""
    data = tiny_classifier(seed=seed)
    rig.fetcher.offer(data)
    return manifest_for(data, version=version, golden=[golden_for(data, {"input": ROW})])


def _serving(rig: Rig, version: int) -> None:
    loaded = rig.runtime.get("m")
    assert loaded.version == version
    out = loaded.run({"input": np.asarray([ROW], dtype=np.float32)})
    assert out["probabilities"].shape == (1, 3)


def _v1(rig: Rig) -> None:
    rig.deploy(1, _version(rig, 1, seed=1))
    _serving(rig, 1)


def test_a_model_walks_every_step_to_active(rig: Rig) -> None:
    rig.deploy(1, _version(rig, 1, seed=1))
    steps = rig.states(1)
    assert steps[0] == "QUEUED"
    assert steps[-4:] == ["VERIFYING", "STAGED", "HEALTHCHECK", "ACTIVE"]
    assert "DOWNLOADING" in steps
    assert rig.last(1, "ACTIVE").bytes_done == rig.last(1, "ACTIVE").bytes_total > 0
    _serving(rig, 1)
    assert rig.store.active("m").version == 1  # type: ignore[union-attr]
    assert rig.store.state.rev_applied == 1
    assert rig.applied == [1]


@pytest.mark.parametrize(
    ("golden", "reason"),
    [
        (
            GoldenExample(inputs={"pixels": ROW}, outputs={}),
            "HEALTHCHECK: golden input 0 names inputs ['pixels'], the manifest declares ['input']",
        ),
        (
            GoldenExample(inputs={"input": ROW[:3]}, outputs={}),
            "HEALTHCHECK: golden input 0: 3 values for 'input' do not fit shape [-1, 4]",
        ),
        (
            GoldenExample(inputs={"input": ROW}, outputs={"logits": [0.0]}),
            "HEALTHCHECK: golden input 0 names output 'logits', which the model lacks",
        ),
    ],
    ids=["unknown-input", "wrong-count", "unknown-output"],
)
def test_a_golden_example_the_model_cannot_take_fails_and_rolls_back(
    rig: Rig, golden: GoldenExample, reason: str
) -> None:
    """The KeyError/ValueError of a bad golden example used to escape the deployer and leave
    the device at HEALTHCHECK forever; now it is a FAILED with a reason, the old version stays,
    and the next rev deploys."""
    _v1(rig)
    data = tiny_classifier(seed=2)
    rig.fetcher.offer(data)
    rig.deploy(2, manifest_for(data, version=2, golden=[golden]))
    assert rig.states(2)[-2:] == ["FAILED", "ROLLED_BACK"]
    assert (rig.last(2, "FAILED").reason or "").startswith(reason)
    assert rig.last(2, "ROLLED_BACK").reason == "kept m:1"
    _serving(rig, 1)
    rig.deploy(3, _version(rig, 3, seed=3))
    assert rig.states(3)[-1] == "ACTIVE"
    _serving(rig, 3)


def test_an_engine_error_on_a_golden_input_fails_the_health_check(rig: Rig) -> None:
    """A graph that loads but that onnxruntime refuses to run for the golden input."""
    data = lookup_model()
    rig.fetcher.offer(data)
    golden = GoldenExample(inputs={"index": [12]}, outputs={})
    manifest = manifest_for(
        data,
        inputs=[TensorSpec(name="index", datatype="INT64", shape=[-1])],
        golden=[golden],
    )
    rig.deploy(1, manifest)
    assert rig.states(1)[-1] == "FAILED"  # nothing older to keep: no ROLLED_BACK
    reason = rig.last(1, "FAILED").reason or ""
    assert reason.startswith("HEALTHCHECK: golden input 0: m:1 failed: ")
    assert "Traceback" not in reason
    assert rig.runtime.models() == {}


def test_a_file_onnxruntime_cannot_load_fails(rig: Rig) -> None:
    _v1(rig)
    garbage = b"not an onnx graph " * 100
    rig.fetcher.offer(garbage)
    rig.deploy(2, manifest_for(garbage, version=2))
    assert (rig.last(2, "FAILED").reason or "").startswith("HEALTHCHECK: model does not load")
    assert rig.states(2)[-1] == "ROLLED_BACK"
    _serving(rig, 1)


def test_a_disk_error_fails_with_its_reason(rig: Rig) -> None:
    """The blobs folder is not a folder any more: moving the download into place fails."""
    _v1(rig)
    shutil.rmtree(rig.store.blobs)
    rig.store.blobs.write_bytes(b"")
    rig.deploy(2, _version(rig, 2, seed=2))
    assert (rig.last(2, "FAILED").reason or "").startswith("VERIFYING: disk: ")
    assert rig.states(2)[-1] == "ROLLED_BACK"
    _serving(rig, 1)


def test_an_unforeseen_error_still_ends_in_failed(rig: Rig) -> None:
    """Any exception (here the kind a set mutated under iteration raises) is reported."""
    _v1(rig)
    rig.fetcher.error = RuntimeError("Set changed size during iteration")
    rig.deploy(2, _version(rig, 2, seed=2))
    assert rig.states(2)[-2:] == ["FAILED", "ROLLED_BACK"]
    assert rig.last(2, "FAILED").reason == (
        "DOWNLOADING: RuntimeError: Set changed size during iteration"
    )
    rig.fetcher.error = None
    rig.deploy(3, _version(rig, 3, seed=3))
    _serving(rig, 3)


def test_a_reason_longer_than_the_protocol_allows_is_cut_not_lost(rig: Rig) -> None:
    rig.fetcher.error = ServiceUnavailable("stalled " * 1000)
    rig.deploy(1, _version(rig, 1, seed=1))
    failed = rig.last(1, "FAILED")
    assert (failed.reason or "").startswith("DOWNLOADING: stalled stalled")
    assert len(failed.reason or "") <= 2000


def test_a_status_that_cannot_be_published_does_not_abort_the_deployment(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    published = rig.deployer.publish_status
    calls = [0]

    def flaky(event: StatusEvent) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise ValueError("the link refused the message")
        published(event)

    rig.deployer.publish_status = flaky
    try:
        rig.deploy(1, _version(rig, 1, seed=1))
        assert rig.states(1)[-1] == "ACTIVE"
        _serving(rig, 1)
    finally:
        rig.deployer.stop()


def test_a_stop_mid_download_leaves_the_rev_to_resume_on_the_next_start(tmp_path: Path) -> None:
    """Stopping while a download runs must not mark the rev applied: the retained document,
    delivered again on the next start, then resumes it instead of being skipped as done."""
    first = _rig(tmp_path)
    manifest = _version(first, 1, seed=1)
    first.fetcher.hold = True
    first.send(1, manifest)
    assert first.fetcher.started.wait(10)
    first.deployer.stop()
    assert first.store.state.rev_applied == 0
    assert first.applied == []

    second = _rig(tmp_path, first.key)
    second.fetcher.blobs = first.fetcher.blobs
    try:
        second.deploy(1, manifest)
        assert second.states(1)[-1] == "ACTIVE"
        _serving(second, 1)
        assert second.store.state.rev_applied == 1
    finally:
        second.deployer.stop()


def test_a_model_the_store_holds_but_the_runtime_does_not_serve_is_health_checked(
    rig: Rig,
) -> None:
    """The store points at v1 (say it failed to load at start): the same bytes asked again
    must be loaded and checked, not reported ACTIVE while nothing serves them."""
    data = tiny_classifier(seed=1)
    manifest = manifest_for(data, golden=[golden_for(data, {"input": ROW})])
    put_blob(rig.store, data, manifest.artifact)
    rig.store.activate(Installed(manifest))
    rig.deploy(1, manifest)
    assert rig.states(1)[-3:] == ["STAGED", "HEALTHCHECK", "ACTIVE"]
    _serving(rig, 1)


def test_the_same_bytes_as_a_new_version_only_relabel_what_serves(rig: Rig) -> None:
    _v1(rig)
    data = tiny_classifier(seed=1)
    relabelled = manifest_for(data, version=2, golden=[golden_for(data, {"input": ROW})])
    rig.deploy(2, relabelled)
    assert rig.states(2) == ["ACTIVE"]
    _serving(rig, 2)
    assert rig.store.active("m").version == 2  # type: ignore[union-attr]


def test_a_rev_applied_before_a_restart_is_said_active_again(tmp_path: Path) -> None:
    """The agent applied rev 1 and stopped before its ACTIVE reached the broker (a crash, or
    a stop while it finished): the next start finds the rev applied and the model served,
    and the retained document, delivered again, makes it say ACTIVE for rev 1 once more,
    without downloading anything. Before, it said nothing, and a rollout waited for an
    ACTIVE that never came (seen with the simulator's restarts). A second delivery of the
    same document (a reconnect) says nothing more."""
    first = _rig(tmp_path)
    manifest = _version(first, 1, seed=1)
    first.deploy(1, manifest)
    first.deployer.stop()
    second = _rig(tmp_path, first.key)
    path = second.store.blob_path(manifest.artifact.sha256)
    second.runtime.swap(second.runtime.load(manifest, path))  # what the agent's start does
    try:
        second.deploy(1, manifest)
        assert second.states(1) == ["ACTIVE"]
        assert second.last(1, "ACTIVE").rev == 1
        second.deploy(1, manifest)
        assert second.states(1) == ["ACTIVE"]
    finally:
        second.deployer.stop()


def test_a_failed_rev_is_not_retried_after_a_restart(tmp_path: Path) -> None:
    """Rev 1 fails at DOWNLOADING (a stalled download) and is applied as failed. The next
    start receives the retained rev 1 again: it neither downloads nor activates it, and says
    nothing about it — a FAILED rev is retried only by a newer rev, on an operator's purpose
    (cloud/fleet/desired.py renew). Before, every restart took it again in full."""
    first = _rig(tmp_path)
    manifest = _version(first, 1, seed=1)
    first.fetcher.error = ServiceUnavailable("download stalled")
    first.deploy(1, manifest)
    assert first.states(1)[-1] == "FAILED"
    assert first.store.state.rev_applied == 1
    first.deployer.stop()
    second = _rig(tmp_path, first.key)
    second.fetcher.blobs = first.fetcher.blobs
    try:
        second.deploy(1, manifest)
        assert second.states(1) == []
        assert not second.fetcher.started.is_set()
        assert "m" not in second.runtime.models()
        assert second.store.active("m") is None
    finally:
        second.deployer.stop()


def test_after_a_restart_only_what_the_rev_activated_is_said_active_again(
    tmp_path: Path,
) -> None:
    """Rev 1 names two models: m activates, n fails its health check. After a restart the
    retained rev 1 makes the agent say ACTIVE for m (that event may have been lost at the
    stop) and nothing for n, which is not checked again."""
    first = _rig(tmp_path)
    good = _version(first, 1, seed=1)
    data = tiny_classifier(seed=2)
    first.fetcher.offer(data)
    bad = manifest_for(
        data, model="n", golden=[GoldenExample(inputs={"input": ROW[:3]}, outputs={})]
    )
    first.deploy(1, good, bad)
    assert [
        (e.model, e.state.value) for e in first.events if e.state.value in ("ACTIVE", "FAILED")
    ] == [("m", "ACTIVE"), ("n", "FAILED")]
    first.deployer.stop()
    second = _rig(tmp_path, first.key)
    installed = second.store.active("m")
    assert installed is not None
    path = second.store.blob_path(good.artifact.sha256)
    second.runtime.swap(second.runtime.load(installed.manifest, path))  # the agent's start
    try:
        second.deploy(1, good, bad)
        assert [(e.model, e.state.value, e.rev) for e in second.events] == [("m", "ACTIVE", 1)]
        assert "n" not in second.runtime.models()
    finally:
        second.deployer.stop()


def test_a_deployer_stopped_during_a_health_check_activates_nothing(tmp_path: Path) -> None:
    """Stop comes while the health check runs (and outlasts the stop's wait): when the check
    ends, the stopped deployer neither activates the model nor marks the rev applied — the
    agent that replaces it on the same data dir does, and says so."""
    rig = _rig(tmp_path)
    manifest = _version(rig, 1, seed=1)
    checking, release = threading.Event(), threading.Event()
    load = rig.runtime.load

    def slow_load(manifest: Manifest, path: Path):  # type: ignore[no-untyped-def]
        checking.set()
        release.wait(10)
        return load(manifest, path)

    rig.runtime.load = slow_load  # type: ignore[method-assign]
    rig.send(1, manifest)
    assert checking.wait(10)
    stopping = threading.Thread(target=rig.deployer.stop)
    stopping.start()
    wait_for(lambda: rig.deployer._stop.is_set(), 10, "the stop")
    release.set()
    stopping.join(10)
    assert rig.store.active("m") is None
    assert rig.store.state.rev_applied == 0
    assert "ACTIVE" not in rig.states(1)
