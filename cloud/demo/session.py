"""What `edgefleet demo` does once the API is up, told step by step on the console."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx

from cloud.broker.dynsec import DynsecClient
from cloud.context import CloudContext
from cloud.demo.agents import LocalAgents, agent_command
from cloud.demo.federated import DemoFederation
from cloud.demo.fleet import DemoFleet
from cloud.demo.traffic import Traffic, start_traffic
from cloud.embedded.dashboard import DashboardProcess, dashboard_app
from cloud.embedded.processes import describe_exit
from cloud.pipeline.reference.build import register_reference
from cloud.registry import repository
from shared.errors import ServiceUnavailable

__all__ = ["DEMO_MODEL", "DemoSession"]

DEMO_MODEL = "digits-edge"
REFERENCE = ["digits-cloud", "digits-edge", "digits-edge-weak"]
_ACTIVE_TIMEOUT_S = 30.0


def _without_broker_login(context: CloudContext, device_ids: list[str]) -> set[str]:
    """The enrolled devices among ``device_ids`` that the broker has no login for (enrolled
    by a run whose broker had no authentication); none where the broker has no logins."""
    settings = context.settings
    username, password = settings.mqtt_username, settings.mqtt_password
    if settings.broker_accounts != "dynsec" or username is None or password is None:
        return set()
    with context.database.session() as session:
        enrolled = {d.id for d in repository.list_devices(session)}
    with DynsecClient(
        context.urls.mqtt_url,
        username=username,
        password=password,
        timeout=settings.broker_timeout_s,
        tls=settings.mqtt_tls,
    ) as dynsec:
        return {d for d in device_ids if d in enrolled and dynsec.get_client(d) is None}


class DemoSession:
    """Reference models, then local `edge-agent` processes running the INT8 edge model."""

    def __init__(
        self,
        agents: int,
        *,
        say: Callable[[str], None],
        banner: Callable[[CloudContext, str], None],
        traffic: float = 0.0,
        dashboard_port: int | None = None,
        federated: bool = False,
        sim_agents: int = 0,
    ) -> None:
        self.count = agents
        self.say = say
        self.banner = banner
        # The SuperLink always; with `federated`, one round on the agents (issue 11).
        self.federation = DemoFederation(enabled=federated, say=say)
        self.fleet: LocalAgents | None = None
        self._watching = False
        # Rows per second sent to the agents once they serve the model (0: none).
        self.traffic_rate = traffic
        self.traffic: Traffic | None = None
        self.dashboard_port = dashboard_port  # None: no dashboard
        self.dashboard: DashboardProcess | None = None
        self._dashboard_said = False
        # Simulated devices (cloud/demo/fleet.py): the INT8 model rolled out to them in waves.
        self.sim = DemoFleet(sim_agents, say=say) if sim_agents else None

    def ready(self, context: CloudContext, api_url: str, stop: threading.Event) -> None:
        self.banner(context, api_url)
        self._spawn_dashboard(context, api_url)
        try:
            self._reference(context, stop)
            if self.count and not stop.is_set():
                self._agents(context, api_url, stop)
            if self.sim is not None and not stop.is_set():
                sim_dir = context.settings.data_dir.resolve() / "sim"
                self.sim.run(api_url, context.settings.admin_token, sim_dir, DEMO_MODEL, stop)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"the demo could not reach its own API: {exc}") from exc
        except OSError as exc:
            raise ServiceUnavailable(f"the demo could not use its files: {exc}") from exc
        if not stop.is_set():
            self._dashboard_up()
            self.say("Ctrl-C stops everything.")

    def _reference(self, context: CloudContext, stop: threading.Event) -> None:
        cache = context.settings.data_dir.resolve() / "reference"
        self.say(f"Reference models (built on first start, cached in {cache}):")
        finished: set[str] = set()

        def progress(message: str) -> None:
            # Each edge model brings the cloud model it is calibrated against along: once
            # that one is done, its "already registered" would only repeat it.
            name, _, step = message.partition(": ")
            if step == "already registered" and name in finished:
                return
            if step in ("done", "already registered"):
                finished.add(name)
            self.say(f"  {message}")

        added: list[tuple[str, int]] = []
        # One model at a time, so that a Ctrl-C is heard between two (a build takes a while).
        for name in REFERENCE:
            if stop.is_set():
                return
            added += register_reference(context, names=[name], actor="demo", progress=progress)
        if added:
            self.say("  registered " + ", ".join(f"{m}:{v}" for m, v in added))

    def _agents(self, context: CloudContext, api_url: str, stop: threading.Event) -> None:
        command = agent_command()
        if command is None:
            self.say("No local agents: `edge-agent` is not installed (pip install -e '.[edge]').")
            return
        data_dir = context.settings.data_dir.resolve()
        self.federation.start(context)
        self.fleet = LocalAgents(
            command=command,
            api_url=api_url,
            admin_token=context.settings.admin_token,
            data_dir=data_dir,
            count=self.count,
            say=self.say,
            extra_env=self.federation.agent_env(),
        )
        without_login = _without_broker_login(context, [a.device_id for a in self.fleet.agents])
        self.say(f"Local edge agents (`edge-agent run`, one device each, under {data_dir}/agents):")
        for device_id in sorted(without_login):
            self.say(
                f"  {device_id} has no broker login (enrolled on a broker without logins): "
                "re-enrolling"
            )
        for agent in self.fleet.start(stop, without_login=without_login):
            api = f"local API {agent.api_url}" if agent.api_url else "local API off"
            self.say(f"  {agent.device_id}  {api}  log {agent.log_path}")
        if stop.is_set():
            return
        self._watching = True
        version = self.fleet.latest_int8(DEMO_MODEL)
        if version is None:
            self.say(f"  {DEMO_MODEL} has no INT8 version: nothing deployed")
            return
        self.say(f"Deploying {DEMO_MODEL}:{version} (INT8) to the agents over MQTT:")
        revs = self.fleet.deploy(DEMO_MODEL, version)
        active = self.fleet.wait_active(DEMO_MODEL, version, revs, stop, _ACTIVE_TIMEOUT_S)
        for agent in self.fleet.agents:
            if agent in active and agent.api_url:
                self.say(
                    f"  {agent.device_id} serves it: POST {agent.api_url}/v2/models/"
                    f"{DEMO_MODEL}/infer (KServe v2)"
                )
            elif agent in active:
                self.say(f"  {agent.device_id} serves it (its local API is off)")
            elif not stop.is_set():
                self.say(
                    f"  {agent.device_id}: not active after {_ACTIVE_TIMEOUT_S:g}s; see "
                    f"GET {api_url}/v1/devices/{agent.device_id}/events and {agent.log_path}"
                )
        if self.traffic_rate > 0 and not stop.is_set():
            urls = [a.api_url for a in active if a.api_url]
            self.traffic = start_traffic(
                context, urls, model=DEMO_MODEL, version=version, rate=self.traffic_rate,
                say=self.say,
            )  # fmt: skip
        serving = [(a.device_id, a.api_url) for a in active if a.api_url]
        self.federation.run_round(
            api_url=api_url, admin_token=context.settings.admin_token, agents=serving, stop=stop
        )

    # -- the dashboard: a child process in its own session, started with the demo -------------

    def _spawn_dashboard(self, context: CloudContext, api_url: str) -> None:
        """Started early (Streamlit takes seconds to import) and waited for at the end."""
        if self.dashboard_port is None:
            return
        if dashboard_app() is None:
            self.say("No dashboard: Streamlit is not installed (pip install -e '.[dashboard]').")
            return
        logs = context.settings.data_dir.resolve() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.dashboard = DashboardProcess(
            api_url=api_url, token=context.settings.admin_token, port=self.dashboard_port,
            log_path=logs / "dashboard.log",
        )  # fmt: skip
        self.dashboard.child.spawn()

    def _dashboard_up(self) -> None:
        dashboard = self.dashboard
        if dashboard is None:
            return
        try:
            dashboard.child.wait_until(dashboard.healthy, timeout=60, what="the dashboard")
        except ServiceUnavailable as exc:
            self.say(f"warning: {exc.message}; see {dashboard.child.log_path}. The demo goes on.")
            dashboard.stop()
            self.dashboard = None
            return
        self.say(
            f"Dashboard  {dashboard.url}  (Streamlit, over the API; log {dashboard.child.log_path})"
        )

    def tick(self) -> None:
        """Called about every second: an agent (or the dashboard) that died is a warning, not
        the end."""
        dashboard = self.dashboard
        code = dashboard.exit_code() if dashboard is not None else None
        if dashboard is not None and code is not None and not self._dashboard_said:
            self._dashboard_said = True
            self.say(
                f"warning: the dashboard exited ({describe_exit(code)}); see "
                f"{dashboard.child.log_path}. The rest of the demo goes on."
            )
        self.federation.tick()
        if self.sim is not None:
            self.sim.tick()
        if self.fleet is None or not self._watching:
            return
        for agent, code in self.fleet.newly_dead():
            self.say(
                f"warning: {agent.device_id} exited ({describe_exit(code)}); "
                f"see {agent.log_path}. The rest of the demo goes on."
            )

    def stop(self) -> None:
        if self.traffic is not None:
            self.traffic.stop()
            self.say(f"Traffic stopped: {self.traffic.total.rows} rows sent in all")
        if self.dashboard is not None:
            self.say("Stopping the dashboard")
            self.dashboard.stop()
        if self.sim is not None:
            self.sim.stop()
        if self.fleet is not None:
            self._watching = False
            self.say(f"Stopping {len(self.fleet.agents)} local agent(s)")
            self.fleet.stop()
        self.federation.stop()
