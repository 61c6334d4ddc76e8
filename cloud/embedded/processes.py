"""Child processes in their own session that die with their parent, stop steps that all run
even when one is interrupted, and free local ports."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from shared.errors import ServiceUnavailable

__all__ = [
    "ChildProcess",
    "describe_exit",
    "free_port",
    "port_open",
    "run_all",
    "wait_for_port",
]

_LOGGER = logging.getLogger(__name__)

# Started first in every child, see ``ChildProcess.spawn``.
_DIE_WITH_PARENT = str(Path(__file__).with_name("die_with_parent.py"))


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
    host: str,
    port: int,
    *,
    timeout: float,
    process: subprocess.Popen[bytes],
    argv: Sequence[str] | None = None,
) -> None:
    """Until ``process`` (which runs ``argv``, when its Popen args are a launcher's) listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceUnavailable(
                f"{argv or process.args!r} exited with {process.returncode} during start"
            )
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise ServiceUnavailable(f"nothing listened on {host}:{port} within {timeout:g}s")


def _executable(program: str, env: Mapping[str, str] | None) -> str:
    """The file ``program`` names, looked up on the child's PATH as Popen would: a missing
    program is an error here, in the parent, not an exit status of the child."""
    found = shutil.which(program, path=os.pathsep.join(os.get_exec_path(env)))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    return found


def describe_exit(code: int) -> str:
    """An exit status as a person reads it: "code 3", "killed by SIGKILL"."""
    if code >= 0:
        return f"code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def run_all(steps: Iterable[tuple[str, Callable[[], None]]]) -> None:
    """Run every step, in order, even when one fails or a Ctrl-C interrupts it; then raise
    KeyboardInterrupt if any step was interrupted, else the first error, if any."""
    interrupted: KeyboardInterrupt | None = None
    failed: Exception | None = None
    for name, step in steps:
        try:
            step()
        except KeyboardInterrupt as exc:
            _LOGGER.warning("interrupted while %s", name)
            interrupted = interrupted or exc
        except Exception as exc:
            _LOGGER.error("%s failed: %s", name, exc)
            _LOGGER.debug("%s failed", name, exc_info=True)
            failed = failed or exc
    if interrupted is not None:
        raise interrupted
    if failed is not None:
        raise failed


class ChildProcess:
    """A process started as a child, stopped by ``stop()``, at exit, or when we die.

    It runs in a session of its own, so a terminal's Ctrl-C (SIGINT to the whole
    foreground process group) reaches only us: we stop children in our own order, after
    what still uses them. Only ``stop()`` reaps it: until then its pid cannot be reused,
    so signalling its process group stays safe even after it exited.
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
        """Start the process and return at once; see ``start`` and ``wait_until``.

        Never by ``fork()`` (a ``preexec_fn`` would make Popen fork): this process may run
        threads that fork handlers restart in the child, gRPC's poller among them, which
        then abort the child when Popen closes its inherited fds before exec. Popen uses
        vfork and exec; the child's first program sets the parent-death signal, checks that
        we are still its parent, and becomes ``argv`` (see ``cloud.embedded.die_with_parent``).
        """
        launcher = [sys.executable, "-I", "-S", _DIE_WITH_PARENT, str(os.getpid())]
        executable = _executable(self.argv[0], self.env)
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [*launcher, executable, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        finally:
            if not isinstance(log, int):
                log.close()

    def start(self, *, host: str, port: int, timeout: float = 15.0) -> None:
        """Spawn a server and return once it listens on ``host:port``."""
        self.spawn()
        assert self.process is not None
        try:
            wait_for_port(host, port, timeout=timeout, process=self.process, argv=self.argv)
        except BaseException:
            self.stop()
            raise

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll ``ready`` until it holds; fail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.exit_code() if self.process is not None else "never started"
            if code is not None:
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
        return self.process is not None and self.exit_code() is None

    def exit_code(self) -> int | None:
        """The exit status once the process has ended (-N: killed by signal N), without
        reaping it; None while it runs (or once ``stop()`` forgot it)."""
        process = self.process
        if process is None:
            return None
        if process.returncode is not None:
            return process.returncode
        try:
            info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return process.poll()
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return info.si_status
        return -info.si_status

    def terminate(self) -> None:
        """Ask the process (and anything it started in its session) to stop; do not wait."""
        self._signal(signal.SIGTERM)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL to whatever is left of its process
        group, and reap it. Interrupted (a second Ctrl-C), it still kills and reaps."""
        process = self.process
        if process is None:
            return
        try:
            if self.exit_code() is None:
                self.terminate()
                deadline = time.monotonic() + timeout
                while self.exit_code() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
        finally:
            # Also what the leader left behind in its group; the leader, not yet reaped,
            # keeps the group's id from being reused.
            self._signal(signal.SIGKILL)
            process.wait()  # SIGKILL cannot be ignored: this returns
            self.process = None

    def _signal(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return  # reaped: its pid may belong to someone else now
        # The child leads its own process group (new session): signal the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
