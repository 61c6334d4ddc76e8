"""`edge-agent enroll` takes its token from a file, standard input or the environment (never
needing it in argv, which every user reads with `ps`), and fails with a message, not a trace;
`edge-agent run` stops on SIGTERM whichever of its threads the signal lands on."""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.cli import TOKEN_ENV, main
from edge_agent.config import load_settings
from shared.signing import generate_key, public_key_b64
from tests.conftest import RunningApi
from tests.pki import make_pki


def _token(api: RunningApi, device_id: str) -> str:
    with api.client() as c:
        answer = c.post("/v1/devices", json={"device_id": device_id})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def _enroll(api: RunningApi, data_dir: Path, *extra: str) -> int:
    return main(["--data-dir", str(data_dir), "enroll", "--cloud", api.url, *extra])


def _config(data_dir: Path) -> dict[str, str]:
    return dict(json.loads((data_dir / "agent.json").read_text()))


def test_the_token_comes_from_a_file_or_standard_input(
    api: RunningApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--token-file PATH` and `--token-file -` (what the demo uses) enroll the device; the
    config that holds the token is private."""
    token_file = tmp_path / "token"
    token_file.write_text(_token(api, "cam-file") + "\n")
    assert _enroll(api, tmp_path / "a", "--token-file", str(token_file)) == 0
    assert _config(tmp_path / "a")["device_id"] == "cam-file"
    assert _config(tmp_path / "a")["token"] == token_file.read_text().strip()
    assert (tmp_path / "a" / "agent.json").stat().st_mode & 0o777 == 0o600

    token = _token(api, "cam-stdin")
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert _enroll(api, tmp_path / "b", "--token-file", "-") == 0
    assert (_config(tmp_path / "b")["device_id"], _config(tmp_path / "b")["token"]) == (
        "cam-stdin",
        token,
    )


def test_the_token_comes_from_the_environment(
    api: RunningApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, _token(api, "cam-env"))
    assert _enroll(api, tmp_path) == 0
    assert _config(tmp_path)["device_id"] == "cam-env"


def test_without_a_token_enroll_says_how_to_give_one(
    api: RunningApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert _enroll(api, tmp_path) == 2
    assert f"give --token-file PATH or set {TOKEN_ENV}" in capsys.readouterr().err
    assert _enroll(api, tmp_path, "--token-file", str(tmp_path / "missing")) == 2
    assert "cannot read the token" in capsys.readouterr().err
    assert not (tmp_path / "agent.json").exists()


def test_a_config_that_cannot_be_written_is_a_message_not_a_traceback(
    api: RunningApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data dir is a file: enroll says it cannot write its config and exits 1 (the demo
    shows that line as the reason its agent could not enroll)."""
    data_dir = tmp_path / "taken"
    data_dir.write_text("not a folder")
    code = _enroll(api, data_dir, "--token", _token(api, "cam-blocked"))
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot write {data_dir / 'agent.json'}" in err
    assert "Traceback" not in err


def test_enroll_writes_the_broker_tls_files_into_a_config_private_from_creation(
    api: RunningApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--mqtt mqtts://… --mqtt-ca-file/--mqtt-cert-file/--mqtt-key-file` land in the config as
    absolute paths; under umask 0, with chmod made to fail, the file is still 0600: it was
    created so, never changed after."""
    pki = make_pki(tmp_path / "pki")
    monkeypatch.chdir(tmp_path)

    def no_chmod(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the config was chmod-ed after it was written")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    previous = os.umask(0)
    try:
        code = _enroll(
            api, tmp_path / "dev", "--token", _token(api, "cam-tls"),
            "--mqtt", "mqtts://broker.example", "--mqtt-ca-file", "pki/ca.pem",
            "--mqtt-cert-file", str(pki.client_cert), "--mqtt-key-file", str(pki.client_key),
        )  # fmt: skip
    finally:
        os.umask(previous)
    assert code == 0
    config = _config(tmp_path / "dev")
    assert config["mqtt_url"] == "mqtts://broker.example"
    assert config["mqtt_ca_file"] == str(pki.ca_file.resolve())
    assert (config["mqtt_cert_file"], config["mqtt_key_file"]) == (
        str(pki.client_cert.resolve()),
        str(pki.client_key.resolve()),
    )
    assert (tmp_path / "dev" / "agent.json").stat().st_mode & 0o777 == 0o600
    assert load_settings(tmp_path / "dev" / "agent.json").mqtt_tls is not None


def test_enroll_refuses_tls_files_it_cannot_use(
    api: RunningApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA file that is not there, or TLS files for the plain broker the cloud announces:
    exit 2 with the reason, and no config."""
    pki = make_pki(tmp_path / "pki")
    token = _token(api, "cam-bad-tls")
    missing = ["--mqtt", "mqtts://broker.example", "--mqtt-ca-file", str(tmp_path / "nope.pem")]
    assert _enroll(api, tmp_path / "a", "--token", token, *missing) == 2
    assert "nope.pem: No such file" in capsys.readouterr().err
    assert _enroll(api, tmp_path / "b", "--token", token, "--mqtt-ca-file", str(pki.ca_file)) == 2
    assert "give --mqtt mqtts://host[:port]" in capsys.readouterr().err
    assert not (tmp_path / "a" / "agent.json").exists()
    assert not (tmp_path / "b" / "agent.json").exists()


def test_run_stops_on_a_sigterm_that_lands_on_any_of_its_threads(tmp_path: Path) -> None:
    """The kernel may hand a process's SIGTERM (the demo's, or the parent-death signal) to
    any thread. Before, the agent then slept on in ``stop.wait()``, its handler waiting for
    a main thread that never woke: a demo killed hard left such agents running for good.
    Here the signal goes to the agent's newest thread; it stops and removes its ready file."""
    key = generate_key()
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "device_id": "cam-signal",
                "token": "efd_not-checked-here",
                "cloud_url": "http://127.0.0.1:9",
                "mqtt_url": "mqtt://127.0.0.1:9",  # nothing there: the agent runs anyway
                "public_key": public_key_b64(key.public_key()),
                "data_dir": str(tmp_path / "data"),
            }
        )
    )
    ready = tmp_path / "ready.json"
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "--config", str(config), "run",
         "--port", "0", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.is_file() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.is_file(), agent.communicate(timeout=10)[0] if agent.poll() else "no ready"
        threads = sorted(int(t) for t in os.listdir(f"/proc/{agent.pid}/task"))
        assert len(threads) > 1
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.tgkill(agent.pid, threads[-1], signal.SIGTERM) == 0
        output, _ = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, output
    assert not ready.exists()
    assert "Traceback" not in output
