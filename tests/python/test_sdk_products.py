"""Products (/v5/iot/{project_id}/products) through the official SDK, both signers."""

from __future__ import annotations

from huaweicloudsdkiotda.v5.model import (
    DeleteProductRequest,
    ListProductsRequest,
    ShowProductRequest,
    UpdateProduct,
    UpdateProductRequest,
)

from ioda_testlib import (
    assert_contains,
    create_product,
    expect_client_error,
    list_all_products,
    temperature_service,
    uniq,
)


def _expected_capabilities() -> list[dict]:
    return [temperature_service().to_dict()]


def _capabilities(resp) -> list[dict]:
    return [cap.to_dict() for cap in (resp.service_capabilities or [])]


def test_create_and_show_product_round_trips_model(client):
    name = uniq("prod")
    created = create_product(client, name=name, description="created by the e2e suite")

    assert created.name == name
    assert created.device_type == "Thermometer"
    assert created.protocol_type == "MQTT"
    assert created.data_format == "json"
    assert created.manufacturer_name == "ioda-tests"
    assert created.description == "created by the e2e suite"
    assert_contains(_expected_capabilities(), _capabilities(created))

    shown = client.show_product(ShowProductRequest(product_id=created.product_id))
    assert shown.product_id == created.product_id
    assert shown.name == name
    assert shown.device_type == "Thermometer"
    assert shown.protocol_type == "MQTT"
    assert shown.data_format == "json"
    assert shown.description == "created by the e2e suite"
    assert_contains(_expected_capabilities(), _capabilities(shown))

    # Spot-check the details most likely to be mangled in storage.
    cap = shown.service_capabilities[0]
    assert cap.service_id == "Temperature"
    props = {p.property_name: p for p in cap.properties}
    assert set(props) == {"temp", "mode", "label", "count"}
    assert props["temp"].data_type == "decimal" and props["temp"].method == "RW"
    assert props["mode"].enum_list == ["auto", "manual"]
    assert props["label"].max_length == 8
    assert props["count"].data_type == "int"
    (command,) = cap.commands
    assert command.command_name == "SET_MODE"
    assert [p.para_name for p in command.paras] == ["mode"]
    assert [r.response_name for r in command.responses] == ["SET_MODE_RESPONSE"]
    assert [p.para_name for p in command.responses[0].paras] == ["result"]


def test_list_products_newest_first_with_marker_pagination(client):
    older = create_product(client)
    newer = create_product(client)

    everything = list_all_products(client)
    ids = [p.product_id for p in everything]
    assert older.product_id in ids and newer.product_id in ids
    assert ids.index(newer.product_id) < ids.index(older.product_id), "list is not newest first"
    summary = everything[ids.index(newer.product_id)]
    assert summary.name == newer.name
    assert summary.protocol_type == "MQTT"
    assert summary.device_type == "Thermometer"

    # Tests run sequentially against one server, so `newer` is the newest product.
    first = client.list_products(ListProductsRequest(limit=1))
    assert [p.product_id for p in first.products] == [newer.product_id]
    assert first.page is not None
    assert first.page.count >= 2
    assert first.page.marker, "page.marker must be set when a page is returned"

    second = client.list_products(ListProductsRequest(limit=1, marker=first.page.marker))
    assert [p.product_id for p in second.products] == [older.product_id]
    assert second.page.count == first.page.count, "page.count is the total, independent of the marker"


def test_update_product_name_and_description(client):
    created = create_product(client, description="before")
    new_name = uniq("renamed")

    updated = client.update_product(UpdateProductRequest(
        product_id=created.product_id,
        body=UpdateProduct(name=new_name, description="after"),
    ))
    assert updated.product_id == created.product_id
    assert updated.name == new_name
    assert updated.description == "after"

    shown = client.show_product(ShowProductRequest(product_id=created.product_id))
    assert shown.name == new_name
    assert shown.description == "after"
    # Fields not in the update body are untouched.
    assert shown.device_type == "Thermometer"
    assert shown.protocol_type == "MQTT"
    assert_contains(_expected_capabilities(), _capabilities(shown))


def test_delete_product_then_show_is_404(client):
    created = create_product(client)
    client.delete_product(DeleteProductRequest(product_id=created.product_id))

    expect_client_error(lambda: client.show_product(ShowProductRequest(product_id=created.product_id)),
                        status=404)
    ids = [p.product_id for p in list_all_products(client)]
    assert created.product_id not in ids


def test_show_unknown_product_is_404(client):
    expect_client_error(lambda: client.show_product(ShowProductRequest(product_id="0123456789abcdef01234567")),
                        status=404)
