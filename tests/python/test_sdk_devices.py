"""Devices (/v5/iot/{project_id}/devices) through the official SDK, both signers.

Where a management operation changes what a device may do (secret reset,
freeze) the effect is checked with a real MQTT login.
"""

from __future__ import annotations

import pytest
from huaweicloudsdkiotda.v5.model import (
    DeleteDeviceRequest,
    FreezeDeviceRequest,
    ListDevicesRequest,
    ResetDeviceSecret,
    ResetDeviceSecretRequest,
    ShowDeviceRequest,
    UnfreezeDeviceRequest,
    UpdateDevice,
    UpdateDeviceRequest,
)

from ioda_testlib import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_NOT_AUTHORIZED,
    add_device,
    create_product,
    expect_client_error,
    list_all_devices,
    uniq,
)


@pytest.fixture
def product(client):
    return create_product(client)


def test_add_device_generates_secret_and_defaults(client, product, device_factory):
    node_id = uniq("node")
    name = uniq("dev")
    created = add_device(client, product.product_id, node_id=node_id, device_name=name)

    assert created.device_id == f"{product.product_id}_{node_id}"
    assert created.node_id == node_id
    assert created.device_name == name
    assert created.product_id == product.product_id
    assert created.status == "INACTIVE"
    assert created.auth_info is not None
    secret = created.auth_info.secret
    assert isinstance(secret, str) and secret, "a secret must be generated when none is given"

    shown = client.show_device(ShowDeviceRequest(device_id=created.device_id))
    assert shown.device_id == created.device_id
    assert shown.node_id == node_id
    assert shown.device_name == name
    assert shown.product_id == product.product_id
    assert shown.status == "INACTIVE"
    assert shown.auth_info is not None and shown.auth_info.secret == secret

    # The generated secret really is the device's MQTT credential.
    with device_factory(created.device_id, secret) as dev:
        assert dev.connect() == CONNACK_ACCEPTED


def test_add_device_with_explicit_secret_and_device_id(client, product):
    device_id = uniq("explicit")
    created = add_device(client, product.product_id, secret="explicitSecret_01", device_id=device_id)
    assert created.device_id == device_id
    assert created.auth_info.secret == "explicitSecret_01"
    assert created.status == "INACTIVE"

    shown = client.show_device(ShowDeviceRequest(device_id=device_id))
    assert shown.device_id == device_id
    assert shown.product_id == product.product_id


def test_list_devices_product_filter_and_pagination(client, product):
    created = [add_device(client, product.product_id).device_id for _ in range(3)]
    other_product = create_product(client)
    add_device(client, other_product.product_id)

    everything = list_all_devices(client, product.product_id)
    assert [d.device_id for d in everything] == created[::-1], "filtered list, newest first"
    assert all(d.product_id == product.product_id for d in everything)

    page1 = client.list_devices(ListDevicesRequest(product_id=product.product_id, limit=2))
    assert [d.device_id for d in page1.devices] == created[:0:-1]
    assert page1.page.count == 3, "page.count is the total number of matches"
    assert page1.page.marker

    page2 = client.list_devices(ListDevicesRequest(product_id=product.product_id, limit=2,
                                                   marker=page1.page.marker))
    assert [d.device_id for d in page2.devices] == created[:1]
    assert page2.page.count == 3


def test_update_device_name_and_description(client, product):
    device_id = add_device(client, product.product_id).device_id
    new_name = uniq("renamed")

    updated = client.update_device(UpdateDeviceRequest(
        device_id=device_id, body=UpdateDevice(device_name=new_name, description="updated by e2e")))
    assert updated.device_id == device_id
    assert updated.device_name == new_name
    assert updated.description == "updated by e2e"

    shown = client.show_device(ShowDeviceRequest(device_id=device_id))
    assert shown.device_name == new_name
    assert shown.description == "updated by e2e"
    assert shown.product_id == product.product_id


def test_reset_device_secret_changes_mqtt_credentials(client, product, device_factory):
    created = add_device(client, product.product_id, secret="oldsecret123")
    device_id = created.device_id

    resp = client.reset_device_secret(ResetDeviceSecretRequest(
        device_id=device_id, action_id="resetSecret", body=ResetDeviceSecret(secret="newsecret123")))
    assert resp.secret == "newsecret123"
    assert resp.device_id in (None, device_id)

    with device_factory(device_id, "oldsecret123") as old:
        assert old.connect() == CONNACK_BAD_CREDENTIALS
    with device_factory(device_id, "newsecret123") as new:
        assert new.connect() == CONNACK_ACCEPTED


def test_freeze_and_unfreeze_device(client, product, device_factory):
    created = add_device(client, product.product_id)
    device_id, secret = created.device_id, created.auth_info.secret

    client.freeze_device(FreezeDeviceRequest(device_id=device_id))
    assert client.show_device(ShowDeviceRequest(device_id=device_id)).status == "FROZEN"
    with device_factory(device_id, secret) as dev:
        assert dev.connect() == CONNACK_NOT_AUTHORIZED

    client.unfreeze_device(UnfreezeDeviceRequest(device_id=device_id))
    assert client.show_device(ShowDeviceRequest(device_id=device_id)).status != "FROZEN"
    with device_factory(device_id, secret) as dev:
        assert dev.connect() == CONNACK_ACCEPTED


def test_delete_device_then_show_is_404(client, product):
    device_id = add_device(client, product.product_id).device_id
    client.delete_device(DeleteDeviceRequest(device_id=device_id))

    expect_client_error(lambda: client.show_device(ShowDeviceRequest(device_id=device_id)),
                        status=404, error_code="IOTDA.014000")
    assert device_id not in [d.device_id for d in list_all_devices(client, product.product_id)]


def test_show_unknown_device_is_404(client):
    expect_client_error(lambda: client.show_device(ShowDeviceRequest(device_id=uniq("nosuchdevice"))),
                        status=404, error_code="IOTDA.014000")


def test_add_device_with_unknown_product_is_rejected(client):
    expect_client_error(lambda: add_device(client, "0123456789abcdef01234567"))


def test_add_device_with_duplicate_node_id_is_409(client, product):
    node_id = uniq("node")
    add_device(client, product.product_id, node_id=node_id)
    expect_client_error(lambda: add_device(client, product.product_id, node_id=node_id), status=409)
