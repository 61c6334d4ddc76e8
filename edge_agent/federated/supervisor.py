"""The agent's Flower SuperNode: one `flower-supernode` child process, restarted with jittered
backoff when it exits, stopped (with its whole process group) when the agent stops, and its
state (connecting, connected, backing off and why) for telemetry.

A SuperNode cannot run in a thread (it owns signal handlers and spawns its own children), so
it is a process of its own. It is told to give up on a SuperLink it cannot reach after
``connect_timeout_s``; the backoff between tries is ours, with full jitter, so a fleet whose
SuperLink comes back does not reconnect all at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from shared.fsutil import atomic_write
from shared.retry import Backoff

__all__ = [
    "SupernodeConfig",
    "SupernodeState",
    "SupernodeStatus",
    "SupernodeSupervisor",
    "write_node_config",
]

_LOGGER = logging.getLogger(__name__)
_CONNECTED = "SuperNode ID:"
_CONNECT_FAILED = "Failed to initialize the connection"
_LOG_LIMIT = 4 * 1024 * 1024
# Connected this long, the next exit starts the backoff from the beginning again.
_STABLE_S = 60.0
_FLWR_ENV = {
    # No phoning home from a device: Flower's telemetry and its PyPI update check are off,
    # and an app's dependencies are never installed at run time.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def _load_prctl() -> Callable[..., Any] | None:
    try:
        prctl: Callable[..., Any] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


# Loaded before any fork: the child may only call prctl between fork and exec.
_PRCTL = _load_prctl()


def _die_with_agent() -> None:
    """In the child before exec: SIGTERM when the agent dies, even by SIGKILL."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def write_node_config(path: Path, *, device_id: str, data_dir: Path) -> Path:
    """What the ClientApp is told about its device (node config ``device-id``, ``data-dir``),
    as a TOML file: a path may hold any character, which a command-line string may not."""
    toml = (
        f"device-id = {json.dumps(device_id)}\ndata-dir = {json.dumps(str(data_dir.resolve()))}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, toml.encode(), mode=0o600)
    return path


class SupernodeState(StrEnum):
    STARTING = "starting"  # started, not connected to the SuperLink yet
    CONNECTED = "connected"
    BACKOFF = "backoff"  # exited; waiting a jittered delay before the next start
    STOPPED = "stopped"
    MISSING = "missing"  # no flower-supernode to run (the edge-federated extra is absent)


@dataclass(frozen=True, slots=True)
class SupernodeConfig:
    command: list[str]
    superlink: str  # host:port of the SuperLink's Fleet API
    node_config_file: Path  # TOML: device-id, data-dir (what the ClientApp reads)
    home: Path  # FLWR_HOME of the SuperNode and its ClientApps
    log_path: Path
    root_certificates: Path | None = None
    insecure: bool = False
    private_key: Path | None = None
    runtime_port: int = 0  # the SuperNode's local Runtime API; 0: a free port at each start
    connect_timeout_s: float = 30.0

    def argv(self, runtime_port: int) -> list[str]:
        argv = [*self.command, "--superlink", self.superlink]
        argv += ["--node-config", str(self.node_config_file)]
        argv += ["--host", "127.0.0.1", "--port", str(runtime_port)]
        argv += ["--max-wait-time", f"{self.connect_timeout_s:g}"]
        if self.insecure:
            argv.append("--insecure")
        elif self.root_certificates is not None:
            argv += ["--root-certificates", str(self.root_certificates)]
        if self.private_key is not None:
            argv += ["--auth-supernode-private-key", str(self.private_key)]
        return argv


@dataclass(frozen=True, slots=True)
class SupernodeStatus:
    state: SupernodeState
    restarts: int = 0
    node_id: int | None = None
    reason: str | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Run:
    """What one start of the process said: whether it connected, and its last error."""

    connected_at: float | None = None
    node_id: int | None = None
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    # Why it could not connect, as Flower said it (the line after "Failed to initialize").
    failure: str | None = None
    _detail_next: bool = False


class SupernodeSupervisor:
    def __init__(self, config: SupernodeConfig, *, backoff: Backoff | None = None) -> None:
        self.config = config
        self.backoff = backoff or Backoff(base=1.0, cap=60.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._status = SupernodeStatus(SupernodeState.STARTING)
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._loop, name="supernode", daemon=True)

    def status(self) -> SupernodeStatus:
        with self._lock:
            return self._status

    def _set(self, **changes: object) -> None:
        with self._lock:
            current = self._status
            values = {
                "state": current.state,
                "restarts": current.restarts,
                "node_id": current.node_id,
                "reason": current.reason,
                **changes,
            }
            self._status = SupernodeStatus(**values)  # type: ignore[arg-type]

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the SuperNode's process group (it, its SuperExec and any ClientApp),
        SIGKILL after ``timeout``; returns once the loop has ended."""
        self._stop.set()
        self._terminate(timeout)
        if self._thread.is_alive():
            self._thread.join(timeout + 5)
        self._set(state=SupernodeState.STOPPED)

    def _terminate(self, timeout: float) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                run = self._run_once()
            except FileNotFoundError as exc:
                self._set(state=SupernodeState.MISSING, reason=f"cannot run the SuperNode: {exc}")
                _LOGGER.error("federated learning: cannot run the SuperNode: %s", exc)
                return
            except Exception as exc:
                # Never let the supervisor die: a failed start is one more backoff.
                _LOGGER.exception("federated learning: starting the SuperNode failed")
                run = _Run()
                run.last_lines.append(f"start failed: {exc}")
            if self._stop.is_set():
                return
            up_s = time.monotonic() - run.connected_at if run.connected_at is not None else 0.0
            stable = up_s > _STABLE_S
            attempt = 0 if stable else attempt + 1
            delay = self.backoff.delay(attempt)
            reason = self._exit_reason(run)
            _LOGGER.warning(
                "federated learning: the SuperNode exited (%s); next start in %.1fs", reason, delay
            )
            self._set(
                state=SupernodeState.BACKOFF,
                restarts=self.status().restarts + 1,
                node_id=None,
                reason=f"{reason}; next start in {delay:.1f}s",
            )
            self._stop.wait(delay)

    def _exit_reason(self, run: _Run) -> str:
        process = self._process
        code = process.returncode if process is not None else None
        if run.failure is not None:
            return (
                f"the SuperLink {self.config.superlink} refused or was out of reach: "
                + (run.failure)[:300]
            )
        if run.connected_at is None:
            last = run.last_lines[-1] if run.last_lines else "no output"
            return f"exited with code {code} before connecting: {last}"[:300]
        return f"exited with code {code} after being connected"

    def _run_once(self) -> _Run:
        config = self.config
        config.home.mkdir(parents=True, exist_ok=True)
        config.log_path.parent.mkdir(parents=True, exist_ok=True)
        if config.log_path.exists() and config.log_path.stat().st_size > _LOG_LIMIT:
            config.log_path.replace(config.log_path.with_name(config.log_path.name + ".1"))
        port = config.runtime_port or _free_port()
        env = {**os.environ, **_FLWR_ENV, "FLWR_HOME": str(config.home)}
        # It starts `flower-superexec`, which starts `flwr-clientapp`, by name: from the
        # SuperNode's own installation (maybe a venv of its own), whatever our PATH is.
        env["PATH"] = os.pathsep.join([str(Path(config.command[0]).parent), env.get("PATH", "")])
        # The reason of the last exit stays until it connects: what telemetry should show.
        self._set(state=SupernodeState.STARTING, node_id=None)
        process = subprocess.Popen(
            config.argv(port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_agent,
        )
        self._process = process
        if self._stop.is_set():
            self._terminate(5.0)
        run = _Run()
        pump = threading.Thread(target=self._pump, args=(process, run), daemon=True)
        pump.start()
        # Exited, not reaped yet: its process group cannot have been reused. What it started
        # there (its SuperExec, a ClientApp) goes with it, or it would keep our pipe open.
        try:
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            os.killpg(process.pid, signal.SIGKILL)
        except (ChildProcessError, ProcessLookupError):
            pass  # reaped by stop() already, which took the group down itself
        process.wait()
        pump.join(10)
        return run

    def _pump(self, process: subprocess.Popen[bytes], run: _Run) -> None:
        """Copy the SuperNode's output to its log, and learn its state from it."""
        assert process.stdout is not None
        with self.config.log_path.open("ab") as log, process.stdout:
            for raw in process.stdout:
                log.write(raw)
                log.flush()
                self._on_line(run, raw.decode("utf-8", "replace").strip())

    def _on_line(self, run: _Run, line: str) -> None:
        if not line:
            return
        run.last_lines.append(line)
        if run._detail_next:
            run.failure, run._detail_next = line, False
        if _CONNECT_FAILED in line:
            run.failure, run._detail_next = line, True
        if _CONNECTED in line and run.connected_at is None:
            run.connected_at = time.monotonic()
            with contextlib.suppress(ValueError):
                run.node_id = int(line.rsplit(_CONNECTED, 1)[1].strip())
            self._set(state=SupernodeState.CONNECTED, node_id=run.node_id, reason=None)
            _LOGGER.info("federated learning: connected to %s as node %s",
                         self.config.superlink, run.node_id)  # fmt: skip
