"""The embedded Mosquitto's files: its config and its logins, private to the data dir."""

from __future__ import annotations

import json
import os
import pwd
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.broker.setup import (
    DEFAULT_CLOUD_USERNAME,
    dynsec_config,
    find_plugin,
    new_password,
    plugin_conf,
)
from shared.errors import ServiceUnavailable
from shared.fsutil import atomic_write

__all__ = [
    "BROKER_MAX_PAYLOAD",
    "QUEUE_LIMITS",
    "BrokerLogin",
    "MosquittoFiles",
    "find_mosquitto",
    "mosquitto_conf",
    "write_private",
]

# Artifact chunks are at most 1 MiB plus headers; rumqttd's default (20 KiB) is too small.
BROKER_MAX_PAYLOAD = 2 * 1024 * 1024

# The queue limits of deploy/mosquitto/edgefleet.conf, so the demo's broker drops (or keeps)
# what production's does; tests/cloud/test_services.py keeps the two equal.
QUEUE_LIMITS: dict[str, str] = {
    "max_queued_messages": "500000",
    "max_queued_bytes": "268435456",
    "max_inflight_messages": "2000",
    "max_inflight_bytes": "8388608",
    "max_packet_size": str(BROKER_MAX_PAYLOAD),
    "persistent_client_expiration": "7d",
}

# Debian installs the broker in sbin, which is not on every user's PATH.
_SBIN = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


@dataclass(frozen=True, slots=True)
class BrokerLogin:
    """The cloud's own login on the embedded broker (admin of its dynamic security)."""

    username: str
    password: str = field(repr=False)


def find_mosquitto() -> tuple[str, Path] | None:
    """This machine's mosquitto binary and dynamic-security plugin, when it has both."""
    binary = shutil.which("mosquitto") or next(
        (path for path in _SBIN if os.access(path, os.X_OK)), None
    )
    plugin = find_plugin()
    if binary is None or plugin is None:
        return None
    return binary, plugin


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file that is mode 0600 from its creation on."""
    atomic_write(path, text.encode(), mode=0o600)


def mosquitto_conf(*, port: int, plugin: Path, dynsec_file: Path) -> str:
    """A broker on 127.0.0.1:``port``: no anonymous clients, logins and ACLs from the plugin
    (as ``deploy/mosquitto/dynsec.conf``), the shipped queue limits, and persistence in the
    plugin file's folder: the cloud's session (what devices said while it was away) and the
    retained documents outlive a restart of the demo."""
    lines = [
        "# Written by EdgeFleet at each start of its embedded broker: edits here are lost.",
        f"listener {port} 127.0.0.1",
        *plugin_conf(dynsec_file, plugin).splitlines(),
        *(f"{key} {value}" for key, value in QUEUE_LIMITS.items()),
        "persistence true",
        f"persistence_location {dynsec_file.parent}/",
        "autosave_interval 30",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if os.geteuid() == 0:
        # Started as root, Mosquitto switches to user "mosquitto", which may not write the
        # plugin's file in our private folder; like the other children, it stays our user.
        lines.append(f"user {pwd.getpwuid(0).pw_name}")
    return "\n".join(lines) + "\n"


def _with_cloud_login(current: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """``current`` with the cloud's login, its role, the device template and the default
    access taken from ``fresh``; every other login, role and group kept as it is."""
    fresh_users = {c["username"] for c in fresh["clients"]}
    fresh_roles = {r["rolename"] for r in fresh["roles"]}
    clients = [
        c
        for c in current.get("clients", [])
        if isinstance(c, dict) and c.get("username") not in fresh_users
    ]
    roles = [
        r
        for r in current.get("roles", [])
        if isinstance(r, dict) and r.get("rolename") not in fresh_roles
    ]
    return {
        **current,
        "defaultACLAccess": fresh["defaultACLAccess"],
        "clients": [*fresh["clients"], *clients],
        "groups": current.get("groups", []),
        "roles": [*fresh["roles"], *roles],
    }


class MosquittoFiles:
    """``folder`` (mode 0700): ``mosquitto.conf`` and ``dynsec.json`` (mode 0600).

    ``dynsec.json`` holds every device's login, so it is kept across starts; the cloud's
    password in it is replaced at each start and lives only in the running cloud's memory,
    so no secret that opens the broker lies on disk in clear.
    """

    def __init__(self, folder: Path, *, plugin: Path) -> None:
        self.folder = folder
        self.plugin = plugin
        self.conf_file = folder / "mosquitto.conf"
        self.dynsec_file = folder / "dynsec.json"

    def prepare(self, port: int, *, username: str = DEFAULT_CLOUD_USERNAME) -> BrokerLogin:
        """Write both files for a broker on ``port``; the cloud's fresh login to use on it."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A folder an older version made with the default mode: the plugin's temporary
        # file is created in it.
        os.chmod(self.folder, 0o700)
        login = BrokerLogin(username, new_password())
        fresh = dynsec_config(cloud_username=login.username, cloud_password=login.password)
        if self.dynsec_file.exists():
            fresh = _with_cloud_login(self._read_dynsec(), fresh)
        write_private(self.dynsec_file, json.dumps(fresh, indent=2) + "\n")
        conf = mosquitto_conf(port=port, plugin=self.plugin, dynsec_file=self.dynsec_file)
        write_private(self.conf_file, conf)
        return login

    def _read_dynsec(self) -> dict[str, Any]:
        path = self.dynsec_file
        advice = "it holds the devices' broker logins: repair it, or remove it and re-enroll them"
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ServiceUnavailable(f"{path} cannot be read ({exc}); {advice}") from exc
        if not isinstance(current, dict):
            raise ServiceUnavailable(f"{path} is not a dynamic-security file; {advice}")
        return current
