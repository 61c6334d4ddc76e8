"""Give, replace and take away a device's broker login as the registry enrolls and deletes it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from cloud.broker.accounts import (
    DEVICE_TEMPLATE_ROLE,
    Acl,
    device_acls,
    device_client_id,
    device_role,
    device_template_acls,
)
from cloud.broker.dynsec import Command, DynsecClient, DynsecRefused
from cloud.settings import CloudSettings
from shared.errors import Conflict, EdgeFleetError
from shared.mqtt_tls import MqttTls

__all__ = ["BrokerAccounts", "DynsecAccounts", "NoBrokerAccounts", "broker_accounts"]

_LOGGER = logging.getLogger(__name__)
# Devices per plugin message in a bulk enrollment: 3 commands each, well under any broker's
# packet limit (the shipped config allows 2 MiB).
_BATCH = 100


class BrokerAccounts(Protocol):
    """What enrollment needs from the broker: each call is done, or raises."""

    def provision_device(self, device_id: str, password: str) -> None:
        """Create the device's login, or replace it (new password and role, session closed)."""

    def remove_device(self, device_id: str) -> None:
        """Remove the device's login and role (closing its session); absent ones are fine."""

    def provision_devices(self, devices: Sequence[tuple[str, str]]) -> None:
        """:meth:`provision_device` for many (device id, password) at once: all are done, or
        none (what was made is taken away again) and it raises."""

    def remove_devices(self, device_ids: Sequence[str]) -> None:
        """:meth:`remove_device` for many, as enrollment made them (a bulk enrollment's undo)."""


class NoBrokerAccounts:
    """A broker without logins (the embedded rumqttd): there is nothing to provision."""

    def provision_device(self, device_id: str, password: str) -> None:
        return None

    def provision_devices(self, devices: Sequence[tuple[str, str]]) -> None:
        return None

    def remove_devices(self, device_ids: Sequence[str]) -> None:
        return None

    def remove_device(self, device_id: str) -> None:
        return None


def _is_device_login(record: dict[str, Any], device_id: str) -> bool:
    """True for a login that enrollment made: one that holds the device's own role."""
    roles = record.get("roles") or []
    return any(isinstance(r, dict) and r.get("rolename") == device_role(device_id) for r in roles)


def _create_role(name: str, acls: list[Acl], *, tolerate: tuple[str, ...] = ()) -> Command:
    args = {"rolename": name, "acls": [acl.to_json() for acl in acls]}
    return Command("createRole", args, tolerate=tolerate)


def _delete_role(name: str) -> Command:
    return Command("deleteRole", {"rolename": name}, tolerate=("Role not found",))


def _delete_client(username: str) -> Command:
    return Command("deleteClient", {"username": username}, tolerate=("Client not found",))


def _create_device(device_id: str, password: str) -> list[Command]:
    """The device's own role (rebuilt from today's ACLs) and its login."""
    role = device_role(device_id)
    return [
        _delete_role(role),
        _create_role(role, device_acls(device_id)),
        Command(
            "createClient",
            {
                "username": device_id,
                "password": password,
                "clientid": device_client_id(device_id),
                "textname": f"EdgeFleet device {device_id}",
                "roles": [{"rolename": role}, {"rolename": DEVICE_TEMPLATE_ROLE}],
            },
        ),
    ]


def _template_role() -> Command:
    # Set-up made the template; making sure costs nothing and spares a broker initialised
    # by hand from refusing every enrollment.
    return _create_role(
        DEVICE_TEMPLATE_ROLE, device_template_acls(), tolerate=("Role already exists",)
    )


def _known(dynsec: DynsecClient, names: Sequence[str]) -> set[str]:
    """Which of ``names`` the broker has a login for, ``_BATCH`` names a message."""
    known = set()
    for start in range(0, len(names), _BATCH):
        batch = names[start : start + _BATCH]
        answers = dynsec.run(
            [Command("getClient", {"username": n}, tolerate={"Client not found"}) for n in batch]
        )
        known |= {n for n, data in zip(batch, answers, strict=True) if data.get("client")}
    return known


