"""An NB-IoT device scripted with aiocoap (not ioda's code): it registers over LwM2M, serves
/19/0/0 (observed by the platform) and /19/1/0 (written by it), reports binary data that the
product's codec decodes into the shadow, and answers a command created with Huawei's SDK."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import aiocoap
import aiocoap.resource as resource
from huaweicloudsdkiotda.v5 import (
    AddDevice,
    AddDeviceRequest,
    AddProduct,
    AsyncDeviceCommandRequest,
    CreateAsyncCommandRequest,
    CreateProductRequest,
    ServiceCapability,
    ServiceCommand,
    ServiceCommandPara,
    ServiceProperty,
    ShowAsyncDeviceCommandRequest,
)

from ioda_testlib import device_status, reported_properties, uniq

CODEC = Path(__file__).resolve().parents[2] / "crates" / "codec" / "golden" / "smoke.codec.json"


class Uplink(resource.ObservableResource):
    """/19/0/0: the device's data, pushed to the observing platform as notifications."""

    def __init__(self) -> None:
        super().__init__()
        self.value = b""
        self.observers = 0

    def update_observation_count(self, count: int) -> None:
        self.observers = count

    async def render_get(self, request):
        return aiocoap.Message(payload=self.value, content_format=42)

    def report(self, payload: bytes) -> None:
        self.value = payload
        self.updated_state()


class Downlink(resource.Resource):
    """/19/1/0: what the platform writes (commands, report answers)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: asyncio.Queue[bytes] = asyncio.Queue()

    async def render_put(self, request):
        await self.writes.put(request.payload)
        return aiocoap.Message(code=aiocoap.CHANGED)


def smoke_product(client) -> str:
    service = ServiceCapability(
        service_id="Smoke", service_type="Smoke",
        properties=[
            ServiceProperty(property_name="level", data_type="int", min="0", max="255", method="R"),
            ServiceProperty(property_name="temperature", data_type="decimal", min="-100", max="200", method="R"),
        ],
        commands=[ServiceCommand(command_name="SET_ALARM", paras=[
            ServiceCommandPara(para_name="value", data_type="int", min="0", max="1"),
        ])],
    )
    created = client.create_product(CreateProductRequest(body=AddProduct(
        name=uniq("nb"), device_type="Smoke", protocol_type="CoAP", data_format="binary",
        service_capabilities=[service])))
    return created.product_id


def set_codec(server, product_id: str) -> None:
    done = subprocess.run(
        [server.binary, "api", "--data-dir", str(server.data_dir), "PUT",
         f"/products/{product_id}/codec", "--data", CODEC.read_text()],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


async def wait_for(predicate, what: str, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")


async def scenario(server, client) -> None:
    product_id = smoke_product(client)
    set_codec(server, product_id)
    node_id = uniq("86300")
    device = client.add_device(AddDeviceRequest(body=AddDevice(node_id=node_id, product_id=product_id)))
    device_id = device.device_id

    site = resource.Site()
    uplink, downlink = Uplink(), Downlink()
    site.add_resource(["19", "0", "0"], uplink)
    site.add_resource(["19", "1", "0"], downlink)
    context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0))
    try:
        registration = aiocoap.Message(
            code=aiocoap.POST, payload=b"</19/0>,</19/1>",
            uri=f"coap://{server.coap_addr}/rd?ep={node_id}&lt=300&b=U&lwm2m=1.0")
        answer = await asyncio.wait_for(context.request(registration).response, 10)
        assert answer.code == aiocoap.CREATED, answer
        assert answer.opt.location_path == ("rd", node_id)
        await wait_for(lambda: device_status(client, device_id) == "ONLINE", "ONLINE")
        # The platform observes /19/0/0 right after the registration.
        await wait_for(lambda: uplink.observers > 0, "the platform's observation of /19/0/0")

        uplink.report(bytes([0x00, 0x02, 0x01, 0x2C]))  # level 2, temperature 30.0
        await wait_for(lambda: reported_properties(client, device_id, "Smoke") == {"level": 2, "temperature": 30.0},
                       "the decoded report in the shadow")
        assert await asyncio.wait_for(downlink.writes.get(), 10) == bytes.fromhex("AAAA0000"), \
            "the codec's report answer"

        created = client.create_async_command(CreateAsyncCommandRequest(
            device_id=device_id,
            body=AsyncDeviceCommandRequest(service_id="Smoke", command_name="SET_ALARM", paras={"value": 1})))
        command = await asyncio.wait_for(downlink.writes.get(), 10)
        assert command[0] == 0x01 and command[3] == 0x01, command.hex()
        mid = command[1:3]

        def status() -> str:
            shown = client.show_async_device_command(ShowAsyncDeviceCommandRequest(
                device_id=device_id, command_id=created.command_id))
            return shown.status

        await wait_for(lambda: status() == "DELIVERED", "DELIVERED on the CoAP ACK")
        uplink.report(bytes([0x02]) + mid + bytes([0x00, 0x01]))  # the response, carrying the mid
        await wait_for(lambda: status() == "SUCCESSFUL", "SUCCESSFUL on the response")
        shown = client.show_async_device_command(ShowAsyncDeviceCommandRequest(
            device_id=device_id, command_id=created.command_id))
        assert json.loads(json.dumps(shown.result))["paras"] == {"result": 1}, shown.result
    finally:
        await context.shutdown()


def test_an_aiocoap_lwm2m_device_reports_and_answers_a_command(ioda_server, client):
    asyncio.run(scenario(ioda_server, client))
