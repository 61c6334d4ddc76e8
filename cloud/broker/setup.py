"""Broker set-up: a dynamic-security file holding the cloud's login and the device template."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cloud.broker.accounts import (
    CLOUD_ROLE,
    DEFAULT_ACL_ACCESS,
    DEVICE_TEMPLATE_ROLE,
    cloud_acls,
    device_template_acls,
)
from shared.errors import Conflict, ServiceUnavailable

__all__ = [
    "DEFAULT_CLOUD_USERNAME",
    "PLUGIN_NAME",
    "dynsec_config",
    "find_plugin",
    "hash_password",
    "new_password",
    "plugin_conf",
    "write_dynsec_config",
]

PLUGIN_NAME = "mosquitto_dynamic_security.so"
DEFAULT_CLOUD_USERNAME = "edgefleet-cloud"
_PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/mosquitto",
    "/usr/local/lib",
    "/usr/lib",
)
# The plugin's own hashing (PBKDF2-HMAC-SHA512, 64-byte key, base64 salt); it reads the
# iteration count per login, so ours may be higher than the 101 it uses for new ones.
_ITERATIONS = 10_000
_SALT_BYTES = 12


def find_plugin() -> Path | None:
    """Where this machine's Mosquitto keeps the dynamic-security plugin, if it has one."""
    for folder in _PLUGIN_DIRS:
        candidate = Path(folder) / PLUGIN_NAME
        if candidate.is_file():
            return candidate
    return None


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = _ITERATIONS
) -> dict[str, Any]:
    """The ``password``/``salt``/``iterations`` fields of a dynamic-security login."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def dynsec_config(*, cloud_username: str, cloud_password: str) -> dict[str, Any]:
    """A fresh plugin file: the cloud's login (dynsec admin, all EdgeFleet topics), the device
    template role, and "refuse what is not granted" as the default."""
    return {
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
        "clients": [
            {
                "username": cloud_username,
                "textname": "EdgeFleet cloud",
                **hash_password(cloud_password),
                "roles": [{"rolename": CLOUD_ROLE}],
            }
        ],
        "groups": [],
        "roles": [
            {"rolename": CLOUD_ROLE, "acls": [a.to_json() for a in cloud_acls()]},
            {
                "rolename": DEVICE_TEMPLATE_ROLE,
                "acls": [a.to_json() for a in device_template_acls()],
            },
        ],
    }


def write_dynsec_config(
    path: Path, *, cloud_username: str, cloud_password: str, overwrite: bool = False
) -> None:
    """Write a fresh plugin file, mode 0600 from the start.

    The plugin keeps every device's login in this file, so an existing one is refused
    unless ``overwrite``: replacing it would lock the whole fleet out.
    """
    if path.exists() and not overwrite:
        raise Conflict(f"{path} exists and holds the broker's logins; refusing to replace it")
    text = json.dumps(
        dynsec_config(cloud_username=cloud_username, cloud_password=cloud_password), indent=2
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plugin_conf(dynsec_file: Path, plugin: Path | None = None) -> str:
    """The mosquitto.conf lines that load the plugin on ``dynsec_file`` (no anonymous logins)."""
    found = plugin or find_plugin()
    if found is None:
        raise ServiceUnavailable(f"{PLUGIN_NAME} not found (Debian: apt-get install mosquitto)")
    return f"allow_anonymous false\nplugin {found}\nplugin_opt_config_file {dynsec_file}\n"


def new_password() -> str:
    """A login secret for the cloud (192 random bits, URL-safe)."""
    return secrets.token_urlsafe(24)
