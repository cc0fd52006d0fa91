"""HTTPS device access with `requests` as the device: ``POST /v5/device-auth`` for a token (TLS
verified with ioda's CA), then a property report and a message up; IoTDA's error codes for a
wrong password and a missing token."""

from __future__ import annotations

import requests

from ioda_mqtt import iotda_password, utc_hour_timestamp
from ioda_testlib import add_device, create_product, reported_properties, wait_for_status, wait_until


def _url(ioda_server, path: str) -> str:
    return f"https://127.0.0.1:{ioda_server.https_port}{path}"


def _auth(ioda_server, device_id: str, secret: str) -> requests.Response:
    ts = utc_hour_timestamp()
    body = {"device_id": device_id, "sign_type": 0, "timestamp": ts,
            "password": iotda_password(secret, ts)}
    return requests.post(_url(ioda_server, "/v5/device-auth"), json=body, verify=ioda_server.tls_ca,
                         timeout=10)


def test_a_device_reports_and_sends_a_message_over_https(admin_client, ioda_server):
    product = create_product(admin_client)
    created = add_device(admin_client, product.product_id)
    device_id = created.device_id
    answer = _auth(ioda_server, device_id, created.auth_info.secret)
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert answer.json()["expires_in"] == 86399
    headers = {"access_token": token}

    reported = {"temp": 30.5, "mode": "auto"}
    sent = requests.post(_url(ioda_server, f"/v5/devices/{device_id}/sys/properties/report"),
                         json={"services": [{"service_id": "Temperature", "properties": reported}]},
                         headers=headers, verify=ioda_server.tls_ca, timeout=10)
    assert sent.status_code == 200, sent.text
    wait_until(lambda: reported_properties(admin_client, device_id, "Temperature") == reported,
               5.0, what=f"reported {reported}")
    wait_for_status(admin_client, device_id, "ONLINE")

    sent = requests.post(_url(ioda_server, f"/v5/devices/{device_id}/sys/messages/up"),
                         json={"name": "n", "id": "1", "content": "messageUp"},
                         headers=headers, verify=ioda_server.tls_ca, timeout=10)
    assert sent.status_code == 200, sent.text


def test_a_wrong_password_is_401_and_a_missing_token_403(admin_client, ioda_server):
    product = create_product(admin_client)
    created = add_device(admin_client, product.product_id)
    answer = _auth(ioda_server, created.device_id, "not-the-secret")
    assert answer.status_code == 401
    assert answer.json()["error_code"] == "IOTDA.000002"
    sent = requests.post(_url(ioda_server, f"/v5/devices/{created.device_id}/sys/messages/up"),
                         json={"content": "x"}, verify=ioda_server.tls_ca, timeout=10)
    assert sent.status_code == 403
    assert sent.json()["error_code"] == "IOTDA.000004"
