"""Device status and shadow: a paho device reports properties, the SDK reads them back (both signers)."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from ioda_testlib import (
    CONNACK_ACCEPTED,
    add_device,
    create_product,
    reported_properties,
    shadow_service,
    wait_for_status,
    wait_until,
)


def _wait_reported(client, device_id: str, expected: dict, timeout: float = 5.0) -> dict:
    """Poll ShowDeviceShadow until Temperature.reported.properties == expected."""
    seen: list[dict] = []

    def check() -> bool:
        seen.append(reported_properties(client, device_id, "Temperature"))
        return seen[-1] == expected

    wait_until(check, timeout, what=lambda: f"reported {expected} (last seen: {seen[-1:]})")
    return seen[-1]


def test_online_report_shadow_offline(client, device_factory):
    product = create_product(client)
    created = add_device(client, product.product_id)
    device_id = created.device_id

    dev = device_factory(device_id, created.auth_info.secret)
    assert dev.connect() == CONNACK_ACCEPTED
    wait_for_status(client, device_id, "ONLINE")

    first = {"temp": 21.5, "mode": "auto"}
    assert dev.report_properties([{"service_id": "Temperature", "properties": first}]) == 0
    _wait_reported(client, device_id, first)
    entry = shadow_service(client, device_id, "Temperature")
    assert entry.reported.properties == first  # exactly these keys and values
    assert isinstance(entry.version, int) and entry.version >= 1
    first_version = entry.version

    # temp=500 violates max=120 and is dropped; count=7 is valid and applied.
    assert dev.report_properties([{"service_id": "Temperature",
                                   "properties": {"temp": 500, "count": 7}}]) == 0
    expected = {"temp": 21.5, "mode": "auto", "count": 7}
    _wait_reported(client, device_id, expected)
    entry = shadow_service(client, device_id, "Temperature")
    assert entry.reported.properties == expected
    assert entry.version >= first_version

    dev.close()
    wait_for_status(client, device_id, "OFFLINE")
    # The shadow outlives the connection.
    assert reported_properties(client, device_id, "Temperature") == expected


def test_mqtt5_device_reports_properties(client, device_factory):
    product = create_product(client)
    created = add_device(client, product.product_id)
    device_id = created.device_id

    dev = device_factory(device_id, created.auth_info.secret, protocol=mqtt.MQTTv5)
    assert dev.connect() == 0x00
    wait_for_status(client, device_id, "ONLINE")

    props = {"temp": -3.25, "mode": "manual", "label": "kitchen"}
    assert dev.report_properties([{"service_id": "Temperature", "properties": props}]) == 0x00
    _wait_reported(client, device_id, props)

    dev.close()
    wait_for_status(client, device_id, "OFFLINE")
