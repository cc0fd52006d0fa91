"""Shared helpers for the ioda end-to-end suite.

Everything here talks to the server exactly like a real user would: the
official ``huaweicloudsdkiotda`` SDK (unchanged) on the application side and
``paho-mqtt`` on the device side (``ioda_mqtt.Device``).
"""

from __future__ import annotations

import decimal
import re
import time
import uuid
from typing import Any, Callable

import pytest
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkcore.region.region import Region
from huaweicloudsdkiotda.v5 import IoTDAClient
from huaweicloudsdkiotda.v5.model import (
    AddDevice,
    AddDeviceRequest,
    AddProduct,
    AuthInfo,
    CreateProductRequest,
    ListDevicesRequest,
    ListProductsRequest,
    ServiceCapability,
    ServiceCommand,
    ServiceCommandPara,
    ServiceCommandResponse,
    ServiceProperty,
    ShowDeviceRequest,
    ShowDeviceShadowRequest,
)

# Device-side helpers live in ioda_mqtt; re-exported so tests import from one place.
from ioda_mqtt import (  # noqa: F401
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_BAD_PROTOCOL,
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    COMMAND,
    COMMAND_OK,
    MESSAGE,
    PROPERTIES_GET,
    PROPERTIES_SET,
    PROPERTIES_SET_OK,
    PUBACK_NOT_AUTHORIZED,
    SHADOW,
    SUBACK_FAILURE,
    USER,
    Device,
    Downlink,
    SimDevice,
    iotda_password,
    report_topic,
    user_topic,
    utc_hour_timestamp,
)

# --------------------------------------------------------------------------
# Application side (SDK)
# --------------------------------------------------------------------------

#: Signature algorithms exercised by every SDK test (pytest ids in brackets).
SIGNER_HMAC = "SDK-HMAC-SHA256"
SIGNER_V11 = "V11-HMAC-SHA256"
SIGNERS = (SIGNER_HMAC, SIGNER_V11)
SIGNER_IDS = ("hmac", "v11")

#: Region id used for the derived (V11) signer; it only enters the
#: signature's credential scope (``YYYYMMDD/cn-north-4/iotdm``).
DERIVED_REGION_ID = "cn-north-4"


def make_client(signer: str, endpoint: str, ak: str, sk: str, project_id: str) -> IoTDAClient:
    """Build an IoTDAClient pointed at ``endpoint`` (``http://127.0.0.1:PORT``).

    SDK-HMAC-SHA256: plain ``BasicCredentials`` + ``with_endpoints``.  No
    derived predicate is set, so ``Credentials.sign_request`` falls through to
    ``Signer`` (HttpConfig's default signing algorithm is HMAC_SHA256).

    V11-HMAC-SHA256: ``with_derived_predicate(default predicate)`` +
    ``with_region``.  The default predicate is "host does not look like a
    huaweicloud domain", which is true for 127.0.0.1, so
    ``DerivationAKSKSigner`` is used with service ``iotdm`` (registered by
    ``IoTDAClient.new_builder``) and region ``cn-north-4``.  Because
    project_id is given, ``process_auth_params`` makes no IAM call.

    ``test_harness.py`` checks the resulting Authorization headers against a
    local recorder, so an SDK change that breaks this assumption is caught.
    """
    config = HttpConfig.get_default_config()
    config.timeout = (5, 30)  # connect, read: fail fast instead of the 60/120 s defaults
    credentials = BasicCredentials(ak, sk, project_id)
    builder = IoTDAClient.new_builder().with_http_config(config)
    if signer == SIGNER_HMAC:
        builder = builder.with_credentials(credentials).with_endpoints([endpoint])
    elif signer == SIGNER_V11:
        credentials = credentials.with_derived_predicate(BasicCredentials.get_default_derived_predicate())
        builder = builder.with_credentials(credentials).with_region(
            Region(id=DERIVED_REGION_ID, endpoint=endpoint))
    else:
        raise ValueError(f"unknown signer {signer!r}")
    return builder.build()


