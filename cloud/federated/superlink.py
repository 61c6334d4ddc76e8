"""The SuperLink the cloud runs: `flower-superlink` as a child process (its state in a SQLite
file under the data dir, so registered SuperNode keys survive a restart), TLS unless in dev
mode, SuperNode authentication when asked, ServerApps in subprocesses of its own."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import psutil

from cloud.embedded.processes import ChildProcess, port_open
from cloud.federated.flower import FLWR_ENV, flower_command
from cloud.federated.settings import FederatedSettings
from shared.errors import InvalidInput, ServiceUnavailable

__all__ = ["SuperLink", "superlink_argv"]

_LOGGER = logging.getLogger(__name__)
_START_TIMEOUT_S = 60.0


def superlink_argv(settings: FederatedSettings, *, data_dir: Path, dev_mode: bool) -> list[str]:
    """The command line; refused outside dev mode without TLS."""
    folder = data_dir.resolve() / "federated"
    argv = [
        flower_command("flower-superlink"),
        "--host", settings.host, "--port", str(settings.port),
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
    as one process group."""

    def __init__(self, settings: FederatedSettings, *, data_dir: Path, dev_mode: bool) -> None:
        self.settings = settings
        folder = data_dir.resolve() / "federated"
        folder.mkdir(parents=True, exist_ok=True)
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir.resolve() / "logs" / "superlink.out"
        argv = superlink_argv(settings, data_dir=data_dir, dev_mode=dev_mode)
        env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(folder / "superlink-home")}
        # It starts `flower-superexec`, which starts `flwr-serverapp`, by name: from its
        # own installation, whatever PATH the cloud was started with.
        env["PATH"] = os.pathsep.join([str(Path(argv[0]).parent), env.get("PATH", "")])
        self.child = ChildProcess(
            argv,
            log_path=self.log_path,
            env=env,
        )

    @property
    def address(self) -> str:
        return self.settings.resolved_address

    def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        if port_open(host.strip("[]"), int(port)):
            # Waiting for the port would find the other server and call it ours.
            raise ServiceUnavailable(
                f"{self.address} is taken by another process: set EDGEFLEET_FEDERATED_PORT"
            )
        self.child.start(host=host.strip("[]"), port=int(port), timeout=_START_TIMEOUT_S)
        _LOGGER.info("SuperLink on %s (log %s)", self.address, self.log_path)

    def died(self) -> int | None:
        return self.child.exit_code()

    def stop(self) -> None:
        """Stop the SuperLink, then what it started in sessions of their own (its SuperExec
        and the ServerApps under it would otherwise linger until they notice)."""
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
