"""The deployment state machine: a signed desired state in, a verified, health-checked,
atomically activated model out, with a status event for every step.

QUEUED → DOWNLOADING → VERIFYING → STAGED → HEALTHCHECK → ACTIVE
                                   any step → FAILED(reason)  (→ ROLLED_BACK: the old one stays)
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.healthcheck import health_check
from edge_agent.model_store import Installed, ModelStore
from edge_agent.runtime import Runtime
from shared.errors import EdgeFleetError, StaleRevision
from shared.messages import ArtifactRef, Deployment, DeploymentState, DesiredState, StatusEvent
from shared.signing import verify_desired_state

__all__ = ["Deployer", "Fetcher"]

_LOGGER = logging.getLogger(__name__)


class Fetcher(Protocol):
    def fetch(
        self, ref: ArtifactRef, progress: Callable[[int], None], stop: threading.Event
    ) -> None: ...


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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="deployer", daemon=True)
        self.busy = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(10)

    def idle(self) -> bool:
        return self._queue.empty() and not self.busy.is_set()

    # -- input (MQTT thread) -------------------------------------------------------------

    def on_desired(self, _topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            state = verify_desired_state(payload, self.public_key, device_id=self.device_id)
            if state.rev == self._highest_queued:
                _LOGGER.debug("rev %s already applied or queued", state.rev)
                return
            if state.rev < self._highest_queued:
                raise StaleRevision(
                    f"rev {state.rev} is not newer than rev {self._highest_queued} (anti-rollback)"
                )
        except EdgeFleetError as exc:
            _LOGGER.warning("desired state refused: %s", exc.message)
            self._status(DeploymentState.FAILED, rev=0, reason=f"refused: {exc.message}")
            return
        self._highest_queued = state.rev
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
            except Exception:
                _LOGGER.exception("applying rev %s failed", state.rev)
            finally:
                if self._queue.empty():
                    self.busy.clear()

    def _apply(self, state: DesiredState) -> None:
        for deployment in state.deployments:
            if self._stop.is_set():
                return
            if state.rev < self._highest_queued:
                return  # superseded while we worked: the newer rev decides
            self._deploy(state.rev, deployment)
        self.store.set_rev_applied(state.rev)
        self.on_applied()

    def _status(
        self,
        state: DeploymentState,
        *,
        rev: int,
        deployment: Deployment | None = None,
        reason: str | None = None,
        done: int = 0,
    ) -> None:
        manifest = deployment.manifest if deployment else None
        self.publish_status(
            StatusEvent(
                rev=rev,
                rollout_id=deployment.rollout_id if deployment else None,
                model=manifest.model if manifest else None,
                version=manifest.version if manifest else None,
                state=state,
                reason=reason,
                bytes_done=done,
                bytes_total=manifest.artifact.size if manifest else 0,
                at=datetime.now(UTC),
            )
        )

    def _deploy(self, rev: int, deployment: Deployment) -> None:
        manifest = deployment.manifest
        current = self.store.active(manifest.model)
        if current is not None and current.manifest.artifact.sha256 == manifest.artifact.sha256:
            if current.version != manifest.version or current.rollout_id != deployment.rollout_id:
                self.store.activate(Installed(manifest, deployment.rollout_id))
            self._status(
                DeploymentState.ACTIVE, rev=rev, deployment=deployment, done=manifest.artifact.size
            )
            return
        step = DeploymentState.QUEUED
        try:
            self._status(step, rev=rev, deployment=deployment)
            ref = manifest.artifact
            if not self.store.has_blob(ref):
                step = DeploymentState.DOWNLOADING
                last = [-1]

                def progress(done: int) -> None:
                    # Report roughly every 10 %, not every chunk.
                    if done * 10 // ref.size != last[0]:
                        last[0] = done * 10 // ref.size
                        self._status(step, rev=rev, deployment=deployment, done=done)

                progress(self.store.bytes_done(ref))
                self.fetcher.fetch(ref, progress, self._stop)
                if self._stop.is_set():
                    return
                step = DeploymentState.VERIFYING
                self._status(step, rev=rev, deployment=deployment, done=ref.size)
                path = self.store.finish(ref)
            else:
                path = self.store.blob_path(ref.sha256)
            step = DeploymentState.STAGED
            self._status(step, rev=rev, deployment=deployment, done=ref.size)
            step = DeploymentState.HEALTHCHECK
            self._status(step, rev=rev, deployment=deployment, done=ref.size)
            loaded = health_check(self.runtime, manifest, path)
            self.store.activate(Installed(manifest, deployment.rollout_id))
            self.runtime.swap(loaded)
            self._status(DeploymentState.ACTIVE, rev=rev, deployment=deployment, done=ref.size)
        except EdgeFleetError as exc:
            self._failed(rev, deployment, step, exc.message)
        except OSError as exc:
            self._failed(rev, deployment, step, f"disk: {exc}")

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
        kept = self.store.active(deployment.manifest.model)
        if kept is not None:
            self._status(
                DeploymentState.ROLLED_BACK,
                rev=rev,
                deployment=deployment,
                reason=f"kept {kept.manifest.model}:{kept.version}",
            )
