"""Self-checks of the harness itself; these need no ioda server.

They pin the assumptions the rest of the suite is built on: that the two
client set-ups really produce the two signature algorithms, and that the MQTT
password helper matches Huawei's published test vector.
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from huaweicloudsdkiotda.v5.model import ListProductsRequest

from ioda_testlib import SIGNER_HMAC, SIGNER_V11, iotda_password, make_client


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_GET(self):  # noqa: N802 (http.server naming)
        type(self).seen.append({"path": self.path, "headers": dict(self.headers)})
        body = json.dumps({"products": [], "page": {"count": 0, "marker": None}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("signer,prefix", [
    (SIGNER_HMAC, "SDK-HMAC-SHA256 Access=MYAK, SignedHeaders="),
    (SIGNER_V11, "V11-HMAC-SHA256 Credential=MYAK/{date}/cn-north-4/iotdm, SignedHeaders="),
], ids=["hmac", "v11"])
def test_client_setup_uses_expected_signature_algorithm(recorder, signer, prefix):
    endpoint, seen = recorder
    client = make_client(signer, endpoint, "MYAK", "MYSK", "proj123")
    resp = client.list_products(ListProductsRequest(limit=1))
    assert resp.page.count == 0

    (request,) = seen
    assert request["path"].startswith("/v5/iot/proj123/products")
    auth = request["headers"]["Authorization"]
    date = request["headers"]["X-Sdk-Date"][:8]
    assert auth.startswith(prefix.format(date=date)), auth
    assert request["headers"]["X-Project-Id"] == "proj123"


def test_iotda_password_matches_published_vector():
    assert iotda_password("12345678", "2025041401") == \
        "c75150e6cb841417396819e4d2ee4358a416344a03a083e3a8567074ddec820a"

