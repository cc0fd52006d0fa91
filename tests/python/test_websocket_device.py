"""MQTT over WebSocket: paho devices on ``wss://…/mqtt`` (TLS verified with ioda's CA, as on
MQTTS) and ``ws://…/mqtt``, driven through the official application SDK; and what a wrong
upgrade request is told."""

from __future__ import annotations

import base64
import os
import socket

import paho.mqtt.client as mqtt
from huaweicloudsdkiotda.v5.model import (
    CreateCommandRequest,
    CreateMessageRequest,
    DeviceCommandRequest,
    DeviceMessageRequest,
)

from ioda_mqtt import Device, SimDevice
from ioda_testlib import (
    COMMAND,
    COMMAND_OK,
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    MESSAGE,
    add_device,
    create_product,
    reported_properties,
    wait_for_status,
    wait_until,
)


def _online_device(admin_client, ioda_server, port: int, **kwargs) -> tuple[str, SimDevice]:
    """A new device connected on ``ws(s)://…:port/mqtt``, ONLINE."""
    product = create_product(admin_client)
    created = add_device(admin_client, product.product_id)
    dev = SimDevice(ioda_server.mqtt_host, port, created.device_id, created.auth_info.secret,
                    websocket_path="/mqtt", **kwargs)
    assert dev.connect() == CONNACK_ACCEPTED
    wait_for_status(admin_client, created.device_id, "ONLINE")
    return created.device_id, dev


def test_a_wss_device_reports_and_answers_a_synchronous_command(admin_client, ioda_server):
    device_id, dev = _online_device(admin_client, ioda_server, ioda_server.wss_port,
                                    tls_ca=ioda_server.tls_ca)
    try:
        reported = {"temp": 21.25, "mode": "auto"}
        assert dev.report_properties([{"service_id": "Temperature", "properties": reported}]) == 0
        wait_until(lambda: reported_properties(admin_client, device_id, "Temperature") == reported,
                   5.0, what=f"reported {reported}")

        answer = admin_client.create_command(CreateCommandRequest(
            device_id=device_id,
            body=DeviceCommandRequest(service_id="Temperature", command_name="SET_MODE",
                                      paras={"mode": "manual"})))
        assert answer.response == COMMAND_OK, "the device's reply came back over wss"
        (command,) = dev.received(COMMAND)
        assert command.payload["paras"] == {"mode": "manual"}
        assert not dev.errors
    finally:
        dev.close()
    wait_for_status(admin_client, device_id, "OFFLINE")


def test_a_ws_device_on_mqtt_5_receives_a_message(admin_client, ioda_server):
    device_id, dev = _online_device(admin_client, ioda_server, ioda_server.ws_port,
                                    protocol=mqtt.MQTTv5)
    try:
        sent = admin_client.create_message(CreateMessageRequest(
            device_id=device_id, body=DeviceMessageRequest(message={"over": "websocket"})))
        (message,) = dev.wait_for(MESSAGE)
        assert message.payload["content"] == {"over": "websocket"}
        assert message.payload["id"] == sent.message_id
    finally:
        dev.close()


def test_a_wrong_password_over_wss_is_connack_4(admin_client, ioda_server):
    product = create_product(admin_client)
    created = add_device(admin_client, product.product_id)
    dev = Device(ioda_server.mqtt_host, ioda_server.wss_port, created.device_id, "not-the-secret",
                 tls_ca=ioda_server.tls_ca, websocket_path="/mqtt")
    try:
        assert dev.connect() == CONNACK_BAD_CREDENTIALS
    finally:
        dev.close()


def _upgrade(ioda_server, path: str, subprotocol: str | None) -> tuple[str, bytes]:
    """A WebSocket upgrade request by hand on the ws port: the status line and the body."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{ioda_server.ws_port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    with socket.create_connection((ioda_server.mqtt_host, ioda_server.ws_port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        # A refusal is followed by the server closing the connection; an upgrade stays open.
        while chunk := sock.recv(4096):
            answer += chunk
            if answer.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in answer:
                break
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


def test_an_upgrade_elsewhere_than_mqtt_is_404_and_names_the_path(ioda_server):
    status, body = _upgrade(ioda_server, "/ws", "mqtt")
    assert status.startswith("HTTP/1.1 404"), status
    assert b"/mqtt" in body


def test_an_upgrade_offering_no_mqtt_subprotocol_is_400(ioda_server):
    status, body = _upgrade(ioda_server, "/mqtt", "stomp, wamp")
    assert status.startswith("HTTP/1.1 400"), status
    assert b"mqtt" in body
    status, _ = _upgrade(ioda_server, "/mqtt", "mqtt")
    assert status.startswith("HTTP/1.1 101"), "the listener still upgrades a good request"
