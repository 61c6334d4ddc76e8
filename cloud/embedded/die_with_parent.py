"""The first program a child runs: it asks Linux to end it with its parent, then becomes
the program it was started for (the same process: same pid, session and open files).

Run by path, standard library only:
``python -I -S die_with_parent.py PARENT_PID EXECUTABLE ARGV0 [ARG...]``. It exists so that
the parent can start children without ``fork()``: see ``ChildProcess.spawn`` in
``cloud.embedded.processes``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1
_ORPHANED = 1  # the exit status when the parent was gone before the prctl took effect
_CANNOT_RUN = 127  # a shell's status for a program it could not run


def main(argv: list[str]) -> int:
    """Set the parent-death signal (SIGTERM; it stays set across exec), leave at once if the
    parent that started us is gone already (it would never send it), else exec ``argv[1]``
    with the arguments ``argv[2:]``."""
    parent_pid, executable, *args = argv
    # Linux only; elsewhere the child just runs (it then outlives a parent killed hard).
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is not None and prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        print(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(error)}", file=sys.stderr)
        return _CANNOT_RUN
    if os.getppid() != int(parent_pid):
        return _ORPHANED
    try:
        os.execv(executable, args)  # noqa: S606 - an argv the parent chose, as Popen's
    except OSError as exc:
        print(f"cannot run {executable}: {exc.strerror}", file=sys.stderr)
    return _CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
