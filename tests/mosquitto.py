"""A Mosquitto of a test's own on a free port, configured like the shipped one (no logins)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cloud.embedded.processes import free_port, wait_for_port
from tests.pki import Pki

__all__ = ["SHIPPED_CONF", "broker_config", "mosquitto", "tls_mosquitto"]

SHIPPED_CONF = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "edgefleet.conf"
# What the tests replace: where it listens, who may log in, and what it keeps on disk.
_REPLACED = {
    "listener", "allow_anonymous", "password_file", "acl_file", "persistence", "user",
    "certfile", "keyfile", "cafile", "persistence_location", "autosave_interval",
}  # fmt: skip


def broker_config(port: int, **overrides: object) -> str:
    """The shipped config's limits on ``port``, anonymous, nothing on disk; ``overrides``
    replace (or add) single options, e.g. ``max_queued_messages=5``."""
    lines = []
    for line in SHIPPED_CONF.read_text().splitlines():
        key = line.split()[0] if line.strip() else "#"
        if key in _REPLACED or key in overrides or key.startswith("plugin"):
            continue
        lines.append(line)
    lines += [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    lines += [f"{key} {value}" for key, value in overrides.items()]
    if os.geteuid() == 0:
        lines.append("user root")  # as root it would switch to user "mosquitto"
    return "\n".join(lines) + "\n"


@contextmanager
def mosquitto(work: Path, **overrides: object) -> Iterator[int]:
    """Run a broker with :func:`broker_config`; yields its port. Skipped when not installed
    (failed with EDGEFLEET_REQUIRE_SERVICES=1)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
            pytest.fail("mosquitto is not installed, and EDGEFLEET_REQUIRE_SERVICES=1 requires it")
        pytest.skip("mosquitto is not installed")
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "mosquitto.conf"
    conf.write_text(broker_config(port, **overrides))
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout=10, process=proc)  # type: ignore[arg-type]
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


@contextmanager
def tls_mosquitto(work: Path, pki: Pki, **overrides: object) -> Iterator[int]:
    """:func:`mosquitto` whose only listener is TLS, with ``pki``'s broker certificate (e.g.
    ``require_certificate="true"`` in ``overrides``); yields its port."""
    files = {"cafile": pki.ca_file, "certfile": pki.server_cert, "keyfile": pki.server_key}
    with mosquitto(work, **files, **overrides) as port:
        yield port
