"""Child processes in their own session that die with their parent, and free local ports."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shared.errors import ServiceUnavailable

__all__ = ["ChildProcess", "free_port", "port_open", "wait_for_port"]

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, *, timeout: float, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceUnavailable(
                f"{process.args!r} exited with {process.returncode} during start"
            )
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise ServiceUnavailable(f"nothing listened on {host}:{port} within {timeout}s")


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the child when the thread that started it dies,
    # even by SIGKILL; start children from a thread that lives as long as they should.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ChildProcess:
    """A process started as a child, stopped by ``stop()``, at exit, or when we die.

    It runs in a session of its own, so a terminal's Ctrl-C (SIGINT to the whole
    foreground process group) reaches only us: we stop children in our own order, after
    what still uses them.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the process and return at once; see ``start`` and ``wait_until``."""
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if not isinstance(log, int):
                log.close()

    def start(self, *, host: str, port: int, timeout: float = 15.0) -> None:
        """Spawn a server and return once it listens on ``host:port``."""
        self.spawn()
        assert self.process is not None
        try:
            wait_for_port(host, port, timeout=timeout, process=self.process)
        except BaseException:
            self.stop()
            raise

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll ``ready`` until it holds; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise ServiceUnavailable(f"{what}: the process exited ({code}) during start")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"{what}: not ready within {timeout:g}s")
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Ask the process (and anything it started in its session) to stop; do not wait."""
        self._signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                process.wait(timeout)
        self.process = None

    def _signal(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        # The child leads its own process group (new session): signal the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
