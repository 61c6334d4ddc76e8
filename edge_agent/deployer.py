"""The deployment state machine: a signed desired state in, a verified, health-checked,
atomically activated model out, with a status event for every step.

QUEUED → DOWNLOADING → VERIFYING → STAGED → HEALTHCHECK → ACTIVE
                                   any step → FAILED(reason)  (→ ROLLED_BACK: the old one stays)
a model the document no longer names → REMOVED (unloaded, off the store, its blob collected)

Whatever raises during a deployment (our errors, a disk error, an engine error, a bug) ends in
FAILED with its reason; the deployer thread goes on with the next rev. A newer document that no
longer wants what is being deployed stops that work (FAILED "superseded"; a download at its
next check): once that document has arrived, the version it dropped is never activated.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.healthcheck import health_check
from edge_agent.model_store import Installed, ModelStore
from edge_agent.runtime import LoadedModel, Runtime, error_line
from shared.errors import EdgeFleetError, StaleRevision
from shared.messages import (
    ArtifactRef,
    Deployment,
    DeploymentState,
    DesiredState,
    Manifest,
    StatusEvent,
)
from shared.signing import verify_desired_state

__all__ = ["Deployer", "Fetcher"]

_LOGGER = logging.getLogger(__name__)
MAX_REASON = 1000  # StatusEvent.reason allows 2,000; a reason is a line, not a dump


class Fetcher(Protocol):
    def fetch(
        self, ref: ArtifactRef, progress: Callable[[int], None], stop: threading.Event
    ) -> None: ...


class _Superseded(Exception):
    """A newer document arrived that no longer wants the deployment under way."""

    def __init__(self, rev: int) -> None:
        super().__init__(f"superseded by rev {rev} before it was activated")


@dataclass
class _Work:
    """The deployment under way, as the MQTT thread sees it: a newer document that does not
    want it sets ``cancel`` (which also stops its download), unless it is ``committed``
    (activation already decided; the newer document is applied right after)."""

    manifest: Manifest
    cancel: threading.Event = field(default_factory=threading.Event)
    committed: bool = False
    superseded_by: int | None = None


class Deployer:
    def __init__(
        self,
        *,
        device_id: str,
        public_key: Ed25519PublicKey,
        store: ModelStore,
        runtime: Runtime,
        fetcher: Fetcher,
        publish_status: Callable[[StatusEvent], None],
        on_applied: Callable[[], None],
    ) -> None:
        self.device_id = device_id
        self.public_key = public_key
        self.store = store
        self.runtime = runtime
        self.fetcher = fetcher
        self.publish_status = publish_status
        self.on_applied = on_applied
        self._queue: queue.Queue[DesiredState | None] = queue.Queue()
        self._highest_queued = store.state.rev_applied
        # Nothing taken since this start: the rev applied, delivered again, says ACTIVE once
        # more for what it activated (that event may not have left before the last stop; the
        # rollout waits for it). See _say_active_again.
        self._fresh = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="deployer", daemon=True)
        self.busy = threading.Event()
        # Orders "a newer document arrived" against "activate now": one or the other first.
        self._gate = threading.Lock()
        self._current: _Work | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._gate:
            if self._current is not None:
                self._current.cancel.set()
        self._queue.put(None)
        if self._thread.ident is not None:  # never started: nothing to wait for
            self._thread.join(10)

    def idle(self) -> bool:
        return self._queue.empty() and not self.busy.is_set()

    # -- input (MQTT thread) -------------------------------------------------------------

    def on_desired(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            state = verify_desired_state(payload, self.public_key, device_id=self.device_id)
            if state.rev == self._highest_queued and not self._fresh:
                _LOGGER.debug("rev %s already applied or queued", state.rev)
                return
            if state.rev < self._highest_queued:
                raise StaleRevision(
                    f"rev {state.rev} is not newer than rev {self._highest_queued} (anti-rollback)"
                )
        except Exception as exc:
            reason = _describe(exc)
            _LOGGER.warning("desired state refused: %s", reason)
            self._status(DeploymentState.FAILED, rev=0, reason=f"refused: {reason}")
            return
        with self._gate:
            self._highest_queued = state.rev
            self._fresh = False
            work = self._current
            if work is not None and not work.committed and not _wants(state, work.manifest):
                work.superseded_by = state.rev
                work.cancel.set()
        self.busy.set()
        self._queue.put(state)

    # -- work (deployer thread) ----------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            state = self._queue.get()
            if state is None:
                return
            self.busy.set()
            try:
                self._apply(state)
            except Exception as exc:
                # Each deployment reports its own failure; what lands here is the rev's
                # bookkeeping (recording it, reporting it). Say so and take the next rev.
                _LOGGER.exception("applying rev %s failed", state.rev)
                self._status(
                    DeploymentState.FAILED,
                    rev=state.rev,
                    reason=f"rev {state.rev}: {_describe(exc)}",
                )
            finally:
                if self._queue.empty():
                    self.busy.clear()

    def _apply(self, state: DesiredState) -> None:
        if state.rev < self._highest_queued:
            return  # a newer rev is queued behind this one: it decides
        if state.rev == self.store.state.rev_applied:
            # Only the first delivery after a start gets here (on_desired drops a repeat).
            self._say_active_again(state)
            self.on_applied()
            return
        self._remove_unnamed(state)
        for deployment in state.deployments:
            if self._stop.is_set():
                return
            if state.rev < self._highest_queued:
                return  # superseded while we worked: the newer rev decides
            self._deploy(state.rev, deployment)
        if self._stop.is_set():
            # Stopped mid-way: the rev is not applied, so the retained document (delivered
            # again on the next start) resumes it instead of being skipped as done.
            return
        self.store.discard_partials({d.manifest.artifact.sha256 for d in state.deployments})
        self.store.set_rev_applied(state.rev)
        self.on_applied()

    def _say_active_again(self, state: DesiredState) -> None:
        """The rev was applied before this start: say ACTIVE again for each model it
        activated (served and stored exactly as it names it), and leave the rest as it
        ended — a FAILED rev is retried only by a newer rev (cloud/fleet/desired.py renew),
        not downloaded and checked again at every start."""
        for deployment in state.deployments:
            manifest = deployment.manifest
            served = self.runtime.models().get(manifest.model)
            installed = self.store.active(manifest.model)
            if (
                served is not None
                and served.manifest == manifest
                and installed == Installed(manifest, deployment.rollout_id)
            ):
                self._status(
                    DeploymentState.ACTIVE, rev=state.rev, deployment=deployment,
                    done=manifest.artifact.size,
                )  # fmt: skip
            else:
                _LOGGER.info(
                    "%s:%s of rev %s was not activated before this start; a newer rev retries it",
                    manifest.model, manifest.version, state.rev,
                )  # fmt: skip

    def _remove_unnamed(self, state: DesiredState) -> None:
        """The document is the device's whole desired state: a model it does not name is
        taken off. The store first (a crash after it never serves the model again), then the
        runtime (requests under way finish on their session), then the report, so REMOVED
        is only ever said of a model nothing serves any more."""
        named = {d.manifest.model for d in state.deployments}
        present = set(self.store.state.active) | set(self.runtime.models())
        for model in sorted(present - named):
            if self._stop.is_set():
                return
            served = self.runtime.models().get(model)
            installed = self.store.active(model)
            version = installed.version if installed else served.version if served else None
            try:
                self.store.remove(model)
                self.runtime.unload(model)
            except Exception as exc:
                _LOGGER.exception("could not remove %s", model)
                self._status(
                    DeploymentState.FAILED, rev=state.rev, model=model, version=version,
                    reason=f"removing: {_describe(exc)}",
                )  # fmt: skip
                continue
            _LOGGER.info("%s:%s removed (rev %s no longer names it)", model, version, state.rev)
            self._status(
                DeploymentState.REMOVED, rev=state.rev, model=model, version=version,
                reason=f"rev {state.rev} does not name it",
            )  # fmt: skip

    def _status(
        self,
        state: DeploymentState,
        *,
        rev: int,
        deployment: Deployment | None = None,
        reason: str | None = None,
        done: int = 0,
        model: str | None = None,
        version: int | None = None,
    ) -> None:
        """Publish one status event (about ``deployment``, or a ``model`` without one); a
        failure to publish is logged, never raised, so that a report that cannot be sent does
        not abort (or hide) the deployment it reports on."""
        manifest = deployment.manifest if deployment else None
        try:
            self.publish_status(
                StatusEvent(
                    rev=rev,
                    rollout_id=deployment.rollout_id if deployment else None,
                    model=manifest.model if manifest else model,
                    version=manifest.version if manifest else version,
                    state=state,
                    reason=reason[:MAX_REASON] if reason is not None else None,
                    bytes_done=done,
                    bytes_total=manifest.artifact.size if manifest else 0,
                    at=datetime.now(UTC),
                )
            )
        except Exception:
            _LOGGER.exception("could not publish status %s for rev %s", state, rev)

    def _deploy(self, rev: int, deployment: Deployment) -> None:
        manifest = deployment.manifest
        step = DeploymentState.QUEUED
        work = self._begin(manifest)
        try:
            served = self.runtime.models().get(manifest.model)
            if served is not None and served.manifest.artifact.sha256 == manifest.artifact.sha256:
                self._commit(work)
                self._relabel(rev, deployment, served)
                return
            self._status(step, rev=rev, deployment=deployment)
            ref = manifest.artifact
            if not self.store.has_blob(ref):
                step = DeploymentState.DOWNLOADING
                self._download(rev, deployment, work.cancel)
                if self._stop.is_set():
                    return
                self._check(work)
                step = DeploymentState.VERIFYING
                self._status(step, rev=rev, deployment=deployment, done=ref.size)
                path = self.store.finish(ref)
            else:
                path = self.store.blob_path(ref.sha256)
            self._check(work)
            step = DeploymentState.STAGED
            self._status(step, rev=rev, deployment=deployment, done=ref.size)
            step = DeploymentState.HEALTHCHECK
            self._status(step, rev=rev, deployment=deployment, done=ref.size)
            loaded = health_check(self.runtime, manifest, path)
            if self._stop.is_set():
                return  # stopped meanwhile: the agent that comes next decides, and says so
            self._commit(work)
            self.store.activate(Installed(manifest, deployment.rollout_id))
            self.runtime.swap(loaded)
            self._status(DeploymentState.ACTIVE, rev=rev, deployment=deployment, done=ref.size)
        except _Superseded as exc:
            self._failed(rev, deployment, step, str(exc))
        except EdgeFleetError as exc:
            self._failed(rev, deployment, step, exc.message)
        except OSError as exc:
            self._failed(rev, deployment, step, f"disk: {exc}")
        except Exception as exc:
            # A bug or a library error nobody foresaw: still a FAILED with its reason, never
            # a deployment left at an intermediate state.
            _LOGGER.exception("%s:%s failed unexpectedly", manifest.model, manifest.version)
            self._failed(rev, deployment, step, _describe(exc))
        finally:
            with self._gate:
                self._current = None

    # -- a newer document stops what it no longer wants ---------------------------------

    def _begin(self, manifest: Manifest) -> _Work:
        work = _Work(manifest)
        with self._gate:
            if self._stop.is_set():
                work.cancel.set()  # stop() ran before this work existed to be cancelled
            self._current = work
        return work

    def _check(self, work: _Work) -> None:
        if work.superseded_by is not None:
            raise _Superseded(work.superseded_by)

    def _commit(self, work: _Work) -> None:
        """The point of no return before activation: from here on a newer document waits
        for this deployment (and then undoes it); before it, it stops it."""
        with self._gate:
            self._check(work)
            work.committed = True

    def _relabel(self, rev: int, deployment: Deployment, served: LoadedModel) -> None:
        """The bytes already serve: only the version label or the rollout changes."""
        manifest = deployment.manifest
        current = self.store.active(manifest.model)
        if (
            current is None
            or current.manifest.artifact.sha256 != manifest.artifact.sha256
            or current.version != manifest.version
            or current.rollout_id != deployment.rollout_id
        ):
            self.store.activate(Installed(manifest, deployment.rollout_id))
        if served.manifest != manifest:
            self.runtime.swap(LoadedModel(manifest, served.session, served.output_names))
        self._status(
            DeploymentState.ACTIVE, rev=rev, deployment=deployment, done=manifest.artifact.size
        )

    def _download(self, rev: int, deployment: Deployment, cancel: threading.Event) -> None:
        ref = deployment.manifest.artifact
        last = [-1]

        def progress(done: int) -> None:
            # Report roughly every 10 %, not every chunk.
            if done * 10 // ref.size != last[0]:
                last[0] = done * 10 // ref.size
                self._status(DeploymentState.DOWNLOADING, rev=rev, deployment=deployment, done=done)

        progress(self.store.bytes_done(ref))
        self.fetcher.fetch(ref, progress, cancel)

    def _failed(self, rev: int, deployment: Deployment, step: DeploymentState, reason: str) -> None:
        _LOGGER.warning(
            "%s:%s failed at %s: %s",
            deployment.manifest.model,
            deployment.manifest.version,
            step,
            reason,
        )
        self._status(
            DeploymentState.FAILED, rev=rev, deployment=deployment, reason=f"{step.value}: {reason}"
        )
        # What is kept is what the runtime serves, whatever the store says.
        kept = self.runtime.models().get(deployment.manifest.model)
        if kept is not None:
            self._status(
                DeploymentState.ROLLED_BACK,
                rev=rev,
                deployment=deployment,
                reason=f"kept {kept.manifest.model}:{kept.version}",
            )


def _wants(state: DesiredState, manifest: Manifest) -> bool:
    """Whether ``state`` still asks for exactly ``manifest`` (then its work goes on)."""
    return any(d.manifest == manifest for d in state.deployments)


def _describe(exc: BaseException) -> str:
    """An exception as one line for a status reason: its type and first line."""
    if isinstance(exc, EdgeFleetError):
        return exc.message
    return f"{type(exc).__name__}: {error_line(exc)}"
