"""Federated learning in `edgefleet demo`: the SuperLink it always runs (dev mode: plain HTTP
on loopback) and, with ``--federated``, one federated round on its agents with drifted local
data, shown until the new version is ACTIVE on the canary device.

The agents take part as devices do: each runs its own SuperNode (settings in its
environment), apps label tilted digits on its local API (POST /v1/feedback), and the run is
started over the cloud's REST API like any other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from cloud.context import CloudContext
from cloud.embedded.processes import describe_exit
from cloud.federated.drift import device_shards
from cloud.federated.settings import FederatedSettings
from cloud.federated.superlink import SuperLink
from shared.errors import EdgeFleetError

__all__ = ["DemoFederation", "send_feedback"]

_MODEL = "digits-edge"
_PER_DEVICE = 150
_RUN_TIMEOUT_S = 300.0
_DRIFT = "builtin:digits-rotated-20"
_FINAL = {"COMPLETED", "GATE_FAILED", "TOO_FEW_CLIENTS", "FAILED", "CANCELLED"}


class DemoFederation:
    def __init__(self, *, enabled: bool, say: Callable[[str], None]) -> None:
        self.enabled = enabled
        self.say = say
        self.settings = FederatedSettings()
        self.superlink: SuperLink | None = None
        self._died = False

    def start(self, context: CloudContext) -> None:
        """The SuperLink, a child of the demo (log under the data dir). Without
        ``--federated`` a SuperLink that cannot start (its port taken) is a line, not the end."""
        superlink = SuperLink(self.settings, data_dir=context.settings.data_dir, dev_mode=True)
        try:
            superlink.start()
        except EdgeFleetError as exc:
            superlink.stop()
            if self.enabled:
                raise
            self.say(f"  SuperLink not started ({exc.message}): no federated learning here")
            return
        self.superlink = superlink
        self.say(
            f"  SuperLink  {self.superlink.address}  (Flower's Fleet API through the gateway, "
            f"the SuperLink on 127.0.0.1:{self.settings.superlink_port}; dev mode: plain HTTP; "
            f"log {self.superlink.log_path})"
        )

    def agent_env(self) -> dict[str, str]:
        """What the agents need to run a SuperNode (only with --federated)."""
        if not self.enabled or self.superlink is None:
            return {}
        return {
            "EDGEFLEET_AGENT_FEDERATED": "true",
            "EDGEFLEET_AGENT_FEDERATED_SUPERLINK": self.superlink.address,
            "EDGEFLEET_AGENT_FEDERATED_INSECURE": "true",
        }

    def tick(self) -> None:
        """A SuperLink that died is a warning (once), not the end of the demo."""
        code = self.superlink.died() if self.superlink is not None else None
        if code is not None and not self._died:
            self._died = True
            assert self.superlink is not None
            self.say(
                f"warning: the SuperLink exited ({describe_exit(code)}); see "
                f"{self.superlink.log_path}. The rest of the demo goes on."
            )

    def stop(self) -> None:
        if self.superlink is not None:
            self.say("Stopping the SuperLink")
            self.superlink.stop()

    # -- one round --------------------------------------------------------------------------

    def run_round(
        self,
        *,
        api_url: str,
        admin_token: str,
        agents: list[tuple[str, str]],
        stop: threading.Event,
    ) -> None:
        """Label drifted digits on each agent, run one round, follow it to the canary."""
        if not self.enabled or not agents:
            return
        self.say(
            f"Federated learning: {_PER_DEVICE} digits on each agent, half of them tilted by "
            "20 degrees, labelled by an app (POST /v1/feedback):"
        )
        try:
            for (device_id, url), (x, y) in zip(
                agents, device_shards(len(agents), per_device=_PER_DEVICE), strict=True
            ):
                stored = send_feedback(url, x, y)
                self.say(f"  {device_id}: {stored} samples kept on the device")
            with httpx.Client(
                base_url=api_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
            ) as admin:
                self._follow(admin, len(agents), stop)
        except httpx.HTTPError as exc:
            # The round is an extra: the rest of the demo goes on without it.
            self.say(f"  the federated round could not go on: {exc}")

    def _follow(self, admin: httpx.Client, devices: int, stop: threading.Event) -> None:
        body = {
            "model": _MODEL, "rounds": 1, "min_clients": devices, "selector": {"fleet": "demo"},
            "strategy": "fedprox", "rollout": {"canary": 1, "device_timeout_s": 120},
            "gate": {"eval_dataset": _DRIFT, "max_drop_pt": 5.0},
        }  # fmt: skip
        run = _json(admin.post("/v1/federated/runs", json=body))
        self.say(
            f"  run {run['id']}: {_MODEL}:{run['base_version']}, one round over "
            f"{devices} SuperNodes (a Flower round takes ~15 s here)"
        )
        deadline = time.monotonic() + _RUN_TIMEOUT_S
        while run["state"] not in _FINAL and not stop.wait(2.0):
            if time.monotonic() > deadline:
                self.say(f"  run {run['id']} still {run['state']}; see GET /v1/federated/runs")
                return
            run = _json(admin.get(f"/v1/federated/runs/{run['id']}"))
        if stop.is_set():
            return
        for r in run["round_metrics"]:
            self.say(
                f"  round {r['round']}: {r['clients']} devices, {r['examples']} examples, "
                f"loss {r['train_loss']:.3f}, {r['wall_s']:.1f}s, "
                f"{r['bytes_down'] + r['bytes_up']} bytes of head exchanged"
            )
        if run["state"] != "COMPLETED":
            self.say(f"  run {run['id']} ended {run['state']}: {run['reason']}")
            return
        gate = run["metrics"]["gate"]
        self.say(
            f"  {_MODEL}:{run['result_version']} (FP32, parent {run['base_version']}) and "
            f":{run['result_int8_version']} (INT8) registered; on tilted digits "
            f"{gate['eval_base_accuracy']:.1%} -> {gate['eval_accuracy']:.1%}, on the "
            f"held-out digits {gate['base_accuracy']:.1%} -> {gate['accuracy']:.1%}"
        )
        self._canary(admin, run, stop)

    def _canary(self, admin: httpx.Client, run: dict[str, Any], stop: threading.Event) -> None:
        rollout_id = run.get("rollout_id")
        if rollout_id is None:
            self.say(f"  no canary: {run['reason']}")
            return
        deadline = time.monotonic() + 120
        while not stop.wait(1.0) and time.monotonic() < deadline:
            targets = _json(admin.get(f"/v1/rollouts/{rollout_id}/targets"))["items"]
            active = [t["device_id"] for t in targets if t["wave"] == 0 and t["state"] == "ACTIVE"]
            if active:
                self.say(
                    f"  canary {', '.join(active)} runs {_MODEL}:{run['result_int8_version']} "
                    f"(rollout {rollout_id}; the waves after it follow)"
                )
                return
        if not stop.is_set():
            self.say(f"  the canary is not ACTIVE yet: GET /v1/rollouts/{rollout_id}")


def _json(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    raise httpx.HTTPStatusError(
        f"{response.request.method} {response.request.url.path} answered "
        f"{response.status_code}: {response.text[:300]}",
        request=response.request,
        response=response,
    )


def send_feedback(url: str, x: Any, y: Any, *, model: str = _MODEL) -> int:
    """Label rows ``x`` with ``y`` on an agent's local API, 50 at a time; rows stored."""
    stored = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(y), 50):
            rows = x[start : start + 50]
            body = {
                "model": model,
                "labels": [int(v) for v in y[start : start + 50]],
                "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                            "data": [float(v) for v in rows.reshape(-1)]}],
            }  # fmt: skip
            stored += int(_json(client.post("/v1/feedback", json=body))["stored"])
    return stored
