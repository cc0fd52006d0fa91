"""Downlink messages through the SDK (both signers), received by a ``SimDevice``.

CreateMessage delivers on ``$oc/devices/{id}/sys/messages/down`` (or a
custom ``$oc/devices/{id}/user/...`` topic), caches up to 20 messages while
the device is offline and delivers them, in order, when it connects.
"""

from __future__ import annotations

import pytest
from huaweicloudsdkiotda.v5.model import (
    CreateMessageRequest,
    DeviceMessageRequest,
    ListDeviceMessagesRequest,
    ShowDeviceMessageRequest,
)

from ioda_testlib import (
    MESSAGE,
    USER,
    create_product,
    expect_client_error,
    new_device,
    start_sim_device,
    uniq,
    user_topic,
    wait_until,
)

MAX_PENDING = 20  # cached messages per offline device


@pytest.fixture
def product(client):
    return create_product(client)


def _send(client, device_id: str, message, **kwargs):
    return client.create_message(CreateMessageRequest(
        device_id=device_id, body=DeviceMessageRequest(message=message, **kwargs)))


def _show(client, device_id: str, message_id: str):
    return client.show_device_message(ShowDeviceMessageRequest(device_id=device_id, message_id=message_id))


def _wait_delivered(client, device_id: str, message_id: str, timeout: float = 5.0):
    seen: list = []

    def check():
        seen.append(_show(client, device_id, message_id))
        return seen[-1].status == "DELIVERED"

    wait_until(check, timeout, what=lambda: f"message {message_id} DELIVERED "
                                            f"(last seen: {seen[-1].status if seen else None})")
    shown = seen[-1]
    assert shown.message_id == message_id
    assert shown.finished_time, "a delivered message has finished_time"
    return shown


def _statuses(client, device_id: str) -> dict[str, str]:
    resp = client.list_device_messages(ListDeviceMessagesRequest(device_id=device_id))
    assert resp.device_id == device_id
    return {m.message_id: m.status for m in resp.messages or []}


def test_message_standard_format_to_online_device(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)

    message_id = uniq("msg")
    content = {"text": "hello", "level": 3}
    resp = _send(client, device_id, content, message_id=message_id, name="greeting")
    assert resp.message_id == message_id
    assert resp.result is not None and resp.result.status in ("DELIVERED", "PENDING"), resp

    (down,) = dev.wait_for(MESSAGE)
    assert down.topic == f"$oc/devices/{device_id}/sys/messages/down"
    assert down.payload == {"object_device_id": device_id, "name": "greeting", "id": message_id,
                            "content": content}

    _wait_delivered(client, device_id, message_id)
    assert _statuses(client, device_id) == {message_id: "DELIVERED"}


def test_message_without_id_gets_one(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)

    resp = _send(client, device_id, "plain text", name="note")
    assert resp.message_id, "the platform generates a message_id when none is given"
    (down,) = dev.wait_for(MESSAGE)
    assert down.payload == {"object_device_id": device_id, "name": "note", "id": resp.message_id,
                            "content": "plain text"}
    _wait_delivered(client, device_id, resp.message_id)


def test_message_raw_format_is_sent_as_is(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)

    text = "héllo ✓ raw"
    resp = _send(client, device_id, text, payload_format="raw")
    (down,) = dev.wait_for(MESSAGE)
    assert down.raw == text.encode("utf-8")
    _wait_delivered(client, device_id, resp.message_id)


def test_message_to_custom_topic(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret, user_topics=["inbox"])

    resp = _send(client, device_id, "to the inbox", topic="inbox", payload_format="raw")
    (down,) = dev.wait_for(USER)
    assert down.topic == user_topic(device_id, "inbox")
    assert down.raw == b"to the inbox"
    assert dev.received(MESSAGE) == [], "a custom-topic message must not also go to messages/down"
    _wait_delivered(client, device_id, resp.message_id)

    # A topic the device has not subscribed to is refused.
    expect_client_error(lambda: _send(client, device_id, "nobody listens", topic="elsewhere"),
                        status=400, error_code="IOTDA.014112")


def test_messages_cached_while_offline_are_delivered_in_order(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)

    ids = []
    for i in range(3):
        resp = _send(client, device_id, f"cached {i}", message_id=uniq(f"m{i}"), name="queued")
        assert resp.result.status == "PENDING", resp
        ids.append(resp.message_id)
    assert _show(client, device_id, ids[0]).status == "PENDING"
    assert _statuses(client, device_id) == {i: "PENDING" for i in ids}

    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    downs = dev.wait_for(MESSAGE, count=3)
    assert [d.payload["id"] for d in downs] == ids, "cached messages arrive in creation order"
    assert [d.payload["content"] for d in downs] == ["cached 0", "cached 1", "cached 2"]

    for message_id in ids:
        _wait_delivered(client, device_id, message_id)
    assert _statuses(client, device_id) == {i: "DELIVERED" for i in ids}


def test_pending_message_overflow_fails_the_oldest(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)

    ids = []
    for i in range(MAX_PENDING + 1):
        resp = _send(client, device_id, f"n{i}", message_id=uniq(f"o{i}"))
        assert resp.result.status == "PENDING", f"message {i}: {resp}"
        ids.append(resp.message_id)

    oldest = _show(client, device_id, ids[0])
    assert oldest.status == "FAILED"
    assert oldest.error_info is not None and oldest.error_info.error_code, oldest
    assert _show(client, device_id, ids[1]).status == "PENDING"
    assert _show(client, device_id, ids[-1]).status == "PENDING"

    # Only the 20 still pending are delivered, oldest first.
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    downs = dev.wait_for(MESSAGE, count=MAX_PENDING)
    assert [d.payload["id"] for d in downs[:MAX_PENDING]] == ids[1:]
