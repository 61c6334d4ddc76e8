"""The cloud's side of Flower's Control API, through Flower's own CLI (`flwr run`, `flwr ls`,
`flwr stop`, `flwr supernode register`) with ``--format json``: the interface Flower documents
and keeps stable, in a private FLWR_HOME whose one SuperLink connection is ours."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ServiceUnavailable
from shared.fsutil import atomic_write

__all__ = ["FLWR_ENV", "FlowerCli", "FlowerRun", "flower_command", "flower_env"]

_LOGGER = logging.getLogger(__name__)
_CONNECTION = "edgefleet"
FLWR_ENV = {
    # Nothing leaves for flower.ai: no telemetry, no update check, no `uv sync` of app
    # dependencies at run time (the apps are this installation's own code).
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Flower's legacy gRPC Control and Fleet APIs (flwr.common.constant), which
    # `flower-superlink` would open on 0.0.0.0 beside the loopback HTTP port: never.
    "FLWR_INTERNAL_GRPC_CONTROL_API": "0",
    "FLWR_INTERNAL_GRPC_FLEET_API": "0",
}

# What Flower's processes may inherit from the cloud's environment: never its secrets (admin
# token, database and broker URLs with passwords, key paths), since a ServerApp runs a
# submitted Flower App. Everything not named here is left out, Flower's own variables too
# (FLWR_MODEL_API_KEY is a secret; FLWR_INTERNAL_GRPC_* open ports): only FLWR_LOG_LEVEL
# passes, and FLWR_ENV and FLWR_HOME are set.
_ENV_KEEP = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
     "TMPDIR", "TEMP", "TMP", "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED",
     "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE",
     "SSL_CERT_DIR", "COVERAGE_PROCESS_START", "FLWR_LOG_LEVEL"}
)  # fmt: skip
_ENV_KEEP_PREFIXES = ("LC_", "OMP_", "OPENBLAS_", "MKL_")


def flower_env(home: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: the allowed part of ``environ`` (default: ours),
    FLWR_ENV, and ``home`` as its FLWR_HOME."""
    source = os.environ if environ is None else environ
    kept = {
        name: value
        for name, value in source.items()
        if name in _ENV_KEEP or name.startswith(_ENV_KEEP_PREFIXES)
    }
    return {**kept, **FLWR_ENV, "FLWR_HOME": str(home)}


def flower_command(name: str) -> str:
    """A Flower console script of this installation (beside this Python), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServiceUnavailable(f"`{name}` is not installed (pip install -e '.[cloud]')")
    return found


@dataclass(frozen=True, slots=True)
class FlowerRun:
    """What `flwr ls` says of a run."""

    run_id: str
    status: str  # pending, starting, running, finished:completed|failed|stopped
    details: str
    inbound_bytes: int
    outbound_bytes: int

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")


class FlowerCli:
    def __init__(
        self,
        home: Path,
        *,
        address: str,
        root_certificates: Path | None,
        timeout_s: float = 60.0,
    ) -> None:
        self.home = home
        self.address = address
        self.timeout_s = timeout_s
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            f'default = "{_CONNECTION}"',
            "",
            f"[superlink.{_CONNECTION}]",
            f"address = {json.dumps(address)}",
        ]
        if root_certificates is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
        atomic_write(home / "config.toml", ("\n".join(lines) + "\n").encode(), mode=0o600)

    def _call(self, *args: str) -> dict[str, Any]:
        argv = [flower_command("flwr"), *args, "--format", "json"]
        env = flower_env(self.home)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=env,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceUnavailable(
                f"`flwr {args[0]}` did not answer within {self.timeout_s:g}s "
                f"(SuperLink {self.address})"
            ) from exc
        answer = _last_json(done.stdout)
        if answer is None or not answer.get("success"):
            said = (answer or {}).get("error-message") or done.stderr or done.stdout
            message = " ".join(str(said).split())[:500]
            raise ServiceUnavailable(
                f"`flwr {args[0]}` failed (SuperLink {self.address}): {message}"
            )
        return answer

    def run(self, app_dir: Path, run_config: Path) -> str:
        """Submit the Flower App in ``app_dir`` with the run config in a TOML file."""
        answer = self._call("run", str(app_dir), _CONNECTION, "--run-config", str(run_config))
        run_id = answer.get("run-id")
        if not run_id:
            raise ServiceUnavailable(f"`flwr run` gave no run id: {answer}")
        return str(run_id)

    def status(self, run_id: str) -> FlowerRun:
        answer = self._call("ls", _CONNECTION, "--run-id", run_id)
        runs = answer.get("runs") or []
        if not runs:
            raise ServiceUnavailable(f"the SuperLink knows no run {run_id}")
        run = runs[0]
        traffic = run.get("network-traffic") or {}
        return FlowerRun(
            run_id=str(run.get("run-id")),
            status=str(run.get("status", "")),
            details=str(run.get("status-details", "")),
            inbound_bytes=int(traffic.get("inbound-bytes", 0)),
            outbound_bytes=int(traffic.get("outbound-bytes", 0)),
        )

    def stop(self, run_id: str) -> None:
        self._call("stop", run_id, _CONNECTION)

    def register_node(self, public_key: Path, name: str | None = None) -> str:
        """Register a SuperNode's public key (OpenSSH EC) with the SuperLink."""
        extra = ["--name", name] if name else []
        answer = self._call("supernode", "register", str(public_key), _CONNECTION, *extra)
        return str(answer.get("node-id"))


def _last_json(stdout: str) -> dict[str, Any] | None:
    """The JSON object `flwr --format json` prints (after any line it printed first)."""
    start = stdout.find("{")
    while start != -1:
        try:
            value = json.loads(stdout[start:])
        except ValueError:
            start = stdout.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None
