"""What a device's and the cloud's broker accounts are: names, client ids, roles and ACLs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.topics import (
    CLOUD_BUDGET,
    PREFIX,
    SHARED_GROUP,
    DeviceTopic,
    device_filter,
    device_topic,
    validate_device_id,
)

__all__ = [
    "BUDGET_TOPIC",
    "CLOUD_ROLE",
    "CONTROL_TOPIC",
    "DEFAULT_ACL_ACCESS",
    "DEVICE_TEMPLATE_ROLE",
    "Acl",
    "cloud_acls",
    "device_acls",
    "device_client_id",
    "device_role",
    "device_template_acls",
]

AclType = Literal[
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
]

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
BUDGET_TOPIC = CLOUD_BUDGET  # kept for callers of this module; defined in shared.topics
CLOUD_ROLE = "edgefleet-cloud"
# What every device shares (artifact chunks, the budget); created at set-up.
DEVICE_TEMPLATE_ROLE = "edgefleet-device"
_DEVICE_ROLE_PREFIX = "edgefleet-dev-"
# DESIGN.md §3 names this group; SHARED_GROUP is the one the fleet service subscribes with.
_CLOUD_SHARE_GROUPS = ("$share/edgefleet-cloud/", SHARED_GROUP)

# Everything not granted by a role is refused, receiving included: a device only ever
# gets what its subscriptions *and* its role allow.
DEFAULT_ACL_ACCESS: dict[str, bool] = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


@dataclass(frozen=True, slots=True)
class Acl:
    """One dynamic-security ACL entry; a higher priority is checked first."""

    acltype: AclType
    topic: str
    allow: bool = True
    priority: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "acltype": self.acltype,
            "topic": self.topic,
            "allow": self.allow,
            "priority": self.priority,
        }


def _read(topic: str) -> list[Acl]:
    return [Acl("subscribePattern", topic), Acl("publishClientReceive", topic)]


def _read_write(topic: str) -> list[Acl]:
    return [*_read(topic), Acl("publishClientSend", topic)]


def device_client_id(device_id: str) -> str:
    """The only MQTT client id a device's login may connect with (the agent's own)."""
    return f"agent-{validate_device_id(device_id)}"


def device_role(device_id: str) -> str:
    return _DEVICE_ROLE_PREFIX + validate_device_id(device_id)


def device_acls(device_id: str) -> list[Acl]:
    """Exactly the device's own scope; its desired state is the cloud's to write."""
    desired = device_topic(device_id, DeviceTopic.DESIRED)
    return [
        *_read_write(device_filter(device_id)),
        # Retained and signed: a device clearing its own would only lose it until the next
        # deploy, but nothing of the protocol needs the write, so it is refused.
        Acl("publishClientSend", desired, allow=False, priority=10),
    ]


def device_template_acls() -> list[Acl]:
    """What every device reads: artifact chunks (the broker fans them out) and the budget."""
    return [*_read(f"{PREFIX}artifacts/#"), *_read(BUDGET_TOPIC)]


def cloud_acls() -> list[Acl]:
    """The cloud: all of EdgeFleet's topics, its shared subscriptions, $SYS, dynsec admin."""
    acls = _read_write(f"{PREFIX}#")
    for group in dict.fromkeys(_CLOUD_SHARE_GROUPS):
        acls.append(Acl("subscribePattern", f"{group}{PREFIX}#"))
    acls += _read("$SYS/#")
    acls += _read_write("$CONTROL/dynamic-security/#")
    return acls
