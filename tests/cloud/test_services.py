"""Configured services are used as they are; unset ones start embedded, as children in
sessions of their own; the embedded broker is Mosquitto with per-device logins where it can be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
import redis

from cloud.broker.provisioning import DynsecAccounts
from cloud.embedded import processes
from cloud.embedded.mosquitto import QUEUE_LIMITS, BrokerLogin, MosquittoFiles
from cloud.embedded.processes import ChildProcess
from cloud.embedded.services import BrokerChoice, EmbeddedServices, ServiceUrls, mqtt_address
from cloud.launcher import on_embedded_broker
from cloud.settings import CloudSettings
from shared.errors import ServiceUnavailable
from tests.brokers import MqttProbe, mosquitto_with_plugin
from tests.services import MOSQUITTO, REDIS, need


def test_configured_urls_start_nothing(tmp_path: Path) -> None:
    need(MOSQUITTO)
    need(REDIS)
    with EmbeddedServices(
        data_dir=tmp_path,
        database_url="sqlite://",
        mqtt_url="mqtt://127.0.0.1:1883",
        redis_url="redis://127.0.0.1:6379/0",
    ) as services:
        assert services.children == {}
        assert services.urls is not None
        assert services.urls.embedded == []


def test_the_embedded_broker_and_redis_are_real(embedded: ServiceUrls) -> None:
    """A retained 1 MiB message goes through the embedded broker; Redis answers SET/GET."""
    r = redis.Redis.from_url(embedded.redis_url)
    r.set("k", "v")
    assert r.get("k") == b"v"
    host, port = mqtt_address(embedded.mqtt_url)
    payload = bytes(range(256)) * 4096
    got: list[bytes] = []
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub")
    pub.connect(host, port)
    pub.loop_start()
    pub.publish("edgefleet/test/big", payload, qos=1, retain=True).wait_for_publish(10)
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = lambda _c, _u, msg: got.append(msg.payload)
    sub.connect(host, port)
    sub.subscribe("edgefleet/test/big", qos=1)
    sub.loop_start()
    import time

    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    for client in (pub, sub):
        client.loop_stop()
        client.disconnect()
    assert got == [payload]


def test_a_child_runs_in_its_own_session() -> None:
    """A terminal's Ctrl-C goes to our process group; a child in a session of its own is
    not in it, so it is stopped by us, after what uses it, not by the terminal."""
    child = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"])
    child.spawn()
    process = child.process
    assert process is not None
    try:
        assert os.getsid(process.pid) == process.pid
        assert os.getpgid(process.pid) != os.getpgid(0)
    finally:
        child.stop()
    assert process.returncode == -signal.SIGTERM


# A cloud serving gRPC, as the demo's is when it starts its agents, the dashboard and Flower.
_SPAWN_BESIDE_GRPC = """
import os, sys
from concurrent import futures
import grpc
from cloud.embedded.processes import ChildProcess
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_insecure_port("127.0.0.1:0")
server.start()
forks = []
os.register_at_fork(before=lambda: forks.append(1))
child = ChildProcess([sys.executable, "-c", "pass"])
child.spawn()
assert child.process is not None
print(child.process.wait(30), len(forks))
"""


def test_a_child_is_started_without_forking_a_process_that_serves_grpc() -> None:
    """gRPC's fork handlers restart its poller threads in a forked child; subprocess then
    closes the child's inherited fds before exec, and a poller whose next epoll_wait came
    first made gRPC abort the child (SIGABRT, its log one `Epoll1Poller ... epoll_wait
    error: Bad file descriptor` line): a demo agent, one start in a few hundred. A child is
    started without fork (vfork and exec), so no fork handler, gRPC's or ours, runs."""
    done = subprocess.run(
        [sys.executable, "-c", _SPAWN_BESIDE_GRPC],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    exit_code, forks = done.stdout.split()
    assert exit_code == "0", done.stderr
    assert forks == "0", done.stderr


def test_stop_kills_a_child_that_ignores_sigterm() -> None:
    """SIGTERM first; a child that ignores it is killed once the wait runs out."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    child = ChildProcess([sys.executable, "-c", stubborn])
    child.spawn()
    assert child.process is not None
    process = child.process
    child.wait_until(lambda: _ignores_sigterm(process.pid), timeout=10, what="stubborn child")
    child.stop(timeout=0.5)  # the grace SIGTERM gets; after SIGKILL, stop waits as long as needed
    assert process.returncode == -signal.SIGKILL


def test_stop_kills_what_the_child_left_in_its_group_after_it_exited(tmp_path: Path) -> None:
    """A leader that exits leaves its group behind (a shell's background job here): stop()
    still signals the whole group, and nothing of it is left."""
    pid_file = tmp_path / "orphan.pid"
    child = ChildProcess(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; exit 0"])
    child.spawn()
    _until_exited(child)
    orphan = psutil.Process(int(pid_file.read_text()))
    assert child.exit_code() == 0
    assert orphan.is_running()
    child.stop()
    assert psutil.wait_procs([orphan], timeout=10)[1] == []


def test_a_child_that_cannot_be_stopped_does_not_keep_the_others_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping Redis fails (or a second Ctrl-C interrupts it): the broker is stopped all
    the same, and what went wrong is raised once both were dealt with."""
    for trouble in (OSError("stop failed"), KeyboardInterrupt()):
        services = _services(tmp_path)
        broker = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"])
        redis_child = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"])
        broker.spawn()
        redis_child.spawn()
        services.children = {"mqtt": broker, "redis": redis_child}
        processes = [psutil.Process(c.pid) for c in (broker, redis_child) if c.pid is not None]

        def failing_stop(timeout: float = 5.0, error: BaseException = trouble) -> None:
            raise error

        monkeypatch.setattr(redis_child, "stop", failing_stop)
        with pytest.raises(type(trouble)):
            services.stop()
        assert broker.process is None
        assert not processes[0].is_running()
        monkeypatch.undo()
        redis_child.stop()
        assert psutil.wait_procs(processes, timeout=10)[1] == []


def test_a_dead_child_is_named_with_its_log_and_left_for_stop_to_reap(tmp_path: Path) -> None:
    services = _services(tmp_path)
    child = ChildProcess(
        [sys.executable, "-c", "raise SystemExit(7)"], log_path=tmp_path / "redis.log"
    )
    services.children = {"redis": child}
    assert services.died() is None
    child.spawn()
    _until_exited(child)
    said = services.died()
    assert said == f"the embedded redis exited (code 7); see {tmp_path / 'redis.log'}"
    assert child.process is not None
    assert child.process.returncode is None  # not reaped
    services.stop()
    assert services.children == {}


def test_a_child_whose_parent_is_gone_before_it_runs_exits_at_once() -> None:
    """The child's first program sets its parent-death signal, then leaves if its parent is
    already another process: it would outlive the one that died."""
    launcher = [sys.executable, "-I", "-S", processes._DIE_WITH_PARENT]
    program = [sys.executable, sys.executable, "-c", "print('ran')"]
    alive = subprocess.run(
        [*launcher, str(os.getpid()), *program],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert (alive.returncode, alive.stdout) == (0, "ran\n")
    orphaned = subprocess.run(
        [*launcher, str(os.getpid() + 1), *program],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert (orphaned.returncode, orphaned.stdout) == (1, "")


def test_a_child_runs_its_program_with_sigterm_as_its_parent_death_signal(
    tmp_path: Path,
) -> None:
    """Linux ends the child with SIGTERM when we die, even by SIGKILL: the signal set by its
    first program is still set once it became the program it was started for."""
    pdeathsig = (
        "import ctypes, sys; value = ctypes.c_int(); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(value)); "  # PR_GET_PDEATHSIG
        "print(value.value, sys.argv[1:])"
    )
    log = tmp_path / "child.log"
    child = ChildProcess([sys.executable, "-c", pdeathsig, "an", "argument"], log_path=log)
    child.spawn()
    assert child.process is not None
    assert child.process.wait(30) == 0, log.read_text()
    assert log.read_text() == f"{int(signal.SIGTERM)} ['an', 'argument']\n"
    child.stop()


def test_a_program_that_is_not_there_is_an_error_of_the_spawn(tmp_path: Path) -> None:
    """As with Popen: not an exit status of a child that never ran it."""
    child = ChildProcess([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError):
        child.spawn()
    assert child.process is None
    path_child = ChildProcess(["edgefleet-no-such-program"], env={"PATH": str(tmp_path)})
    with pytest.raises(FileNotFoundError):
        path_child.spawn()


def test_waiting_for_a_child_that_exits_is_a_clear_error() -> None:
    child = ChildProcess([sys.executable, "-c", "raise SystemExit(3)"])
    child.spawn()
    with pytest.raises(ServiceUnavailable, match=r"exited \(3\)"):
        child.wait_until(lambda: False, timeout=10, what="short-lived")


def _until_exited(child: ChildProcess) -> None:
    deadline = time.monotonic() + 10
    while child.exit_code() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


# -- the embedded Mosquitto ------------------------------------------------------------------

SHIPPED_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "edgefleet.conf"
# Directives of the shipped config about who connects and how, and where it stores: not queues.
_NOT_LIMITS = {
    "listener", "certfile", "keyfile", "cafile", "require_certificate", "allow_anonymous",
    "password_file", "acl_file", "plugin", "plugin_opt_config_file", "include_dir",
    "persistence", "persistence_location", "autosave_interval",
}  # fmt: skip


def _directives(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found[key] = value.strip()
    return found


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _services(data_dir: Path, broker: BrokerChoice = "auto") -> EmbeddedServices:
    """An embedded broker only (the Redis URL is never used)."""
    return EmbeddedServices(
        data_dir=data_dir,
        database_url="sqlite://",
        mqtt_url=None,
        redis_url="redis://unused",
        broker=broker,
    )


def _embedded_mosquitto(data_dir: Path) -> EmbeddedServices:
    mosquitto_with_plugin()
    return _services(data_dir, "mosquitto")


def test_the_embedded_mosquitto_keeps_the_shipped_queue_limits(tmp_path: Path) -> None:
    """The demo's broker drops (or keeps) what production's does: every limit of
    deploy/mosquitto/edgefleet.conf is in the config written for the embedded one."""
    shipped = _directives(SHIPPED_CONF)
    limits = {k: v for k, v in shipped.items() if k not in _NOT_LIMITS}
    assert "max_queued_messages" in limits
    assert limits == QUEUE_LIMITS
    MosquittoFiles(tmp_path / "broker", plugin=Path("/plugin.so")).prepare(1883)
    written = _directives(tmp_path / "broker" / "mosquitto.conf")
    assert {k: written.get(k) for k in limits} == limits
    assert written["allow_anonymous"] == "false"
    assert written["listener"] == "1883 127.0.0.1"


def test_the_broker_files_are_private_from_their_creation(tmp_path: Path) -> None:
    """Even under umask 0 the folder is 0700 and both files 0600: the plugin's file holds
    every device's password hash, the config where it lies."""
    previous = os.umask(0)
    try:
        MosquittoFiles(tmp_path / "broker", plugin=Path("/plugin.so")).prepare(1883)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "broker") == 0o700
    assert _mode(tmp_path / "broker" / "mosquitto.conf") == 0o600
    assert _mode(tmp_path / "broker" / "dynsec.json") == 0o600
    assert sorted(p.name for p in (tmp_path / "broker").iterdir()) == [
        "dynsec.json",
        "mosquitto.conf",
    ]


def test_an_unreadable_login_file_is_refused_not_replaced(tmp_path: Path) -> None:
    """The plugin's file holds the devices' logins: a damaged one stops the start with a
    clear reason and stays as it was, rather than being replaced by an empty one."""
    folder = tmp_path / "broker"
    folder.mkdir()
    (folder / "dynsec.json").write_text("{not json")
    with pytest.raises(ServiceUnavailable, match="holds the devices' broker logins"):
        MosquittoFiles(folder, plugin=Path("/plugin.so")).prepare(1883)
    assert (folder / "dynsec.json").read_text() == "{not json"


def test_the_embedded_mosquitto_refuses_anonymous_clients_and_keeps_device_logins(
    tmp_path: Path,
) -> None:
    """The embedded Mosquitto refuses a client without a login and gives the cloud one that
    administers its logins. Started again on the same data dir, the cloud's password is a
    new one (the old one is refused), and a device login made in the first run still works."""
    with _embedded_mosquitto(tmp_path) as services:
        assert services.urls is not None
        assert services.broker_login is not None
        assert services.urls.embedded_broker == "mosquitto"
        url, first = services.urls.mqtt_url, services.broker_login
        port = mqtt_address(url)[1]
        anonymous = MqttProbe(port, None, None)
        try:
            assert not anonymous.connect()
        finally:
            anonymous.close()
        DynsecAccounts(url, username=first.username, password=first.password).provision_device(
            "cam-1", "token-cam-1"
        )
    with _embedded_mosquitto(tmp_path) as services:
        assert services.urls is not None
        assert services.broker_login is not None
        second, port = services.broker_login, mqtt_address(services.urls.mqtt_url)[1]
        assert second.username == first.username
        assert second.password != first.password
        old = MqttProbe(port, first.username, first.password)
        device = MqttProbe(port, "cam-1", "token-cam-1", client_id="agent-cam-1")
        try:
            assert not old.connect()
            assert device.connect()
            assert device.subscribe("edgefleet/v1/dev/cam-1/#")
        finally:
            old.close()
            device.close()
        accounts = DynsecAccounts(
            services.urls.mqtt_url, username=second.username, password=second.password
        )
        with accounts.connect() as dynsec:
            assert dynsec.get_client("cam-1") is not None


def test_auto_is_mosquitto_where_installed_and_rumqttd_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "auto" starts Mosquitto on a machine that has it with its plugin; without, rumqttd
    (which has no logins); "mosquitto" without one is a clear error."""
    mosquitto_with_plugin()
    with _services(tmp_path / "a") as services:
        assert services.urls is not None
        assert services.urls.embedded_broker == "mosquitto"
    monkeypatch.setattr("cloud.embedded.services.find_mosquitto", lambda: None)
    with _services(tmp_path / "b") as services:
        assert services.urls is not None
        assert services.urls.embedded_broker == "rumqttd"
        assert services.broker_login is None
    with pytest.raises(ServiceUnavailable, match="lacks mosquitto"):
        _services(tmp_path / "c", "mosquitto").start()


def test_on_an_embedded_mosquitto_the_cloud_uses_its_login_there() -> None:
    """The cloud's settings take the embedded broker's login and provision device logins
    through its dynamic security; on rumqttd they stay as configured."""
    settings = CloudSettings(dev_mode=True, data_dir=Path("demo"))
    assert on_embedded_broker(settings, None) is settings
    effective = on_embedded_broker(settings, BrokerLogin("edgefleet-cloud", "s3cret-password"))
    assert effective.broker_accounts == "dynsec"
    assert (effective.mqtt_username, effective.mqtt_password) == (
        "edgefleet-cloud",
        "s3cret-password",
    )
    assert effective.data_dir == settings.data_dir
    assert settings.broker_accounts == "none"
