"""Fixtures: one ioda server per test session, SDK clients for both signers, paho devices.

Server contract (what this file relies on):
  $IODA_BIN serve --data-dir DIR --http-addr 127.0.0.1:0 --mqtt-addr 127.0.0.1:0 --coap-addr 127.0.0.1:0 --coaps-addr 127.0.0.1:0 --mqtts-addr 127.0.0.1:0 --wss-addr 127.0.0.1:0 --ws-addr 127.0.0.1:0 --https-addr 127.0.0.1:0
  writes DIR/listeners.json         {"http": "127.0.0.1:PORT", "mqtt": "127.0.0.1:PORT", "mqtts": ..., "wss": ..., "ws": ..., "https": ..., "coap": ..., "coaps": ...}
  writes DIR/tls/ca.pem             the CA MQTTS and wss devices verify the server with
  writes DIR/admin-credentials.json {"project_id": ..., "access_key": ..., "secret_key": ...}
  exits with status 0 within 15 s of SIGTERM.

Run:  pip install -r tests/python/requirements.txt
      IODA_BIN=target/debug/ioda python -m pytest tests/python
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from ioda_mqtt import Device, SimDevice
from ioda_testlib import SIGNER_IDS, SIGNERS, make_client

STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 15.0
LOG_TAIL_LINES = 300

_LOG_PATH_KEY = pytest.StashKey[Path]()


@dataclasses.dataclass(frozen=True)
class IodaServer:
    data_dir: Path
    log_path: Path
    http_addr: str  # "127.0.0.1:PORT"
    mqtt_host: str
    mqtt_port: int
    mqtts_port: int
    wss_port: int  # MQTT over secure WebSocket, path /mqtt
    ws_port: int  # MQTT over plain WebSocket, path /mqtt
    https_port: int  # HTTPS device access (/v5/device-auth, /v5/devices/{id}/sys/...)
    tls_ca: str  # the CA file ioda made, which MQTTS devices verify it with
    coap_addr: str  # "127.0.0.1:PORT" (UDP, CoAP/LwM2M)
    binary: str  # the ioda binary, for `ioda api` calls outside the SDK
    project_id: str
    access_key: str
    secret_key: str

    @property
    def http_endpoint(self) -> str:
        return f"http://{self.http_addr}"


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _read_json(path: Path) -> dict | None:
    """Parsed JSON object, or None while the file is missing / partially written."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