def uniq(prefix: str) -> str:
    """Unique, ID-safe name ([A-Za-z0-9_-])."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def expect_client_error(fn: Callable[[], Any], status: int | None = None,
                        error_code: str | None = None) -> ClientRequestException:
    """Run ``fn`` and require a 4xx ``ClientRequestException``.

    ``status``/``error_code`` are checked exactly when given; the error code
    must always be an ``IOTDA.`` code and the request id non-empty.
    """
    with pytest.raises(ClientRequestException) as info:
        fn()
    exc = info.value
    if status is not None:
        assert exc.status_code == status, f"expected HTTP {status}, got {exc}"
    assert 400 <= exc.status_code < 500, str(exc)
    assert exc.error_code and exc.error_code.startswith("IOTDA."), f"error_code is not IOTDA.*: {exc}"
    if error_code is not None:
        assert exc.error_code == error_code, f"expected {error_code}, got {exc}"
    assert exc.request_id, f"no X-Request-Id on error response: {exc}"
    return exc


def temperature_service() -> ServiceCapability:
    """The product model used throughout the suite."""
    return ServiceCapability(
        service_id="Temperature",
        service_type="Temperature",
        description="temperature sensor",
        properties=[
            ServiceProperty(property_name="temp", data_type="decimal", min="-40", max="120",
                            method="RW", unit="celsius", description="temperature"),
            ServiceProperty(property_name="mode", data_type="enum", enum_list=["auto", "manual"],
                            method="RW"),
            ServiceProperty(property_name="label", data_type="string", max_length=8, method="R"),
            ServiceProperty(property_name="count", data_type="int", min="0", max="100", method="R"),
        ],
        commands=[
            ServiceCommand(
                command_name="SET_MODE",
                paras=[ServiceCommandPara(para_name="mode", data_type="enum", required=True,
                                          enum_list=["auto", "manual"])],
                responses=[ServiceCommandResponse(
                    response_name="SET_MODE_RESPONSE",
                    paras=[ServiceCommandPara(para_name="result", data_type="string", max_length=16)],
                )],
            )
        ],
    )


def create_product(client: IoTDAClient, name: str | None = None, description: str | None = None):
    body = AddProduct(
        name=name or uniq("prod"),
        device_type="Thermometer",
        protocol_type="MQTT",
        data_format="json",
        manufacturer_name="ioda-tests",
        description=description,
        service_capabilities=[temperature_service()],
    )
    resp = client.create_product(CreateProductRequest(body=body))
    assert resp.product_id, "CreateProduct returned no product_id"
    return resp


def add_device(client: IoTDAClient, product_id: str, node_id: str | None = None,
               secret: str | None = None, device_name: str | None = None, device_id: str | None = None):
    body = AddDevice(
        node_id=node_id or uniq("node"),
        product_id=product_id,
        device_name=device_name or uniq("dev"),
        device_id=device_id,
        auth_info=AuthInfo(secret=secret) if secret is not None else None,
    )
    return client.add_device(AddDeviceRequest(body=body))


def new_device(client: IoTDAClient, product_id: str) -> tuple[str, str]:
    """Register a device of ``product_id``; returns ``(device_id, secret)``."""
    created = add_device(client, product_id)
    assert created.device_id and created.auth_info and created.auth_info.secret
    return created.device_id, created.auth_info.secret


def start_sim_device(client: IoTDAClient, sim_device_factory: Callable, device_id: str, secret: str,
                     **kwargs) -> SimDevice:
    """Connect a ``SimDevice`` (subscribed to its downlinks) and wait until the API shows it ONLINE."""
    dev = sim_device_factory(device_id, secret, **kwargs)
    assert dev.connect() == CONNACK_ACCEPTED
    wait_for_status(client, device_id, "ONLINE")
    return dev


#: ``yyyyMMdd'T'HHmmss'Z'``, the platform's time format (application API 3).
PLATFORM_TIME_RE = re.compile(r"\d{8}T\d{6}Z")


def assert_platform_time(value: Any, what: str) -> None:
    assert isinstance(value, str) and PLATFORM_TIME_RE.fullmatch(value), (
        f"{what}: expected yyyyMMdd'T'HHmmss'Z', got {value!r}")


def device_status(client: IoTDAClient, device_id: str) -> str:
    return client.show_device(ShowDeviceRequest(device_id=device_id)).status


def wait_for_status(client: IoTDAClient, device_id: str, status: str, timeout: float = 5.0) -> None:
    seen: list[str] = []

    def check() -> bool:
        seen.append(device_status(client, device_id))
        return seen[-1] == status

    wait_until(check, timeout, what=lambda: f"device {device_id} status {status} (last seen: {seen[-1:]})")


def shadow_service(client: IoTDAClient, device_id: str, service_id: str):
    """The DeviceShadowData entry of ``service_id`` or None."""
    resp = client.show_device_shadow(ShowDeviceShadowRequest(device_id=device_id))
    assert resp.device_id in (None, device_id)
    for entry in resp.shadow or []:
        if entry.service_id == service_id:
            return entry
    return None


def reported_properties(client: IoTDAClient, device_id: str, service_id: str) -> dict:
    entry = shadow_service(client, device_id, service_id)
    if entry is None or entry.reported is None or entry.reported.properties is None:
        return {}
    return dict(entry.reported.properties)


def list_all(fetch: Callable[[str | None], Any], items_attr: str, limit: int = 50) -> list:
    """Follow ``page.marker`` until a short/empty page; ``fetch(marker)`` returns one page."""
    out: list = []
    marker = None
    for _ in range(200):
        resp = fetch(marker)
        items = getattr(resp, items_attr) or []
        out.extend(items)
        if len(items) < limit or resp.page is None or not resp.page.marker:
            return out
        marker = resp.page.marker
    raise AssertionError("pagination did not terminate after 200 pages")


def list_all_products(client: IoTDAClient) -> list:
    return list_all(lambda m: client.list_products(ListProductsRequest(limit=50, marker=m)), "products")


def list_all_devices(client: IoTDAClient, product_id: str) -> list:
    return list_all(lambda m: client.list_devices(
        ListDevicesRequest(product_id=product_id, limit=50, marker=m)), "devices")


def _same_scalar(expected: Any, actual: Any) -> bool:
    if expected == actual:
        return True
    # "-40" vs "-40.0", or a number echoed as a string: compare numerically.
    try:
        return decimal.Decimal(str(expected)) == decimal.Decimal(str(actual))
    except (decimal.InvalidOperation, ValueError):
        return False


def assert_contains(expected: Any, actual: Any, path: str = "$") -> None:
    """Every non-None field of ``expected`` (a to_dict() tree) is present and equal in ``actual``.

    Lists must have the same length and match element-wise in order; fields
    the server adds (defaults such as ``option``/``required``) are ignored.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected object, got {actual!r}"
        for key, value in expected.items():
            if value is None:
                continue
            assert key in actual and actual[key] is not None, f"{path}.{key}: missing in {actual!r}"
            assert_contains(value, actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected list, got {actual!r}"
        assert len(actual) == len(expected), f"{path}: expected {len(expected)} items, got {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_contains(e, a, f"{path}[{i}]")
    else:
        assert _same_scalar(expected, actual), f"{path}: expected {expected!r}, got {actual!r}"


# --------------------------------------------------------------------------
# Polling
# --------------------------------------------------------------------------

def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout`` s.

    ``what`` may be a string or a zero-argument callable producing the failure message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            msg = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {msg}")
        time.sleep(min(interval, 0.2))