class DynsecAccounts:
    """Device logins in Mosquitto's dynamic-security plugin, one short admin connection a call.

    A device's login: username = device id, password = its token, client id bound to
    ``agent-{id}``, roles = its own (``edgefleet-dev-{id}``: its ``dev/{id}/#``) and the
    shared template (``edgefleet-device``: artifacts and the budget). A login of that name
    that enrollment did not make (say, the cloud's own) is never replaced or deleted.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str,
        password: str,
        timeout: float = 3.0,
        tls: MqttTls | None = None,
    ) -> None:
        self.url = url
        self.username = username
        self.password = password
        self.timeout = timeout
        self.tls = tls

    def connect(self) -> DynsecClient:
        return DynsecClient(
            self.url,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
            tls=self.tls,
        )

    def provision_device(self, device_id: str, password: str) -> None:
        with self.connect() as dynsec:
            existing = dynsec.get_client(device_id)
            if existing is not None and not _is_device_login(existing, device_id):
                raise Conflict(
                    f"the broker already has a login {device_id!r} that is not a device's; "
                    "choose another device id"
                )
            commands = [_template_role()]
            if existing is not None:
                # Replacing = delete and create: the old password and session go (deleting
                # a login closes its connection), and the role is rebuilt from today's ACLs.
                commands.append(_delete_client(device_id))
            commands += _create_device(device_id, password)
            try:
                dynsec.run(commands)
            except DynsecRefused as exc:
                if exc.error == "Client already exists":
                    raise Conflict(f"the broker already has a login {device_id!r}") from exc
                raise
        _LOGGER.info("broker login for device %s provisioned", device_id)

    def provision_devices(self, devices: Sequence[tuple[str, str]]) -> None:
        """Many logins over one admin connection, ``_BATCH`` devices a message. A name the
        broker already has a login for is replaced if enrollment made it (as one at a time
        does), refused (Conflict) if not; on any failure the logins made are removed.

        Names the broker knows are found first (asked about by name: what a batch costs the
        broker does not grow with the fleet) and replaced one by one, their login deleted
        before their role: Mosquitto 2.0.11 crashes when a role still held by a login is
        deleted and made again (seen here)."""
        made: list[str] = []
        try:
            with self.connect() as dynsec:
                dynsec.run([_template_role()])
                known = _known(dynsec, [d for d, _p in devices])
                fresh = [(d, p) for d, p in devices if d not in known]
                for start in range(0, len(fresh), _BATCH):
                    batch = fresh[start : start + _BATCH]
                    made += [d for d, _p in batch]  # before: a refused message did the rest
                    dynsec.run([c for d, p in batch for c in _create_device(d, p)])
                for device_id, password in devices:
                    if device_id in known:
                        self._replace(dynsec, device_id, password)
                        made.append(device_id)
        except BaseException:
            if made:
                try:
                    self.remove_devices(made)
                except EdgeFleetError as exc:
                    _LOGGER.error(
                        "the broker keeps logins for %d devices whose enrollment failed (%s); "
                        "enroll them again to replace them", len(made), exc.message,
                    )  # fmt: skip
            raise
        _LOGGER.info("broker logins for %d devices provisioned", len(devices))

    def _replace(self, dynsec: DynsecClient, device_id: str, password: str) -> None:
        existing = dynsec.get_client(device_id)
        if existing is not None and not _is_device_login(existing, device_id):
            raise Conflict(
                f"the broker already has a login {device_id!r} that is not a device's; "
                "choose another device id"
            )
        dynsec.run([_delete_client(device_id), *_create_device(device_id, password)])

    def remove_devices(self, device_ids: Sequence[str]) -> None:
        with self.connect() as dynsec:
            for start in range(0, len(device_ids), _BATCH):
                dynsec.run(
                    [
                        command
                        for d in device_ids[start : start + _BATCH]
                        for command in (_delete_client(d), _delete_role(device_role(d)))
                    ]
                )

    def remove_device(self, device_id: str) -> None:
        with self.connect() as dynsec:
            existing = dynsec.get_client(device_id)
            commands = [_delete_role(device_role(device_id))]
            if existing is not None and _is_device_login(existing, device_id):
                commands.insert(0, _delete_client(device_id))
            elif existing is not None:
                _LOGGER.warning("broker login %s is not a device's; left in place", device_id)
            dynsec.run(commands)
        _LOGGER.info("broker login for device %s removed", device_id)


def broker_accounts(settings: CloudSettings, mqtt_url: str) -> BrokerAccounts:
    """The provisioner the configuration asks for (``EDGEFLEET_BROKER_ACCOUNTS``)."""
    if settings.broker_accounts == "dynsec":
        if settings.mqtt_username is None or settings.mqtt_password is None:
            raise ValueError("broker_accounts=dynsec needs mqtt_username and mqtt_password")
        return DynsecAccounts(
            mqtt_url,
            username=settings.mqtt_username,
            password=settings.mqtt_password,
            timeout=settings.broker_timeout_s,
            tls=settings.mqtt_tls,
        )
    return NoBrokerAccounts()
