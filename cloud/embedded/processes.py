"""Child processes that die with their parent, and free local ports."""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ChildProcess", "free_port", "wait_for_port"]

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
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} during start")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout}s")


def _die_with_parent() -> None:
    # Linux: the kernel sends SIGTERM to the child when the parent dies, even by SIGKILL.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ChildProcess:
    """A server started as a child, stopped by ``stop()``, at exit, or when we die."""

    def __init__(self, argv: Sequence[str], *, log_path: Path | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, host: str, port: int, timeout: float = 15.0) -> None:
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        finally:
            if self.log_path and not isinstance(log, int):
                log.close()
        try:
            wait_for_port(host, port, timeout=timeout, process=self.process)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
