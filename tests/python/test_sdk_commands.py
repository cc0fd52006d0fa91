"""Commands through the SDK (both signers), answered by a simulated MQTT device (``SimDevice``).

CreateCommand is synchronous: the platform publishes on
``$oc/devices/{id}/sys/commands/request_id={command_id}`` and returns the
device's reply.  Async commands are queued, tracked by status and listed.

Not covered here: a device that never answers (IOTDA.014111 after the 20 s
platform timeout) -- the SDK cannot shorten the timeout, so the Rust tests
cover it.
"""

from __future__ import annotations

import pytest
from huaweicloudsdkiotda.v5.model import (
    AsyncDeviceCommandRequest,
    CreateAsyncCommandRequest,
    CreateCommandRequest,
    DeviceCommandRequest,
    ListAsyncCommandsRequest,
    ShowAsyncDeviceCommandRequest,
)

from ioda_testlib import (
    COMMAND,
    COMMAND_OK,
    assert_platform_time,
    create_product,
    expect_client_error,
    new_device,
    start_sim_device,
    uniq,
    wait_for_status,
    wait_until,
)

SERVICE = "Temperature"
CMD = "SET_MODE"  # para "mode": required enum auto|manual (ioda_testlib.temperature_service)
# Values of AsyncDeviceCommandRequest.send_strategy as documented by the SDK and the reference
# (application API 6.6): "immediately" | "delay".
IMMEDIATELY = "immediately"
DELAY = "delay"


@pytest.fixture
def product(client):
    return create_product(client)


def _sync(client, device_id: str, paras: dict, command_name: str = CMD):
    return client.create_command(CreateCommandRequest(
        device_id=device_id,
        body=DeviceCommandRequest(service_id=SERVICE, command_name=command_name, paras=paras)))


def _async(client, device_id: str, paras: dict, send_strategy: str, expire_time: int | None = None):
    return client.create_async_command(CreateAsyncCommandRequest(
        device_id=device_id,
        body=AsyncDeviceCommandRequest(service_id=SERVICE, command_name=CMD, paras=paras,
                                       expire_time=expire_time, send_strategy=send_strategy)))


def _show(client, device_id: str, command_id: str):
    return client.show_async_device_command(
        ShowAsyncDeviceCommandRequest(device_id=device_id, command_id=command_id))


def _wait_async_status(client, device_id: str, command_id: str, status: str, timeout: float = 5.0):
    seen: list = []

    def check():
        seen.append(_show(client, device_id, command_id))
        return seen[-1].status == status

    wait_until(check, timeout, what=lambda: f"async command {command_id} status {status} "
                                            f"(last seen: {seen[-1].status if seen else None})")
    return seen[-1]


def _command_payload(device_id: str, paras: dict) -> dict:
    return {"object_device_id": device_id, "service_id": SERVICE, "command_name": CMD, "paras": paras}


# ---------------------------------------------------------------------------
# Synchronous commands
# ---------------------------------------------------------------------------

def test_sync_command_round_trip(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)

    resp = _sync(client, device_id, {"mode": "auto"})
    assert resp.command_id, "CreateCommand returned no command_id"
    assert resp.response == COMMAND_OK, "the SDK response carries the device's reply"
    (cmd,) = dev.received(COMMAND)
    assert cmd.topic == f"$oc/devices/{device_id}/sys/commands/request_id={resp.command_id}"
    assert cmd.payload == _command_payload(device_id, {"mode": "auto"})

    # The reply is passed through as the device sent it, per command.
    dev.command_reply = lambda d: {"result_code": 0, "response_name": "SET_MODE_RESPONSE",
                                   "paras": {"result": d.payload["paras"]["mode"]}}
    second = _sync(client, device_id, {"mode": "manual"})
    assert second.command_id and second.command_id != resp.command_id
    assert second.response == {"result_code": 0, "response_name": "SET_MODE_RESPONSE",
                               "paras": {"result": "manual"}}
    assert [d.request_id for d in dev.received(COMMAND)] == [resp.command_id, second.command_id]
    assert not dev.errors


@pytest.mark.parametrize("command_name, paras", [
    (CMD, {}),                                   # required para "mode" missing
    (CMD, {"mode": "auto", "bogus": 1}),         # para not in the product model
    ("NO_SUCH_COMMAND", {"mode": "auto"}),       # command not in the product model
], ids=["missing-required-para", "unknown-para", "unknown-command"])
def test_sync_command_not_matching_the_model_is_400(client, product, sim_device_factory,
                                                    command_name, paras):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    expect_client_error(lambda: _sync(client, device_id, paras, command_name),
                        status=400, error_code="IOTDA.000006")
    assert dev.received(COMMAND) == [], "a rejected command must not reach the device"


