"""paho-mqtt device helper for the ioda end-to-end suite (IoTDA secret authentication)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import ssl
import threading
import time
import uuid
from typing import Any, Callable, Union

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


def downlink_filters(device_id: str) -> list[str]:
    """The system downlink filters a device SDK subscribes to after CONNACK (protocol 2.1/2.2)."""
    base = f"$oc/devices/{device_id}/sys"
    return [f"{base}/commands/#", f"{base}/properties/set/#", f"{base}/properties/get/#",
            f"{base}/messages/down", f"{base}/shadow/get/response/#"]


def user_topic(device_id: str, suffix: str) -> str:
    """A custom downlink topic ``$oc/devices/{device_id}/user/{suffix}``."""
    return f"$oc/devices/{device_id}/user/{suffix}"


class Device:
    """A directly connected IoTDA device on paho-mqtt (secret authentication).

    ``connect()`` returns the CONNACK code: the raw return code (0..5) for
    MQTT 3.1.1, the reason code value for MQTT 5, or None if the server closed
    the connection without a CONNACK.
    """

    def __init__(self, host: str, port: int, device_id: str, secret: str, *,
                 protocol: int = mqtt.MQTTv311, keepalive: int = 60,
                 ts: str | None = None, password: str | None = None, client_id: str | None = None,
                 tls_ca: str | None = None, websocket_path: str | None = None):
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
            transport="websockets" if websocket_path is not None else "tcp",
        )
        if websocket_path is not None:
            # paho offers the subprotocol "mqtt" (or "mqttv3.1") itself.
            self.client.ws_set_options(path=websocket_path)
        self.client.username_pw_set(device_id, self.password)
        if tls_ca is not None:
            # As Huawei's Python device SDK sets up MQTTS (port 8883): the CA file it is given,
            # TLS 1.2, and no host name check.
            self.client.tls_set(ca_certs=tls_ca, tls_version=ssl.PROTOCOL_TLSv1_2)
            self.client.tls_insecure_set(True)
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


# ---------------------------------------------------------------------------
# Simulated device: subscribes to its downlinks and answers them
# ---------------------------------------------------------------------------

#: Default reply of a SimDevice to a command (protocol 2.11).
COMMAND_OK = {"result_code": 0, "response_name": "COMMAND_RESPONSE", "paras": {"result": "ok"}}
#: Default reply of a SimDevice to properties/set (protocol 2.8).
PROPERTIES_SET_OK = {"result_code": 0, "result_desc": "success"}

# Downlink kinds (``Downlink.kind``), from the topic after ``$oc/devices/{id}/``.
COMMAND = "command"                # sys/commands/request_id={id}
PROPERTIES_SET = "properties_set"  # sys/properties/set/request_id={id}
PROPERTIES_GET = "properties_get"  # sys/properties/get/request_id={id}
MESSAGE = "message"                # sys/messages/down
SHADOW = "shadow"                  # sys/shadow/get/response/request_id={id}
USER = "user"                      # user/{suffix}
OTHER = "other"

_REQUEST_KINDS = (
    ("sys/commands/request_id=", COMMAND, "sys/commands/response/request_id="),
    ("sys/properties/set/request_id=", PROPERTIES_SET, "sys/properties/set/response/request_id="),
    ("sys/properties/get/request_id=", PROPERTIES_GET, "sys/properties/get/response/request_id="),
    ("sys/shadow/get/response/request_id=", SHADOW, None),
)

#: A reply: a fixed JSON object, None (do not answer) or ``f(downlink) -> object | None``.
Reply = Union[dict, None, Callable[["Downlink"], Any]]


@dataclasses.dataclass(frozen=True)
class Downlink:
    """One PUBLISH received by a SimDevice."""
    kind: str
    topic: str
    request_id: str | None  # everything after ``request_id=`` in the topic
    raw: bytes
    qos: int
    payload: Any  # parsed JSON, or None if ``raw`` is not JSON


def classify_downlink(device_id: str, topic: str) -> tuple[str, str | None, str | None]:
    """``(kind, request_id, response topic or None)`` of a platform -> device topic."""
    prefix = f"$oc/devices/{device_id}/"
    if not topic.startswith(prefix):
        return OTHER, None, None
    rest = topic[len(prefix):]
    for start, kind, response in _REQUEST_KINDS:
        if rest.startswith(start):
            request_id = rest[len(start):]
            return kind, request_id, (prefix + response + request_id) if response else None
    if rest == "sys/messages/down":
        return MESSAGE, None, None
    if rest.startswith("user/"):
        return USER, None, None
    return OTHER, None, None


class SimDevice(Device):
    """A ``Device`` that behaves like an IoTDA device SDK.

    In the CONNACK callback it subscribes (QoS 1, one SUBSCRIBE) to
    ``downlink_filters`` plus ``$oc/devices/{id}/user/{t}`` for every
    ``user_topics`` entry; ``connect()`` returns only once that SUBACK is in.
    Every PUBLISH received is recorded as a ``Downlink``; commands,
    properties/set and properties/get are answered from the paho network
    thread with ``command_reply`` / ``set_reply`` / ``get_reply`` (see
    ``Reply``; assignable at any time).  ``get_reply`` defaults to None:
    properties/get is not answered unless a test says what to answer.
    """

    def __init__(self, host: str, port: int, device_id: str, secret: str, *,
                 user_topics: tuple[str, ...] | list[str] = (),
                 command_reply: Reply = COMMAND_OK, set_reply: Reply = PROPERTIES_SET_OK,
                 get_reply: Reply = None, **kwargs):
        super().__init__(host, port, device_id, secret, **kwargs)
        self.filters = downlink_filters(device_id) + [user_topic(device_id, t) for t in user_topics]
        self.command_reply = command_reply
        self.set_reply = set_reply
        self.get_reply = get_reply
        self.downlinks: list[Downlink] = []
        self.answers: list[tuple[str, Any]] = []  # (topic, payload) published by the auto-answerer
        self.errors: list[str] = []               # exceptions raised while answering
        self._sub_mid: int | None = None

    # -- paho callbacks (network thread) --
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.value == 0:
            rc, mid = client.subscribe([(f, 1) for f in self.filters])
            if rc == mqtt.MQTT_ERR_SUCCESS:
                self._sub_mid = mid
            else:
                self.errors.append(f"subscribe failed locally: {mqtt.error_string(rc)}")
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_message(self, client, userdata, message):
        kind, request_id, response_topic = classify_downlink(self.device_id, message.topic)
        raw = bytes(message.payload)
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        downlink = Downlink(kind, message.topic, request_id, raw, message.qos, payload)
        with self._cond:
            self.downlinks.append(downlink)
        super()._on_message(client, userdata, message)  # records message, notifies waiters
        reply = {COMMAND: self.command_reply, PROPERTIES_SET: self.set_reply,
                 PROPERTIES_GET: self.get_reply}.get(kind)
        if response_topic is None or reply is None:
            return
        try:
            answer = reply(downlink) if callable(reply) else reply
            if answer is None:
                return
            info = client.publish(response_topic, json.dumps(answer), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish failed locally: {mqtt.error_string(info.rc)}")
            with self._cond:
                self.answers.append((response_topic, answer))
                self._cond.notify_all()
        except Exception as e:  # never let an exception kill paho's network thread
            with self._cond:
                self.errors.append(f"answering {message.topic}: {e!r}")
                self._cond.notify_all()

    # -- API --
    def connect(self, timeout: float = 5.0) -> int | None:
        """CONNECT, then wait for the SUBACK of the downlink subscriptions (all must be granted)."""
        rc = super().connect(timeout)
        if rc != 0:
            return rc
        with self._cond:
            ok = self._cond.wait_for(
                lambda: (self._sub_mid is not None and self._sub_mid in self._subacks)
                or self._disconnected or self.errors, timeout)
            assert ok and not self.errors and self._sub_mid in self._subacks, (
                f"no SUBACK for the downlink subscriptions of {self.device_id} within {timeout}s "
                f"(disconnected={self._disconnected}, errors={self.errors})")
            granted = self._subacks.pop(self._sub_mid)
        refused = [f for f, code in zip(self.filters, granted) if code >= 0x80]
        assert not refused, f"subscriptions refused for {self.device_id}: {refused} (codes {granted})"
        return rc

    def received(self, kind: str | None = None) -> list[Downlink]:
        """Snapshot of the downlinks received so far (of ``kind`` if given), in arrival order."""
        with self._cond:
            return [d for d in self.downlinks if kind is None or d.kind == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 5.0) -> list[Downlink]:
        """Wait until at least ``count`` downlinks of ``kind`` arrived; returns all of them so far."""
        def enough() -> bool:
            return sum(1 for d in self.downlinks if d.kind == kind) >= count

        with self._cond:
            if not self._cond.wait_for(enough, timeout):
                raise AssertionError(
                    f"{self.device_id}: expected {count} {kind} downlink(s) within {timeout}s, got "
                    f"{[(d.topic, d.raw) for d in self.downlinks]} (answer errors: {self.errors})")
            return [d for d in self.downlinks if d.kind == kind]

    def wait_request(self, kind: str, request_id: str, timeout: float = 5.0) -> Downlink:
        """The downlink of ``kind`` whose topic carries ``request_id``."""
        def find() -> Downlink | None:
            return next((d for d in self.downlinks if d.kind == kind and d.request_id == request_id),
                        None)

        with self._cond:
            if not self._cond.wait_for(lambda: find() is not None, timeout):
                raise AssertionError(
                    f"{self.device_id}: no {kind} downlink with request_id={request_id} within "
                    f"{timeout}s; got {[d.topic for d in self.downlinks]}")
            return find()

    def wait_quiet(self, kind: str, seen: int, quiet: float = 0.3) -> list[Downlink]:
        """Fail if more than ``seen`` downlinks of ``kind`` arrive within ``quiet`` seconds."""
        deadline = time.monotonic() + quiet
        with self._cond:
            while True:
                got = [d for d in self.downlinks if d.kind == kind]
                assert len(got) <= seen, f"{self.device_id}: unexpected {kind} downlink(s): {got[seen:]}"
                left = deadline - time.monotonic()
                if left <= 0:
                    return got
                self._cond.wait(left)

    def shadow_get(self, body: dict, request_id: str | None = None, timeout: float = 5.0) -> Any:
        """Device-initiated shadow/get (protocol 2.10); returns the parsed response payload."""
        request_id = request_id or uuid.uuid4().hex
        topic = f"$oc/devices/{self.device_id}/sys/shadow/get/request_id={request_id}"
        assert self.publish(topic, body, qos=1, timeout=timeout) == 0, f"PUBACK refused for {topic}"
        return self.wait_request(SHADOW, request_id, timeout).payload
