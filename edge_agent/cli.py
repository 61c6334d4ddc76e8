"""`edge-agent`: enroll a device, run the agent, show what it runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import httpx
from pydantic import ValidationError

from edge_agent import __version__
from edge_agent.config import DEFAULT_DATA_DIR, load_settings
from edge_agent.model_store import ModelStore
from shared.fsutil import atomic_write

__all__ = ["main"]


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else Path(args.data_dir) / "agent.json"


def enroll(args: argparse.Namespace) -> int:
    """Fetch the device's identity with its token; pin the cloud's public key."""
    cloud = args.cloud.rstrip("/")
    try:
        response = httpx.get(
            f"{cloud}/v1/device", headers={"Authorization": f"Bearer {args.token}"}, timeout=15
        )
    except httpx.HTTPError as exc:
        print(f"cannot reach {cloud}: {exc}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(f"enrollment refused ({response.status_code}): {response.text}", file=sys.stderr)
        return 1
    body = response.json()
    config = {
        "device_id": body["device"]["id"],
        "token": args.token,
        "cloud_url": cloud,
        "mqtt_url": args.mqtt or body["mqtt_url"],
        "public_key": body["public_key"],
        "data_dir": str(Path(args.data_dir).resolve()),
    }
    path = _config_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(config, indent=2).encode())
    os.chmod(path, 0o600)
    print(f"enrolled {config['device_id']}; key {body['key_id']} pinned; config in {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    try:
        settings = load_settings(_config_path(args), api_port=args.port)
    except (ValidationError, ValueError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    agent = Agent(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    api_url = agent.api.url if agent.api is not None else None
    if api_url is not None:
        print(f"edge-agent {settings.device_id}: local API {api_url}", flush=True)
    ready_file = Path(args.ready_file) if args.ready_file else None
    if ready_file is not None:
        # Whoever started us (the demo, a supervisor) learns the port we were given.
        ready = {"device_id": settings.device_id, "api_url": api_url, "pid": os.getpid()}
        atomic_write(ready_file, json.dumps(ready).encode())
    try:
        stop.wait()
        agent.stop()
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
    return 0


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
    p_enroll.add_argument("--token", required=True, help="the device token from enrollment")
    p_enroll.add_argument("--mqtt", help="broker URL, if not the one the cloud announces")
    p_enroll.set_defaults(fn=enroll)
    p_run = sub.add_parser("run", help="run the agent")
    p_run.add_argument("--port", type=int, default=None, help="local API port (0: a free one)")
    p_run.add_argument(
        "--ready-file", help="once serving, write {device_id, api_url, pid} as JSON here"
    )
    p_run.set_defaults(fn=run)
    sub.add_parser("status", help="what the device runs").set_defaults(fn=status)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
