"""The coordinator: a loop in the API process that carries every federated run from PENDING to
a final state. It submits a run to the SuperLink (`flwr run`), copies the rounds the ServerApp
reports into SQL, ends a run that ran out of time, and finalizes a completed one.

One replica acts at a time (a Redis lock per look), and every state change is a
compare-and-set in SQL, so a replica that dies mid-way is simply replaced: a run left
FINALIZING by a dead finalizer is finalized again (nothing of it was committed).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.exceptions import LockError, RedisError
from sqlalchemy import select

from cloud.context import CloudContext
from cloud.federated.bundle import write_app
from cloud.federated.finalize import finalize_run
from cloud.federated.flower import FlowerCli, FlowerRun
from cloud.federated.head import find_head
from cloud.federated.plan import DpConfig, RunFiles, RunPlan, TrainSettings
from cloud.federated.schemas import ACTIVE_RUN_STATES, CANCELLABLE_RUN_STATES, RunState
from cloud.federated.settings import FederatedSettings
from cloud.federated.store import record_rounds, set_state
from cloud.registry.tables import FederatedRun, ModelVersion
from shared.errors import EdgeFleetError

__all__ = ["Coordinator", "flower_cli", "run_files"]

_LOGGER = logging.getLogger(__name__)
_LOCK = "edgefleet:lock:federated"
_STATUS_EVERY_S = 15.0
_SUBMIT_RETRY_S = 5.0
_GRACE_S = 120.0
_STALE_FINALIZING = timedelta(minutes=10)


def run_files(context: CloudContext, run_id: int) -> RunFiles:
    return RunFiles((context.settings.data_dir / "federated" / "runs" / str(run_id)).resolve())


def flower_cli(data_dir: Path, settings: FederatedSettings) -> FlowerCli:
    """The flwr CLI against the configured SuperLink, with its home under the data dir."""
    return FlowerCli(
        data_dir / "federated" / "flwr-home",
        address=settings.control_address,
        root_certificates=settings.ssl_ca_certfile if settings.tls else None,
    )


def _deadline(run: FederatedRun) -> datetime | None:
    if run.submitted_at is None:
        return None
    config = run.config
    per_round = float(config["wait_for_clients_s"]) + float(config["round_timeout_s"]) + 60.0
    submitted = run.submitted_at
    if submitted.tzinfo is None:  # SQLite gives naive datetimes back
        submitted = submitted.replace(tzinfo=UTC)
    return submitted + timedelta(seconds=int(config["rounds"]) * per_round + _GRACE_S)


class Coordinator:
    def __init__(
        self,
        context: CloudContext,
        settings: FederatedSettings,
        *,
        interval_s: float = 1.0,
        on_rollout: Callable[[], None] | None = None,
    ) -> None:
        self.context = context
        self.settings = settings
        self.interval_s = interval_s
        self.on_rollout = on_rollout
        self.cli = flower_cli(context.settings.data_dir, settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._status_at: dict[int, float] = {}
        self._submit_at: dict[int, float] = {}
        self._thread = threading.Thread(target=self._loop, name="federated", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                # One bad look must not end coordination: the next one tries again.
                _LOGGER.exception("federated coordinator: this look failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def tick(self) -> None:
        """Advance every active run one step (when this replica holds the lock)."""
        lock = self.context.redis.lock(_LOCK, timeout=600)
        try:
            if not lock.acquire(blocking=False):
                return
        except RedisError as exc:
            _LOGGER.warning("federated coordinator: Redis: %s", exc)
            return
        try:
            with self.context.database.session() as s:
                runs = list(
                    s.scalars(
                        select(FederatedRun)
                        .where(FederatedRun.state.in_([r.value for r in ACTIVE_RUN_STATES]))
                        .order_by(FederatedRun.id)
                    )
                )
            for run in runs:
                if self._stop.is_set():
                    return
                try:
                    self._advance(run)
                except EdgeFleetError as exc:
                    _LOGGER.warning("federated run %s: %s", run.id, exc.message)
        finally:
            # Expired while finalizing: the next replica may act, and nothing is lost.
            with contextlib.suppress(LockError, RedisError):
                lock.release()

    def _advance(self, run: FederatedRun) -> None:
        state = RunState(run.state)
        if state is RunState.PENDING:
            self._submit(run)
        elif state is RunState.RUNNING:
            self._follow(run)
        elif state is RunState.FINALIZING:
            updated = (
                run.updated_at if run.updated_at.tzinfo else run.updated_at.replace(tzinfo=UTC)
            )
            if datetime.now(UTC) - updated > _STALE_FINALIZING:
                _LOGGER.warning("federated run %s: finalizing again (stale)", run.id)
                self._finalize(run.id)

    # -- PENDING -> RUNNING ------------------------------------------------------------------

    def _plan(self, run: FederatedRun, files: RunFiles) -> None:
        config = run.config
        head = config["head"]
        with self.context.database.session() as s:
            base = s.get(ModelVersion, run.base_version_id)
            assert base is not None
            model_name, trainable, sha = base.model.name, list(base.trainable), base.artifact_sha256
        data = self.context.artifacts.path(sha).read_bytes()
        found = find_head(data, trainable, head["embedding_output"])
        files.write_head("base", found.arrays)
        files.write_plan(
            RunPlan(
                run_id=run.id,
                model=model_name,
                base_version=int(config["base_version"]),
                versions=list(config["versions"]),
                devices=list(config["devices"]),
                rounds=int(config["rounds"]),
                min_clients=int(config["min_clients"]),
                min_samples=int(config["min_samples"]),
                wait_for_clients_s=float(config["wait_for_clients_s"]),
                round_timeout_s=float(config["round_timeout_s"]),
                strategy=config["strategy"],
                proximal_mu=float(config["proximal_mu"]),
                dp=DpConfig.model_validate(config["dp"]) if config.get("dp") else None,
                train=TrainSettings.model_validate(config["train"]),
                weight_name=found.weight_name,
                bias_name=found.bias_name,
                embedding_output=head["embedding_output"],
                layout=found.layout,
            )
        )

    def _submit(self, run: FederatedRun) -> None:
        if time.monotonic() < self._submit_at.get(run.id, 0.0):
            return
        files = run_files(self.context, run.id)
        try:
            self._plan(run, files)
        except Exception as exc:
            # Not something a later look would fix (the base's graph, the disk): say so.
            _LOGGER.exception("federated run %s: could not be prepared", run.id)
            with self.context.database.session() as s:
                set_state(
                    s,
                    run.id,
                    expect=(RunState.PENDING,),
                    to=RunState.FAILED,
                    reason=f"the run could not be prepared: {type(exc).__name__}: {exc}"[:2000],
                )
            return
        app = write_app(self.context.settings.data_dir.resolve() / "federated" / "app")
        run_config = files.root / "run-config.toml"
        run_config.write_text(f'run-dir = "{_toml_path(files.root)}"\n')
        try:
            flower_id = self.cli.run(app, run_config)
        except EdgeFleetError as exc:
            created = (
                run.created_at if run.created_at.tzinfo else run.created_at.replace(tzinfo=UTC)
            )
            waited = (datetime.now(UTC) - created).total_seconds()
            if waited < float(run.config["wait_for_clients_s"]):
                self._submit_at[run.id] = time.monotonic() + _SUBMIT_RETRY_S
                _LOGGER.warning("federated run %s: not submitted yet: %s", run.id, exc.message)
                return
            with self.context.database.session() as s:
                set_state(
                    s,
                    run.id,
                    expect=(RunState.PENDING,),
                    to=RunState.FAILED,
                    reason=f"the SuperLink did not take the run: {exc.message}"[:2000],
                )
            return
        with self.context.database.session() as s:
            moved = set_state(
                s,
                run.id,
                expect=(RunState.PENDING,),
                to=RunState.RUNNING,
                flower_run_id=flower_id,
                submitted_at=datetime.now(UTC),
            )
        if not moved:  # cancelled meanwhile
            self._stop_flower(flower_id)
        _LOGGER.info("federated run %s submitted as Flower run %s", run.id, flower_id)

    # -- RUNNING -> a final state, or FINALIZING -----------------------------------------------

    def _follow(self, run: FederatedRun) -> None:
        files = run_files(self.context, run.id)
        reports = files.read_rounds()
        if reports:
            with self.context.database.session() as s:
                record_rounds(s, run.id, reports)
        outcome = files.read_outcome()
        if outcome is not None:
            traffic = self._traffic(run)
            if outcome.state == "COMPLETED":
                with self.context.database.session() as s:
                    moved = set_state(
                        s,
                        run.id,
                        expect=(RunState.RUNNING,),
                        to=RunState.FINALIZING,
                        metrics={**run.metrics, **traffic},
                    )
                if moved:
                    self._finalize(run.id)
            else:
                with self.context.database.session() as s:
                    set_state(
                        s,
                        run.id,
                        expect=(RunState.RUNNING,),
                        to=RunState(outcome.state),
                        reason=outcome.reason,
                        metrics={**run.metrics, **traffic},
                    )
            return
        deadline = _deadline(run)
        if deadline is not None and datetime.now(UTC) > deadline:
            reason = f"the run did not end by its deadline ({deadline:%H:%M:%S} UTC): stopped"
            with self.context.database.session() as s:
                moved = set_state(
                    s, run.id, expect=(RunState.RUNNING,), to=RunState.FAILED, reason=reason
                )
            if moved and run.flower_run_id:
                self._stop_flower(run.flower_run_id)
            return
        self._check_flower(run, files)

    def _check_flower(self, run: FederatedRun, files: RunFiles) -> None:
        """A ServerApp that died leaves no outcome: Flower's own status says it ended."""
        if run.flower_run_id is None:
            return
        if time.monotonic() < self._status_at.get(run.id, 0.0):
            return
        self._status_at[run.id] = time.monotonic() + _STATUS_EVERY_S
        status = self.cli.status(run.flower_run_id)
        if not status.finished or files.read_outcome() is not None:
            return
        reason = f"the ServerApp ended without a result (Flower: {status.status}"
        reason += f", {status.details})" if status.details not in ("", "N/A") else ")"
        with self.context.database.session() as s:
            set_state(s, run.id, expect=(RunState.RUNNING,), to=RunState.FAILED, reason=reason)

    def _traffic(self, run: FederatedRun) -> dict[str, object]:
        if run.flower_run_id is None:
            return {}
        try:
            status: FlowerRun = self.cli.status(run.flower_run_id)
        except EdgeFleetError as exc:
            _LOGGER.debug("federated run %s: no traffic figures: %s", run.id, exc.message)
            return {}
        return {
            "flower": {
                "status": status.status,
                "inbound_bytes": status.inbound_bytes,
                "outbound_bytes": status.outbound_bytes,
            }
        }

    def _finalize(self, run_id: int) -> None:
        with self.context.database.session() as s:
            set_state(s, run_id, expect=(RunState.FINALIZING,), to=RunState.FINALIZING)
        try:
            state = finalize_run(self.context, run_id, run_files(self.context, run_id))
        except Exception as exc:
            _LOGGER.exception("federated run %s: finalizing failed", run_id)
            with self.context.database.session() as s:
                set_state(
                    s,
                    run_id,
                    expect=(RunState.FINALIZING,),
                    to=RunState.FAILED,
                    reason=f"finalizing failed: {type(exc).__name__}: {exc}"[:2000],
                )
            return
        if state is RunState.COMPLETED and self.on_rollout is not None:
            self.on_rollout()

    def _stop_flower(self, flower_run_id: str) -> None:
        try:
            self.cli.stop(flower_run_id)
        except EdgeFleetError as exc:
            _LOGGER.warning("could not stop Flower run %s: %s", flower_run_id, exc.message)

    def cancel(self, run_id: int) -> bool:
        """Cancel a run that is pending or running; False when it was past that."""
        with self.context.database.session() as s:
            run = s.get(FederatedRun, run_id)
            flower_id = run.flower_run_id if run is not None else None
            moved = set_state(
                s,
                run_id,
                expect=CANCELLABLE_RUN_STATES,
                to=RunState.CANCELLED,
                reason="cancelled by an operator",
            )
        if moved and flower_id is not None:
            self._stop_flower(flower_id)
        return moved


def _toml_path(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace('"', '\\"')
