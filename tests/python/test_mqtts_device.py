"""MQTTS: a paho device set up as Huawei's Python device SDK sets up port 8883 (the CA file it is
given, TLS 1.2, no host name check), pointed at ioda's own CA."""

from __future__ import annotations

import socket
import ssl

from ioda_mqtt import Device
from ioda_testlib import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    add_device,
    create_product,
    reported_properties,
    wait_for_status,
    wait_until,
)


def test_a_device_reports_over_mqtts_verified_with_iodas_ca(admin_client, ioda_server):
    product = create_product(admin_client)
    created = add_device(admin_client, product.product_id)
    device_id = created.device_id
    dev = Device(ioda_server.mqtt_host, ioda_server.mqtts_port, device_id,
                 created.auth_info.secret, tls_ca=ioda_server.tls_ca)
    try:
        assert dev.connect() == CONNACK_ACCEPTED
        wait_for_status(admin_client, device_id, "ONLINE")
        reported = {"temp": 23.5, "mode": "auto"}
        assert dev.report_properties([{"service_id": "Temperature", "properties": reported}]) == 0
        wait_until(lambda: reported_properties(admin_client, device_id, "Temperature") == reported,
                   5.0, what=f"reported {reported}")
    finally:
        dev.close()
    wait_for_status(admin_client, device_id, "OFFLINE")


def test_a_wrong_password_over_mqtts_is_connack_4(admin_client, ioda_server):
    product = create_product(admin_client)
    created = add_device(admin_client, product.product_id)
    dev = Device(ioda_server.mqtt_host, ioda_server.mqtts_port, created.device_id,
                 "not-the-secret", tls_ca=ioda_server.tls_ca)
    try:
        assert dev.connect() == CONNACK_BAD_CREDENTIALS
    finally:
        dev.close()


def test_the_server_certificate_is_issued_by_the_ca_and_names_localhost(ioda_server):
    """Clients that do check the host name (most besides Huawei's SDK) accept 127.0.0.1 and localhost."""
    context = ssl.create_default_context(cafile=ioda_server.tls_ca)
    for name in ("localhost", "127.0.0.1"):
        with socket.create_connection((ioda_server.mqtt_host, ioda_server.mqtts_port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