def test_sync_command_to_offline_device_is_403(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    # Never connected (INACTIVE) ...
    expect_client_error(lambda: _sync(client, device_id, {"mode": "auto"}),
                        status=403, error_code="IOTDA.014016")
    # ... and disconnected (OFFLINE).
    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    dev.close()
    wait_for_status(client, device_id, "OFFLINE")
    expect_client_error(lambda: _sync(client, device_id, {"mode": "auto"}),
                        status=403, error_code="IOTDA.014016")


def test_sync_command_to_unknown_device_is_404(client):
    expect_client_error(lambda: _sync(client, uniq("nosuchdevice"), {"mode": "auto"}),
                        status=404, error_code="IOTDA.014000")


# ---------------------------------------------------------------------------
# Asynchronous commands
# ---------------------------------------------------------------------------

def test_async_command_immediately_to_online_device_succeeds(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret)

    created = _async(client, device_id, {"mode": "manual"}, IMMEDIATELY)
    assert created.command_id
    assert created.status in ("SENT", "DELIVERED", "SUCCESSFUL"), created

    cmd = dev.wait_request(COMMAND, created.command_id)
    assert cmd.payload == _command_payload(device_id, {"mode": "manual"})

    shown = _wait_async_status(client, device_id, created.command_id, "SUCCESSFUL")
    assert shown.command_id == created.command_id
    assert shown.result == COMMAND_OK, "result is the device's reply, as an object"
    assert_platform_time(shown.sent_time, "sent_time")
    assert_platform_time(shown.response_time, "response_time")
    assert not dev.errors


def test_async_command_failed_reply_is_failed(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    dev = start_sim_device(client, sim_device_factory, device_id, secret, command_reply={
        "result_code": 1, "response_name": "COMMAND_RESPONSE", "paras": {"result": "busy"}})

    created = _async(client, device_id, {"mode": "auto"}, IMMEDIATELY)
    dev.wait_request(COMMAND, created.command_id)
    _wait_async_status(client, device_id, created.command_id, "FAILED")


def test_async_command_delay_waits_for_the_device(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)

    created = _async(client, device_id, {"mode": "auto"}, DELAY, expire_time=3600)
    assert created.command_id
    assert created.status == "PENDING"
    assert _show(client, device_id, created.command_id).status == "PENDING"

    dev = start_sim_device(client, sim_device_factory, device_id, secret)
    cmd = dev.wait_request(COMMAND, created.command_id)
    assert cmd.payload == _command_payload(device_id, {"mode": "auto"})
    shown = _wait_async_status(client, device_id, created.command_id, "SUCCESSFUL")
    assert shown.result == COMMAND_OK


def test_async_command_immediately_to_offline_device_fails(client, product):
    device_id, _ = new_device(client, product.product_id)
    created = _async(client, device_id, {"mode": "auto"}, IMMEDIATELY)
    assert created.command_id
    assert created.status == "FAILED"
    assert _show(client, device_id, created.command_id).status == "FAILED"


@pytest.mark.parametrize("expire_time", [-1, 172801])
def test_async_command_expire_time_out_of_range_is_400(client, product, expire_time):
    device_id, _ = new_device(client, product.product_id)
    expect_client_error(lambda: _async(client, device_id, {"mode": "auto"}, DELAY, expire_time),
                        status=400, error_code="IOTDA.000006")


def test_list_async_commands_newest_first_and_filters(client, product, sim_device_factory):
    device_id, secret = new_device(client, product.product_id)
    # The device refuses "manual" (result_code 1) and accepts anything else.
    start_sim_device(client, sim_device_factory, device_id, secret, command_reply=lambda d: {
        "result_code": 1 if d.payload["paras"].get("mode") == "manual" else 0,
        "response_name": "COMMAND_RESPONSE", "paras": {"result": "done"}})

    ids = []
    for mode in ("auto", "manual", "auto"):
        command_id = _async(client, device_id, {"mode": mode}, IMMEDIATELY).command_id
        _wait_async_status(client, device_id, command_id, "FAILED" if mode == "manual" else "SUCCESSFUL")
        ids.append(command_id)

    listed = client.list_async_commands(ListAsyncCommandsRequest(device_id=device_id, limit=10))
    assert [c.command_id for c in listed.commands] == ids[::-1], "newest first"
    assert listed.page.count == 3
    assert [c.status for c in listed.commands] == ["SUCCESSFUL", "FAILED", "SUCCESSFUL"]
    assert all(c.device_id in (None, device_id) and c.command_name == CMD for c in listed.commands)

    ok = client.list_async_commands(ListAsyncCommandsRequest(device_id=device_id, status="SUCCESSFUL"))
    assert [c.command_id for c in ok.commands] == [ids[2], ids[0]]
    assert ok.page.count == 2

    by_name = client.list_async_commands(ListAsyncCommandsRequest(device_id=device_id, command_name=CMD))
    assert [c.command_id for c in by_name.commands] == ids[::-1]

    page1 = client.list_async_commands(ListAsyncCommandsRequest(device_id=device_id, limit=2))
    assert [c.command_id for c in page1.commands] == [ids[2], ids[1]]
    assert page1.page.count == 3 and page1.page.marker
    page2 = client.list_async_commands(ListAsyncCommandsRequest(device_id=device_id, limit=2,
                                                                marker=page1.page.marker))
    assert [c.command_id for c in page2.commands] == [ids[0]]
