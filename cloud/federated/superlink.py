"""The SuperLink the cloud runs: `flower-superlink` as a child process on 127.0.0.1 only (its
state in a SQLite file under the data dir, so registered SuperNode keys survive a restart),
behind the fleet gateway that devices reach (cloud.federated.gateway); TLS unless in dev
mode, SuperNode authentication when asked, ServerApps in subprocesses of its own, none of
them with the cloud's secrets in their environment."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import psutil

from cloud.embedded.processes import ChildProcess, port_open
from cloud.federated.flower import flower_command, flower_env
from cloud.federated.gateway import FleetGateway, GatewayLimits
from cloud.federated.settings import FederatedSettings
from shared.errors import InvalidInput, ServiceUnavailable

__all__ = ["SuperLink", "superlink_argv"]

_LOGGER = logging.getLogger(__name__)
_START_TIMEOUT_S = 60.0


def superlink_argv(settings: FederatedSettings, *, data_dir: Path, dev_mode: bool) -> list[str]:
    """The command line; refused outside dev mode without TLS. Loopback only: its one port
    serves the Control API too. TLS stays on this hop when set, because Flower refuses
    SuperNode authentication without it and SuperExec is given the same CA."""
    folder = data_dir.resolve() / "federated"
    argv = [
        flower_command("flower-superlink"),
        "--host", "127.0.0.1", "--port", str(settings.superlink_port),
        "--database", str(folder / "superlink.db"),
        "--isolation", "subprocess",
        "--disable-runtime-dependency-installation",
        "--log-file", str(data_dir.resolve() / "logs" / "superlink.log"),
    ]  # fmt: skip
    if settings.tls:
        argv += [
            "--ssl-certfile", str(settings.ssl_certfile),
            "--ssl-keyfile", str(settings.ssl_keyfile),
            "--ssl-ca-certfile", str(settings.ssl_ca_certfile),
        ]  # fmt: skip
    elif dev_mode:
        argv.append("--insecure")
    else:
        raise InvalidInput(
            "outside dev mode the SuperLink serves only over TLS: set "
            "EDGEFLEET_FEDERATED_SSL_CERTFILE, _SSL_KEYFILE and _SSL_CA_CERTFILE "
            "(or EDGEFLEET_DEV_MODE=1 for a plain-HTTP development SuperLink)"
        )
    if settings.supernode_auth:
        argv.append("--enable-supernode-auth")
    return argv


class SuperLink:
    """`flower-superlink` and what it spawns (SuperExec, ServerApps), started and stopped
    as one process group, with the fleet gateway in front of it."""

    def __init__(self, settings: FederatedSettings, *, data_dir: Path, dev_mode: bool) -> None:
        self.settings = settings
        folder = data_dir.resolve() / "federated"
        folder.mkdir(parents=True, exist_ok=True)
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir.resolve() / "logs" / "superlink.out"
        argv = superlink_argv(settings, data_dir=data_dir, dev_mode=dev_mode)
        env = flower_env(folder / "superlink-home")
        # It starts `flower-superexec`, which starts `flwr-serverapp`, by name: from its
        # own installation, whatever PATH the cloud was started with.
        env["PATH"] = os.pathsep.join([str(Path(argv[0]).parent), env.get("PATH", "")])
        self.child = ChildProcess(argv, log_path=self.log_path, env=env)
        self.gateway = FleetGateway(
            host=settings.host,
            port=settings.port,
            upstream_port=settings.superlink_port,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
            ca_file=settings.ssl_ca_certfile,
            limits=GatewayLimits(
                max_body_bytes=settings.max_body_bytes,
                head_timeout_s=settings.head_timeout_s,
                connections_per_address=settings.connections_per_address or None,
                body_min_rate=settings.min_body_rate,
            ),
        )

    @property
    def address(self) -> str:
        """Where devices' SuperNodes reach it (the gateway) from this host."""
        return self.settings.fleet_address

    def start(self) -> None:
        port = self.settings.superlink_port
        if port_open("127.0.0.1", port):
            # Waiting for the port would find the other server and call it ours.
            raise ServiceUnavailable(
                f"127.0.0.1:{port} is taken by another process: "
                "set EDGEFLEET_FEDERATED_INTERNAL_PORT"
            )
        # The gateway first: its bind says at once whether the devices' port is free, and
        # until the SuperLink listens it answers 503 (SuperNodes try again).
        self.gateway.start()
        try:
            self.child.start(host="127.0.0.1", port=port, timeout=_START_TIMEOUT_S)
        except BaseException:
            self.gateway.stop()
            raise
        _LOGGER.info(
            "SuperLink on 127.0.0.1:%d, its Fleet API for devices on %s:%d (log %s)",
            port, self.settings.host, self.settings.port, self.log_path,
        )  # fmt: skip

    def died(self) -> int | None:
        """The SuperLink's exit status once it ended; 1 if the gateway stopped serving."""
        code = self.child.exit_code()
        if code is None and self.gateway.thread is not None and not self.gateway.running:
            return 1
        return code

    def stop(self) -> None:
        """Stop the gateway and the SuperLink, then what it started in sessions of their own
        (its SuperExec and the ServerApps under it would otherwise linger until they notice)."""
        self.gateway.stop()
        pid = self.child.pid
        detached: list[psutil.Process] = []
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                detached = psutil.Process(pid).children(recursive=True)
        self.child.stop(10.0)
        for process in detached:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _gone, alive = psutil.wait_procs(detached, timeout=5.0)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
