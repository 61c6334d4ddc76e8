"""`edge-agent`: enroll a device, run the agent, show what it runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from pydantic import ValidationError

from edge_agent import __version__
from edge_agent.config import DEFAULT_DATA_DIR, load_settings
from edge_agent.model_store import ModelStore
from shared.fsutil import atomic_write
from shared.mqtt_tls import MqttTls, parse_mqtt_url

__all__ = ["main"]


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else Path(args.data_dir) / "agent.json"


TOKEN_ENV = "EDGEFLEET_AGENT_TOKEN"  # noqa: S105 - the variable's name, not a token


class _EnrollError(Exception):
    """Enrollment cannot go on: the message says why; the exit status is ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _token(args: argparse.Namespace) -> str:
    """The device token: ``--token``, ``--token-file`` (``-``: standard input) or the
    environment. The last two keep it out of the command line, which every user may read."""
    if args.token is not None:
        token = str(args.token)
    elif args.token_file is not None:
        try:
            if args.token_file == "-":  # noqa: S105 - standard input, not a token
                token = sys.stdin.read()
            else:
                token = Path(args.token_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise _EnrollError(f"cannot read the token: {exc}", 2) from exc
    else:
        token = os.environ.get(TOKEN_ENV, "")
        if not token.strip():
            raise _EnrollError(f"no device token: give --token-file PATH or set {TOKEN_ENV}", 2)
    token = token.strip()
    if not token:
        raise _EnrollError("the device token is empty", 2)
    return token


def _device_self(cloud: str, token: str) -> dict[str, Any]:
    try:
        response = httpx.get(
            f"{cloud}/v1/device", headers={"Authorization": f"Bearer {token}"}, timeout=15
        )
    except httpx.HTTPError as exc:
        raise _EnrollError(f"cannot reach {cloud}: {exc}", 2) from exc
    if response.status_code != 200:
        raise _EnrollError(f"enrollment refused ({response.status_code}): {response.text}")
    try:
        body = response.json()
        return {
            "device_id": str(body["device"]["id"]),
            "mqtt_url": str(body["mqtt_url"]),
            "public_key": str(body["public_key"]),
            "key_id": str(body["key_id"]),
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise _EnrollError(f"{cloud} gave no device identity: {response.text[:200]}") from exc


def _tls_files(args: argparse.Namespace) -> dict[str, str]:
    """The broker TLS files given, as absolute paths, once they make a TLS context."""
    ca, cert, key = (
        Path(given).resolve() if given else None
        for given in (args.mqtt_ca_file, args.mqtt_cert_file, args.mqtt_key_file)
    )
    tls = MqttTls.from_files(ca, cert, key)
    if tls is None:
        return {}
    try:
        tls.check()
    except ValueError as exc:
        raise _EnrollError(str(exc), 2) from exc
    files = {"mqtt_ca_file": ca, "mqtt_cert_file": cert, "mqtt_key_file": key}
    return {name: str(path) for name, path in files.items() if path is not None}


def _mqtt_url(url: str, tls_files: dict[str, str]) -> str:
    try:
        secure = parse_mqtt_url(url).tls
    except ValueError as exc:
        raise _EnrollError(str(exc), 2) from exc
    if tls_files and not secure:
        raise _EnrollError(
            f"--mqtt-ca-file, --mqtt-cert-file and --mqtt-key-file are for a TLS broker, and "
            f"{url} is not one: give --mqtt mqtts://host[:port]",
            2,
        )
    return url


def enroll(args: argparse.Namespace) -> int:
    """Fetch the device's identity with its token; pin the cloud's public key."""
    cloud = args.cloud.rstrip("/")
    path = _config_path(args)
    try:
        tls_files = _tls_files(args)
        token = _token(args)
        device = _device_self(cloud, token)
        config = {
            "device_id": device["device_id"],
            "token": token,
            "cloud_url": cloud,
            "mqtt_url": _mqtt_url(args.mqtt or device["mqtt_url"], tls_files),
            **tls_files,
            "public_key": device["public_key"],
            "data_dir": str(Path(args.data_dir).resolve()),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # It holds the token: private from its creation on.
            atomic_write(path, json.dumps(config, indent=2).encode(), mode=0o600)
        except OSError as exc:
            raise _EnrollError(f"cannot write {path}: {exc}") from exc
    except _EnrollError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    print(f"enrolled {config['device_id']}; key {device['key_id']} pinned; config in {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    try:
        settings = load_settings(_config_path(args), api_port=args.port)
    except (ValidationError, ValueError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    agent = Agent(settings)
    stop_signal = _stop_signal_pipe()
    agent.start()
    api_url = agent.api.url if agent.api is not None else None
    serving = f"local API {api_url}" if api_url is not None else "local API off"
    print(f"edge-agent {settings.device_id}: {serving}", flush=True)
    ready_file = Path(args.ready_file) if args.ready_file else None
    if ready_file is not None:
        # Whoever started us (the demo, a supervisor) learns the port we were given.
        ready = {"device_id": settings.device_id, "api_url": api_url, "pid": os.getpid()}
        atomic_write(ready_file, json.dumps(ready).encode())
    try:
        os.read(stop_signal, 1)  # until SIGINT or SIGTERM, even one that came during start
        agent.stop()
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
    return 0


def _stop_signal_pipe() -> int:
    """A pipe that SIGINT and SIGTERM write to; returns the end to read.

    Python's own signal handling writes the signal's number to the wakeup fd as the signal
    arrives, without a lock. A handler that set a threading.Event instead could deadlock:
    it runs on the main thread, which may hold that Event's lock in ``wait()`` just then
    (seen: an agent that ignored every SIGTERM, forever)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _noted_in_the_pipe)
    return read_end


def _noted_in_the_pipe(_sig: int, _frame: FrameType | None) -> None:
    """The wakeup fd has the signal; replacing SIG_DFL is what puts it there."""


def simulate(args: argparse.Namespace) -> int:
    from edge_agent.simulator.worker import run_plan

    return run_plan(Path(args.plan), _stop_signal_pipe())


def status(args: argparse.Namespace) -> int:
    settings = load_settings(_config_path(args))
    state = ModelStore(settings.data_dir / "store").state
    print(json.dumps(
        {
            "device_id": settings.device_id,
            "rev_applied": state.rev_applied,
            "active": {k: v.version for k, v in state.active.items()},
            "previous": {k: v.version for k, v in state.previous.items()},
        },
        indent=2,
    ))  # fmt: skip
    return 0


def federated_key(args: argparse.Namespace) -> int:
    """Make (once) the SuperNode key for SuperNode authentication; print its public half."""
    from edge_agent.federated.node_key import ensure_node_key

    path = Path(args.key) if args.key else Path(args.data_dir) / "flower" / "node_key"
    public = ensure_node_key(path)
    print(public.read_text().strip())
    print(
        f"private key {path} (set federated_node_key to it); register {public} with the "
        "SuperLink: edgefleet federated register-node " + str(public),
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description="EdgeFleet edge agent")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument(
        "--data-dir", default=os.environ.get("EDGEFLEET_AGENT_DATA_DIR", str(DEFAULT_DATA_DIR))
    )
    parser.add_argument("--config", help="config file (default: DATA_DIR/agent.json)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    p_enroll = sub.add_parser("enroll", help="enroll with a device token from the cloud")
    p_enroll.add_argument("--cloud", required=True, help="cloud API URL")
    token = p_enroll.add_mutually_exclusive_group()
    token.add_argument(
        "--token", help="the device token from enrollment (visible to every user in `ps`)"
    )
    token.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"read the device token from PATH ('-': standard input); default: ${TOKEN_ENV}",
    )
    p_enroll.add_argument(
        "--mqtt",
        help="broker URL (mqtts://host[:8883] for TLS), if not the one the cloud announces",
    )
    p_enroll.add_argument(
        "--mqtt-ca-file", metavar="PEM", help="CA of the mqtts:// broker (default: system trust)"
    )
    p_enroll.add_argument(
        "--mqtt-cert-file", metavar="PEM", help="client certificate, for a broker that requires one"
    )
    p_enroll.add_argument("--mqtt-key-file", metavar="PEM", help="the client certificate's key")
    p_enroll.set_defaults(fn=enroll)
    p_run = sub.add_parser("run", help="run the agent")
    p_run.add_argument("--port", type=int, default=None, help="local API port (0: a free one)")
    p_run.add_argument(
        "--ready-file", help="once serving, write {device_id, api_url, pid} as JSON here"
    )
    p_run.set_defaults(fn=run)
    sub.add_parser("status", help="what the device runs").set_defaults(fn=status)
    p_key = sub.add_parser("federated-key", help="make this device's SuperNode key (once)")
    p_key.add_argument("--key", help="private key path (default: DATA_DIR/flower/node_key)")
    p_key.set_defaults(fn=federated_key)
    p_simulate = sub.add_parser(
        "simulate", help="run many simulated devices in this process (`edgefleet simulate`)"
    )
    p_simulate.add_argument("--plan", required=True, help="the worker's plan (JSON)")
    p_simulate.set_defaults(fn=simulate)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
