"""paho-mqtt device helper for the ioda end-to-end suite (IoTDA secret authentication)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

# MQTT 3.1.1 CONNACK return codes (IoTDA meaning, see device protocol 1.7).
CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

# paho 2.x (CallbackAPIVersion.VERSION2) hands v3.1.1 CONNACK codes to
# on_connect converted to MQTT5 ReasonCodes (_packet.convert_connack_rc_to_reason_code);
# map them back to the raw 3.1.1 return code.  Anything else (e.g. a raw code
# > 5, converted to 0x80 "Unspecified error") is returned as the 5.0 value.
_V5_TO_V311_CONNACK = {0x00: 0, 0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}

SUBACK_FAILURE = 0x80
PUBACK_NOT_AUTHORIZED = 0x87


def utc_hour_timestamp() -> str:
    """The 10-digit ``YYYYMMDDHH`` UTC timestamp used in client id and password."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H")


def iotda_password(secret: str, ts: str) -> str:
    """IoTDA MQTT password: lowercase hex HMAC-SHA256, key = timestamp, message = secret."""
    return hmac.new(ts.encode("utf-8"), secret.encode("utf-8"), hashlib.sha256).hexdigest()


def report_topic(device_id: str) -> str:
    return f"$oc/devices/{device_id}/sys/properties/report"


class Device:
    """A directly connected IoTDA device on paho-mqtt (secret authentication).

    ``connect()`` returns the CONNACK code: the raw return code (0..5) for
    MQTT 3.1.1, the reason code value for MQTT 5, or None if the server closed
    the connection without a CONNACK.
    """

    def __init__(self, host: str, port: int, device_id: str, secret: str, *,
                 protocol: int = mqtt.MQTTv311, keepalive: int = 60,
                 ts: str | None = None, password: str | None = None, client_id: str | None = None):
        self.host, self.port = host, port
        self.device_id = device_id
        self.protocol = protocol
        self.keepalive = keepalive
        ts = ts or utc_hour_timestamp()
        self.client_id = client_id or f"{device_id}_0_0_{ts}"
        self.password = password if password is not None else iotda_password(secret, ts)

        self._cond = threading.Condition()
        self._connack: int | None = None
        self._connack_received = False
        self._disconnected = False
        self._pubacks: dict[int, int] = {}
        self._subacks: dict[int, list[int]] = {}
        self.messages: list[mqtt.MQTTMessage] = []

        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True if protocol != mqtt.MQTTv5 else None,
            protocol=protocol,
            reconnect_on_failure=False,  # a refused CONNACK must not trigger reconnect loops
        )
        self.client.username_pw_set(device_id, self.password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._loop_started = False

    # -- paho callbacks (network thread) --
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        value = reason_code.value
        if self.protocol != mqtt.MQTTv5:
            value = _V5_TO_V311_CONNACK.get(value, value)
        with self._cond:
            self._connack = value
            self._connack_received = True
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            self._disconnected = True
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            self._pubacks[mid] = reason_code.value
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        with self._cond:
            self._subacks[mid] = [rc.value for rc in reason_code_list]
            self._cond.notify_all()

    def _on_message(self, client, userdata, message):
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    # -- API --
    def connect(self, timeout: float = 5.0) -> int | None:
        self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        self._loop_started = True
        with self._cond:
            self._cond.wait_for(lambda: self._connack_received or self._disconnected, timeout)
            if not self._connack_received and not self._disconnected:
                raise AssertionError(f"no CONNACK within {timeout}s for {self.client_id}")
            return self._connack

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def wait_disconnected(self, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._disconnected, timeout)

    def publish(self, topic: str, payload: Any, qos: int = 1, timeout: float = 5.0) -> int:
        """Publish and, for QoS 1, wait for the PUBACK; returns its reason code (0 for 3.1.1)."""
        if not isinstance(payload, (bytes, str)):
            payload = json.dumps(payload)
        info = self.client.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed locally: {mqtt.error_string(info.rc)}"
        with self._cond:
            ok = self._cond.wait_for(lambda: info.mid in self._pubacks or self._disconnected, timeout)
            assert ok and info.mid in self._pubacks, (
                f"no PUBACK for {topic} within {timeout}s (disconnected={self._disconnected})")
            return self._pubacks.pop(info.mid)

    def report_properties(self, services: list[dict], timeout: float = 5.0) -> int:
        """QoS 1 property report on the device's own topic; returns the PUBACK reason code."""
        return self.publish(report_topic(self.device_id), {"services": services}, qos=1, timeout=timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns its granted-QoS / reason codes."""
        rc, mid = self.client.subscribe(topic, qos=qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {mqtt.error_string(rc)}"
        with self._cond:
            ok = self._cond.wait_for(lambda: mid in self._subacks or self._disconnected, timeout)
            assert ok and mid in self._subacks, (
                f"no SUBACK for {topic} within {timeout}s (disconnected={self._disconnected})")
            return self._subacks.pop(mid)

    def close(self) -> None:
        try:
            if self.client.is_connected():
                self.client.disconnect()
        finally:
            if self._loop_started:
                self.client.loop_stop()
                self._loop_started = False

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
