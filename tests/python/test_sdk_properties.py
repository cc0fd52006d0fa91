"""Property downlinks and the shadow's desired side, both signers, answered by a ``SimDevice``.

UpdateProperties -> properties/set, ListProperties -> properties/get,
UpdateDeviceShadowDesiredData -> properties/set of the desired/reported
difference, and the device-initiated shadow/get.
"""

from __future__ import annotations

import pytest
from huaweicloudsdkiotda.v5.model import (
    DevicePropertiesRequest,
    ListPropertiesRequest,
    UpdateDesired,
    UpdateDesireds,
    UpdateDeviceShadowDesiredDataRequest,
    UpdatePropertiesRequest,
)

from ioda_testlib import (
    PROPERTIES_GET,
    PROPERTIES_SET,
    PROPERTIES_SET_OK,
    assert_platform_time,
    create_product,
    expect_client_error,
    new_device,
    reported_properties,
    shadow_service,
    start_sim_device,
    wait_until,
)

SERVICE = "Temperature"  # temp: decimal -40..120 RW, mode: enum auto|manual RW, label/count: R


@pytest.fixture
def product(client):
    return create_product(client)


def _set_properties(client, device_id: str, properties: dict):
    return client.update_properties(UpdatePropertiesRequest(
        device_id=device_id,
        body=DevicePropertiesRequest(services=[{"service_id": SERVICE, "properties": properties}])))


def _set_desired(client, device_id: str, desired: dict, version: int | None = None):
    return client.update_device_shadow_desired_data(UpdateDeviceShadowDesiredDataRequest(
        device_id=device_id,
        body=UpdateDesireds(shadow=[UpdateDesired(service_id=SERVICE, desired=desired, version=version)])))


def _entry(resp, service_id: str = SERVICE):
    entries = [e for e in resp.shadow or [] if e.service_id == service_id]
    assert len(entries) == 1, f"expected one shadow entry for {service_id}: {resp.shadow}"
    return entries[0]


def _report_and_wait(client, dev, properties: dict) -> None:
    assert dev.report_properties([{"service_id": SERVICE, "properties": properties}]) == 0
    wait_until(lambda: reported_properties(client, dev.device_id, SERVICE) == properties, 5.0,
               what=f"reported {properties}")


def _set_payload(device_id: str, properties: dict) -> dict:
    return {"object_device_id": device_id, "services": [{"service_id": SERVICE, "properties": properties}]}


# ---------------------------------------------------------------------------
# UpdateProperties / ListProperties
# ---------------------------------------------------------------------------

def test_update_properties_round_trip(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)

    props = {"temp": 25.5, "mode": "manual"}
    resp = _set_properties(client, device_id, props)
    assert resp.request_id, "UpdateProperties returned no request_id"
    assert resp.response == PROPERTIES_SET_OK, "the SDK response carries the device's reply"

    (req,) = dev.received(PROPERTIES_SET)
    assert req.topic == f"$oc/devices/{device_id}/sys/properties/set/request_id={resp.request_id}"
    assert req.payload == _set_payload(device_id, props)
    assert not dev.errors


@pytest.mark.parametrize("properties", [
    {"label": "kitchen"},  # method "R": not writable
    {"temp": 500},         # above max 120
    {"mode": "turbo"},     # not in enum_list
], ids=["read-only", "out-of-range", "not-in-enum"])
def test_update_properties_invalid_is_400(client, product, sim_device_factory, properties):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    expect_client_error(lambda: _set_properties(client, device_id, properties),
                        status=400, error_code="IOTDA.000006")
    assert dev.received(PROPERTIES_SET) == [], "a rejected set must not reach the device"


def test_list_properties_round_trip(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    answer = {"services": [{"service_id": SERVICE, "properties": {"temp": 21.5, "mode": "auto"}}]}
    dev = start_sim_device(client, sim_device_factory, device_id, secret, get_reply=answer)

    resp = client.list_properties(ListPropertiesRequest(device_id=device_id, service_id=SERVICE))
    assert resp.request_id, "ListProperties returned no request_id"
    assert resp.response == answer

    (req,) = dev.received(PROPERTIES_GET)
    assert req.topic == f"$oc/devices/{device_id}/sys/properties/get/request_id={resp.request_id}"
    assert req.payload == {"object_device_id": device_id, "service_id": SERVICE}
    assert not dev.errors


# ---------------------------------------------------------------------------
# Shadow desired
# ---------------------------------------------------------------------------

def test_shadow_desired_pushes_only_the_difference(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    _report_and_wait(client, dev, {"temp": 20.5, "mode": "auto"})
    before = shadow_service(client, device_id, SERVICE).version

    desired = {"temp": 30.5, "mode": "auto"}
    entry = _entry(_set_desired(client, device_id, desired))
    assert entry.desired.properties == desired
    assert isinstance(entry.version, int) and entry.version > before

    (push,) = dev.wait_for(PROPERTIES_SET)
    assert push.request_id
    assert push.payload == _set_payload(device_id, {"temp": 30.5}), "only the differing property"

    # Once the device reports the desired values there is nothing left to push.
    _report_and_wait(client, dev, desired)
    dev.wait_quiet(PROPERTIES_SET, seen=1, quiet=0.5)
    assert not dev.errors


@pytest.mark.parametrize("desired", [{"label": "kitchen"}, {"nosuch": 1}],
                         ids=["read-only", "unknown-property"])
def test_shadow_desired_not_writable_is_400(client, product, desired):
    device_id, _ = new_device(client, product.product_id)
    expect_client_error(lambda: _set_desired(client, device_id, desired),
                        status=400, error_code="IOTDA.000006")


def test_shadow_desired_stale_version_is_409(client, product):
    device_id, _ = new_device(client, product.product_id)
    v1 = _entry(_set_desired(client, device_id, {"temp": 10})).version
    assert isinstance(v1, int)

    second = _entry(_set_desired(client, device_id, {"temp": 11}, version=v1))
    assert second.version > v1
    assert second.desired.properties == {"temp": 11}

    expect_client_error(lambda: _set_desired(client, device_id, {"temp": 12}, version=v1), status=409)
    assert shadow_service(client, device_id, SERVICE).desired.properties == {"temp": 11}


# ---------------------------------------------------------------------------
# Device-side shadow/get (device protocol; set-up with the admin client only)
# ---------------------------------------------------------------------------

def test_device_shadow_get(admin_client, sim_device_factory):
    product = create_product(admin_client)
    device_id, secret = new_device(admin_client, product.product_id)
    dev = start_sim_device(admin_client, sim_device_factory, device_id, secret)
    _report_and_wait(admin_client, dev, {"temp": 20.5})
    _set_desired(admin_client, device_id, {"mode": "manual"})
    version = shadow_service(admin_client, device_id, SERVICE).version

    for body in ({"service_id": SERVICE}, {}):
        request_id = f"dev-{len(dev.received())}-req"
        resp = dev.shadow_get(body, request_id=request_id)
        assert resp["object_device_id"] == device_id
        entries = [e for e in resp["shadow"] if e["service_id"] == SERVICE]
        assert len(entries) == 1, f"{body}: {resp}"
        (entry,) = entries
        assert entry["desired"]["properties"] == {"mode": "manual"}
        assert_platform_time(entry["desired"].get("event_time"), "desired.event_time")
        assert entry["reported"]["properties"] == {"temp": 20.5}
        assert entry["version"] == version