@pytest.fixture(scope="session")
def ioda_server(tmp_path_factory, request) -> IodaServer:
    binary = os.environ.get("IODA_BIN")
    if not binary:
        pytest.fail("IODA_BIN is not set: export IODA_BIN=/path/to/ioda (the built server binary)",
                    pytrace=False)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        pytest.fail(f"IODA_BIN={binary!r} is not an executable file", pytrace=False)

    # The SDK uses requests, which honours *_proxy variables; never proxy the local server.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy

    data_dir = tmp_path_factory.mktemp("ioda-data")
    log_path = data_dir / "ioda.log"
    request.config.stash[_LOG_PATH_KEY] = log_path
    cmd = [binary, "serve", "--data-dir", str(data_dir),
           "--http-addr", "127.0.0.1:0", "--mqtt-addr", "127.0.0.1:0",
           "--coap-addr", "127.0.0.1:0", "--coaps-addr", "127.0.0.1:0",
           "--mqtts-addr", "127.0.0.1:0", "--wss-addr", "127.0.0.1:0", "--ws-addr", "127.0.0.1:0",
           "--https-addr", "127.0.0.1:0"]

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def abort(reason: str) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        pytest.fail(f"{reason}\ncommand: {' '.join(cmd)}\n--- server log ({log_path}) ---\n"
                    f"{_log_tail(log_path)}", pytrace=False)

    listeners = creds = None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            abort(f"ioda exited during startup with status {proc.returncode}")
        listeners = _read_json(data_dir / "listeners.json")
        creds = _read_json(data_dir / "admin-credentials.json")
        if (listeners and listeners.get("http") and listeners.get("mqtt")
                and creds and all(creds.get(k) for k in ("project_id", "access_key", "secret_key"))):
            break
        time.sleep(0.1)
    else:
        abort(f"ioda did not write a valid listeners.json and admin-credentials.json within "
              f"{STARTUP_TIMEOUT:.0f}s (listeners={listeners!r}, credentials present={bool(creds)})")

    mqtt_host, mqtt_port = _split_addr(listeners["mqtt"])
    server = IodaServer(
        data_dir=data_dir, log_path=log_path, http_addr=listeners["http"],
        mqtt_host=mqtt_host, mqtt_port=mqtt_port, mqtts_port=_split_addr(listeners["mqtts"])[1],
        wss_port=_split_addr(listeners["wss"])[1], ws_port=_split_addr(listeners["ws"])[1],
        https_port=_split_addr(listeners["https"])[1],
        tls_ca=str(data_dir / "tls" / "ca.pem"), coap_addr=listeners["coap"], binary=binary,
        project_id=creds["project_id"], access_key=creds["access_key"], secret_key=creds["secret_key"],
    )
    yield server

    # Graceful shutdown is part of the contract: SIGTERM -> exit status 0 within 15 s.
    if proc.poll() is not None:
        pytest.fail(f"ioda died during the test session with status {proc.returncode}\n"
                    f"--- server log ---\n{_log_tail(log_path)}", pytrace=False)
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"ioda did not exit within {SHUTDOWN_TIMEOUT:.0f}s of SIGTERM\n"
                    f"--- server log ---\n{_log_tail(log_path)}", pytrace=False)
    assert rc == 0, f"ioda exited with status {rc} after SIGTERM\n--- server log ---\n{_log_tail(log_path)}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the server log when anything failed."""
    log_path = config.stash.get(_LOG_PATH_KEY, None)
    stats = terminalreporter.stats
    if log_path is None or not (stats.get("failed") or stats.get("error")):
        return
    terminalreporter.section(f"ioda server log (last {LOG_TAIL_LINES} lines of {log_path})")
    terminalreporter.write_line(_log_tail(log_path))


# ---------------------------------------------------------------------------
# SDK clients
# ---------------------------------------------------------------------------

@pytest.fixture(params=SIGNERS, ids=SIGNER_IDS)
def signer(request) -> str:
    """The signature algorithm under test: SDK-HMAC-SHA256 or V11-HMAC-SHA256."""
    return request.param


@pytest.fixture
def client_factory(ioda_server, signer) -> Callable:
    """``client_factory(ak=..., sk=..., project_id=...)``: a client with the current signer and
    the admin credentials, individually overridable (for authentication negatives)."""

    def factory(ak: str | None = None, sk: str | None = None, project_id: str | None = None):
        return make_client(signer, ioda_server.http_endpoint,
                           ak or ioda_server.access_key, sk or ioda_server.secret_key,
                           project_id or ioda_server.project_id)

    return factory


@pytest.fixture
def client(client_factory):
    """IoTDAClient with admin credentials, once per signature algorithm."""
    return client_factory()


@pytest.fixture
def admin_client(ioda_server):
    """IoTDAClient (SDK-HMAC-SHA256 only) for set-up in pure device-protocol tests."""
    return make_client(SIGNERS[0], ioda_server.http_endpoint, ioda_server.access_key,
                       ioda_server.secret_key, ioda_server.project_id)


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------

@pytest.fixture
def device_factory(ioda_server):
    """``device_factory(device_id, secret, **Device kwargs)`` -> unconnected ``Device``;
    every device created is closed at teardown."""
    created: list[Device] = []

    def factory(device_id: str, secret: str, **kwargs) -> Device:
        dev = Device(ioda_server.mqtt_host, ioda_server.mqtt_port, device_id, secret, **kwargs)
        created.append(dev)
        return dev

    yield factory
    for dev in created:
        dev.close()


@pytest.fixture
def sim_device_factory(ioda_server):
    """``sim_device_factory(device_id, secret, **SimDevice kwargs)`` -> unconnected ``SimDevice``
    (subscribes to its downlink topics on connect and answers requests); closed at teardown."""
    created: list[SimDevice] = []

    def factory(device_id: str, secret: str, **kwargs) -> SimDevice:
        dev = SimDevice(ioda_server.mqtt_host, ioda_server.mqtt_port, device_id, secret, **kwargs)
        created.append(dev)
        return dev

    yield factory
    for dev in created:
        dev.close()
