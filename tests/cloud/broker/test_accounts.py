"""Broker accounts on paper: a device's role is exactly its own scope, and the set-up file
hashes passwords the way the plugin checks them."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from cloud.broker.accounts import (
    DEVICE_TEMPLATE_ROLE,
    device_acls,
    device_client_id,
    device_role,
    device_template_acls,
)
from cloud.broker.provisioning import DynsecAccounts, NoBrokerAccounts, broker_accounts
from cloud.broker.setup import dynsec_config, hash_password
from cloud.settings import CloudSettings
from shared.errors import ProtocolError


def test_a_device_role_grants_its_own_scope_and_refuses_writing_its_desired_state() -> None:
    acls = {(a.acltype, a.topic, a.allow) for a in device_acls("cam-1")}
    own = "edgefleet/v1/dev/cam-1/#"
    assert acls == {
        ("subscribePattern", own, True),
        ("publishClientReceive", own, True),
        ("publishClientSend", own, True),
        ("publishClientSend", "edgefleet/v1/dev/cam-1/desired", False),
    }
    deny = next(a for a in device_acls("cam-1") if not a.allow)
    assert deny.priority > max(a.priority for a in device_acls("cam-1") if a.allow)
    template = {(a.acltype, a.topic) for a in device_template_acls()}
    assert template == {
        ("subscribePattern", "edgefleet/v1/artifacts/#"),
        ("publishClientReceive", "edgefleet/v1/artifacts/#"),
        ("subscribePattern", "edgefleet/v1/cloud/budget"),
        ("publishClientReceive", "edgefleet/v1/cloud/budget"),
    }
    assert all(a.allow and a.acltype != "publishClientSend" for a in device_template_acls())


def test_names_come_from_validated_device_ids() -> None:
    assert device_client_id("cam-1") == "agent-cam-1"
    assert device_role("cam-1") == "edgefleet-dev-cam-1"
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(ProtocolError):
            device_acls(bad)


def test_password_hashes_match_what_mosquitto_ctrl_writes() -> None:
    """A vector from `mosquitto_ctrl dynsec init` (2.0.11): PBKDF2-SHA512, base64 salt."""
    hashed = hash_password(
        "adminpass123",
        salt=base64.b64decode("fEfnjxADPnjeTFsW"),
        iterations=101,
    )
    assert hashed == {
        "password": "pGY3j2GEVVQ1Qud11MoZL6AP0pDGiM5UE29+S/Fi+z/SWQdvCkKuKZsemSrg"
        "+oNtK0FI2qvlBI8F0lzSqtoxag==",
        "salt": "fEfnjxADPnjeTFsW",
        "iterations": 101,
    }


def test_the_set_up_file_refuses_by_default_and_holds_no_plain_password() -> None:
    config = dynsec_config(cloud_username="edgefleet-cloud", cloud_password="s3cret-password")
    assert set(config["defaultACLAccess"].values()) == {False, True}
    assert config["defaultACLAccess"]["subscribe"] is False
    assert config["defaultACLAccess"]["publishClientReceive"] is False
    assert "s3cret-password" not in repr(config)
    assert {r["rolename"] for r in config["roles"]} == {"edgefleet-cloud", DEVICE_TEMPLATE_ROLE}


def test_dynsec_needs_the_cloud_login_and_is_off_by_default() -> None:
    """Off by default (nothing provisioned); on, it refuses to start without the admin login."""
    base = {"admin_token": "t" * 20}
    assert isinstance(broker_accounts(CloudSettings(**base), "mqtt://x:1"), NoBrokerAccounts)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="EDGEFLEET_MQTT_USERNAME"):
        CloudSettings(**base, broker_accounts="dynsec", mqtt_username="cloud")  # type: ignore[arg-type]
    on = CloudSettings(
        **base,  # type: ignore[arg-type]
        broker_accounts="dynsec",
        mqtt_username="cloud",
        mqtt_password="secret",
    )
    accounts = broker_accounts(on, "mqtt://broker:1883")
    assert isinstance(accounts, DynsecAccounts)
    assert (accounts.url, accounts.username, accounts.password) == (
        "mqtt://broker:1883",
        "cloud",
        "secret",
    )
