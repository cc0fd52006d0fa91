"""Application-side authentication negatives (both signers)."""

from __future__ import annotations

from huaweicloudsdkiotda.v5.model import ListProductsRequest

from ioda_testlib import expect_client_error


def test_valid_credentials_are_accepted(client):
    resp = client.list_products(ListProductsRequest(limit=1))
    assert resp.page is not None and resp.page.count is not None


def test_wrong_secret_key_is_401(client_factory, ioda_server):
    bad = client_factory(sk=ioda_server.secret_key + "x")
    exc = expect_client_error(lambda: bad.list_products(ListProductsRequest()),
                              status=401, error_code="IOTDA.000002")
    assert exc.request_id


def test_unknown_access_key_is_401(client_factory):
    bad = client_factory(ak="UNKNOWNACCESSKEY0000")
    expect_client_error(lambda: bad.list_products(ListProductsRequest()),
                        status=401, error_code="IOTDA.000002")


def test_unknown_project_is_404(client_factory):
    bad = client_factory(project_id="0123456789abcdef0123456789abcdef")
    exc = expect_client_error(lambda: bad.list_products(ListProductsRequest()), status=404)
    assert exc.error_code.startswith("IOTDA.")
    assert exc.request_id
