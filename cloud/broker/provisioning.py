"""Give, replace and take away a device's broker login as the registry enrolls and deletes it."""

from __future__ import annotations

import logging
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
from shared.errors import Conflict
from shared.mqtt_tls import MqttTls

__all__ = ["BrokerAccounts", "DynsecAccounts", "NoBrokerAccounts", "broker_accounts"]

_LOGGER = logging.getLogger(__name__)


class BrokerAccounts(Protocol):
    """What enrollment needs from the broker: each call is done, or raises."""

    def provision_device(self, device_id: str, password: str) -> None:
        """Create the device's login, or replace it (new password and role, session closed)."""

    def remove_device(self, device_id: str) -> None:
        """Remove the device's login and role (closing its session); absent ones are fine."""


class NoBrokerAccounts:
    """A broker without logins (the embedded rumqttd): there is nothing to provision."""

    def provision_device(self, device_id: str, password: str) -> None:
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
        role = device_role(device_id)
        with self.connect() as dynsec:
            existing = dynsec.get_client(device_id)
            if existing is not None and not _is_device_login(existing, device_id):
                raise Conflict(
                    f"the broker already has a login {device_id!r} that is not a device's; "
                    "choose another device id"
                )
            # Set-up made the template; making sure costs nothing and spares a broker
            # initialised by hand from refusing every enrollment.
            commands = [
                _create_role(
                    DEVICE_TEMPLATE_ROLE, device_template_acls(), tolerate=("Role already exists",)
                )
            ]
            if existing is not None:
                # Replacing = delete and create: the old password and session go (deleting
                # a login closes its connection), and the role is rebuilt from today's ACLs.
                commands.append(_delete_client(device_id))
            commands += [
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
            try:
                dynsec.run(commands)
            except DynsecRefused as exc:
                if exc.error == "Client already exists":
                    raise Conflict(f"the broker already has a login {device_id!r}") from exc
                raise
        _LOGGER.info("broker login for device %s provisioned", device_id)

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
