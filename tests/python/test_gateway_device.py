"""A gateway the way Huawei's device SDK drives one (paho, with the SDK's exact JSON: `event_id`
null, ISO event times, a batch report per child list), its children registered, commanded and
listed through the unchanged official application SDK."""

from __future__ import annotations

import json

from huaweicloudsdkiotda.v5.model import (
    AddDevice,
    AddDeviceRequest,
    CreateCommandRequest,
    DeviceCommandRequest,
    ListDevicesRequest,
)

from ioda_mqtt import COMMAND, SimDevice
from ioda_testlib import (
    CONNACK_ACCEPTED,
    create_product,
    device_status,
    new_device,
    reported_properties,
    uniq,
    wait_for_status,
    wait_until,
)


def _sdk_event(service_id: str, event_type: str, paras: dict) -> str:
    """An `events/up` body as the SDK's `DeviceEvents.to_dict` writes it."""
    event = {"service_id": service_id, "event_type": event_type, "event_time": "2026-11-28T09:24:19Z",
             "event_id": None, "paras": paras}
    return json.dumps({"object_device_id": None, "services": [event]})


def _answer_for_child(downlink):
    """What a gateway relays back from its child: the child's id goes with the answer."""
    return {"result_code": 0, "paras": {"answered_for": downlink.payload["object_device_id"]}}


def test_a_gateway_reports_sets_status_and_relays_commands_for_its_child(admin_client, ioda_server):
    product = create_product(admin_client)
    gateway_id, secret = new_device(admin_client, product.product_id)
    child = admin_client.add_device(AddDeviceRequest(body=AddDevice(
        node_id=uniq("child"), product_id=product.product_id, gateway_id=gateway_id)))
    assert child.gateway_id == gateway_id
    assert child.node_type == "ENDPOINT"

    gateway = SimDevice(ioda_server.mqtt_host, ioda_server.mqtt_port, gateway_id, secret,
                        command_reply=_answer_for_child)
    assert gateway.connect() == CONNACK_ACCEPTED
    try:
        up = f"$oc/devices/{gateway_id}"
        batch = {"devices": [{"device_id": child.device_id, "services": [
            {"service_id": "Temperature", "properties": {"temp": 18.5}, "event_time": "2026-11-28T09:24:19Z"}]}]}
        assert gateway.publish(f"{up}/sys/gateway/sub_devices/properties/report", json.dumps(batch)) == 0
        wait_until(lambda: reported_properties(admin_client, child.device_id, "Temperature") == {"temp": 18.5},
                   5.0, what="the child's shadow")

        statuses = {"device_statuses": [{"device_id": child.device_id, "status": "ONLINE"}]}
        assert gateway.publish(f"{up}/sys/events/up",
                               _sdk_event("$sub_device_manager", "sub_device_update_status", statuses)) == 0
        wait_for_status(admin_client, child.device_id, "ONLINE")
        listed = admin_client.list_devices(ListDevicesRequest(gateway_id=gateway_id)).devices
        children = [d for d in listed if d.device_id != gateway_id]
        assert [(d.device_id, d.status) for d in children] == [(child.device_id, "ONLINE")]

        answer = admin_client.create_command(CreateCommandRequest(
            device_id=child.device_id,
            body=DeviceCommandRequest(service_id="Temperature", command_name="SET_MODE", paras={"mode": "auto"})))
        assert answer.response == {"result_code": 0, "paras": {"answered_for": child.device_id}}
        (command,) = gateway.received(COMMAND)
        assert command.topic.startswith(f"{up}/sys/commands/request_id=")
        assert not gateway.errors
    finally:
        gateway.close()
    wait_for_status(admin_client, gateway_id, "OFFLINE")
    # The child's status is its gateway's to say (IoTDA's rule), so it stays.
    assert device_status(admin_client, child.device_id) == "ONLINE"
