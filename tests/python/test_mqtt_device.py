"""Device-side (MQTT) negatives with paho-mqtt; set-up through the SDK."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from ioda_testlib import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_IDENTIFIER_REJECTED,
    PUBACK_NOT_AUTHORIZED,
    SUBACK_FAILURE,
    add_device,
    create_product,
    reported_properties,
    report_topic,
    uniq,
    wait_until,
)


@pytest.fixture
def devices(admin_client):
    """Two devices of a fresh product: [(device_id, secret), (device_id, secret)]."""
    product = create_product(admin_client)
    out = []
    for _ in range(2):
        created = add_device(admin_client, product.product_id)
        out.append((created.device_id, created.auth_info.secret))
    return out


def test_wrong_password_is_connack_4(devices, device_factory):
    device_id, secret = devices[0]
    with device_factory(device_id, secret + "wrong") as dev:
        assert dev.connect() == CONNACK_BAD_CREDENTIALS
        assert dev.wait_disconnected(), "server must close the connection after a refused CONNACK"
    # Sanity: the right secret works.
    with device_factory(device_id, secret) as dev:
        assert dev.connect() == CONNACK_ACCEPTED


def test_unknown_device_is_connack_4(device_factory):
    with device_factory(uniq("ghost"), "doesnotmatter1") as dev:
        assert dev.connect() == CONNACK_BAD_CREDENTIALS


def test_keepalive_out_of_range_is_connack_2(devices, device_factory):
    device_id, secret = devices[0]
    with device_factory(device_id, secret, keepalive=10) as dev:
        assert dev.connect() == CONNACK_IDENTIFIER_REJECTED


def test_subscribe_to_other_devices_topic_is_refused(devices, device_factory):
    (device_id, secret), (other_id, _) = devices
    with device_factory(device_id, secret) as dev:
        assert dev.connect() == CONNACK_ACCEPTED
        (own,) = dev.subscribe(f"$oc/devices/{device_id}/sys/commands/#", qos=1)
        assert own in (0, 1), f"own command topic must be granted, got {own:#x}"
        (foreign,) = dev.subscribe(f"$oc/devices/{other_id}/sys/commands/#", qos=1)
        assert foreign == SUBACK_FAILURE


def test_mqtt5_publish_to_other_devices_topic_is_not_authorized(admin_client, devices, device_factory):
    (device_id, secret), (other_id, _) = devices
    with device_factory(device_id, secret, protocol=mqtt.MQTTv5) as dev:
        assert dev.connect() == 0x00
        foreign = [{"service_id": "Temperature", "properties": {"temp": 99.5}}]
        assert dev.publish(report_topic(other_id), {"services": foreign}, qos=1) == PUBACK_NOT_AUTHORIZED

        # The connection stays usable and its own reports are accepted.
        own = {"temp": 12.5}
        assert dev.report_properties([{"service_id": "Temperature", "properties": own}]) == 0x00
        wait_until(lambda: reported_properties(admin_client, device_id, "Temperature") == own, 5.0,
                   what="own report applied to the shadow")

    # The refused report must not have reached the other device's shadow.
    assert "temp" not in reported_properties(admin_client, other_id, "Temperature")
