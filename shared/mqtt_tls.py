"""Where an MQTT broker is (its URL) and how its connection is secured (TLS), read the same
way by the agent and the cloud.

``mqtt://`` (or ``tcp://``) is plain MQTT, port 1883 by default; ``mqtts://`` is MQTT over
TLS, port 8883 by default. Over TLS the broker's certificate must chain to the CA file (or,
without one, to the system's trust store) and name the host of the URL: there is no
insecure mode. A client certificate and key are for brokers that ask for one
(``require_certificate true``). Every file is read when the context is built, at start,
so a bad path is a configuration error rather than a failure in the network thread.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["MqttEndpoint", "MqttTls", "parse_mqtt_url", "tls_context"]

_PLAIN = ("mqtt", "tcp")
_TLS = "mqtts"
_DEFAULT_PORT = {False: 1883, True: 8883}


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    host: str
    port: int
    tls: bool


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """``mqtt://host[:port]``, ``tcp://…`` or ``mqtts://host[:port]``; ValueError otherwise:
    a URL with no host, with a login in it (the login has settings of its own, and a URL is
    logged and shown) or with port 0. No message repeats the login."""
    parts = urlsplit(url)
    shown = _without_login(url, parts.netloc)
    scheme = parts.scheme.lower()
    if scheme not in (*_PLAIN, _TLS):
        raise ValueError(
            f"unsupported MQTT URL {shown!r}: use mqtt://host[:port] or mqtts://host[:port] (TLS)"
        )
    if "@" in parts.netloc:
        raise ValueError(
            f"MQTT URL {shown!r} must not carry a login (user:password@): give the username "
            "and password in their own settings"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"MQTT URL {shown!r} has an invalid port") from exc
    if not parts.hostname:
        raise ValueError(f"MQTT URL {shown!r} names no host: use {scheme}://host[:port]")
    if port == 0:
        raise ValueError(f"MQTT URL {shown!r} has port 0: give the broker's port, or none")
    tls = scheme == _TLS
    return MqttEndpoint(parts.hostname, port or _DEFAULT_PORT[tls], tls)


def _without_login(url: str, netloc: str) -> str:
    login, at, _address = netloc.rpartition("@")
    return url.replace(f"{login}{at}", "***@", 1) if at else url


def _encrypted_key() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, and a service would hang.
    raise ValueError("it is encrypted; give an unencrypted key, readable only by its user")


@dataclass(frozen=True, slots=True)
class MqttTls:
    """TLS files for an ``mqtts://`` link. ``ca_file`` None: the system's trust store;
    ``key_file`` None with a ``cert_file``: the key is in the certificate's file."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_files(
        cls,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> MqttTls | None:
        """The settings these files make, or None when none is given."""
        if ca_file is None and cert_file is None and key_file is None:
            return None
        return cls(ca_file, cert_file, key_file)

    def context(self) -> ssl.SSLContext:
        """A client context (TLS 1.2 or later, the broker's certificate and host name
        verified); ValueError naming the file that cannot be used and why."""
        if self.key_file is not None and self.cert_file is None:
            raise ValueError(f"MQTT client key {self.key_file} given without its certificate")
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=None if self.ca_file is None else str(self.ca_file),
            )
        except (OSError, ValueError) as exc:
            why = _why(exc, "no usable PEM certificate in it")
            raise ValueError(f"MQTT CA file {self.ca_file}: {why}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            try:
                context.load_cert_chain(
                    str(self.cert_file),
                    None if self.key_file is None else str(self.key_file),
                    password=_encrypted_key,
                )
            except (OSError, ValueError) as exc:
                files = ", ".join(str(p) for p in (self.cert_file, self.key_file) if p)
                why = _why(exc, "not a PEM certificate and private key")
                raise ValueError(f"MQTT client certificate and key ({files}): {why}") from exc
        return context

    def check(self) -> MqttTls:
        """Self, once its files make a context (for config validators)."""
        self.context()
        return self


def tls_context(endpoint: MqttEndpoint, tls: MqttTls | None) -> ssl.SSLContext | None:
    """What a client of ``endpoint`` secures its connection with: None for plain MQTT (where
    TLS files are a mistake, a ValueError), else ``tls``'s context (None: system trust)."""
    if not endpoint.tls:
        if tls is not None:
            where = f"{endpoint.host}:{endpoint.port}"
            raise ValueError(f"TLS files given for plain MQTT to {where}: use mqtts://")
        return None
    return (tls or MqttTls()).context()


def _why(exc: BaseException, unreadable: str) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        return unreadable
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
