//! The REST API over real HTTP: signatures, errors, validation, pagination.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ioda::client::{RawRequest, Signing};
use serde_json::{Value, json};

fn raw(method: &str, path: &str, body: &Value) -> RawRequest {
    RawRequest {
        method: method.into(),
        path: path.into(),
        body: serde_json::to_vec(body).unwrap(),
        ..Default::default()
    }
}

#[tokio::test]
async fn both_signature_algorithms_are_accepted() {
    let server = server().await;
    let classic = server.api.call("GET", "/products", None).await.unwrap();
    assert_eq!(classic.status, 200, "{}", classic.body);
    let mut derived = server.api.clone();
    derived.signing = Signing::Derived("cn-north-4".into());
    let r = derived
        .call("GET", "/products?limit=5", None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.request_id.is_some_and(|id| id.len() == 32));
    server.stop().await;
}

#[tokio::test]
async fn bad_missing_tampered_and_replayed_signatures_get_401() {
    let server = server().await;
    let path = server.api.full_path("/products");
    let body = json!({"name": "p", "device_type": "t", "protocol_type": "MQTT", "service_capabilities": []});
    let mut wrong_key = server.api.clone();
    wrong_key.secret_key = "not-the-secret".into();
    let mut unknown_ak = server.api.clone();
    unknown_ak.access_key = "NOSUCHKEY".into();
    let cases: Vec<(&str, ioda::client::ApiClient, RawRequest)> = vec![
        ("wrong secret", wrong_key, raw("POST", &path, &body)),
        ("unknown access key", unknown_ak, raw("POST", &path, &body)),
        (
            "no Authorization",
            server.api.clone(),
            RawRequest {
                unsigned: true,
                ..raw("POST", &path, &body)
            },
        ),
        (
            "tampered body",
            server.api.clone(),
            RawRequest {
                tampered_body: Some(br#"{"name":"evil"}"#.to_vec()),
                ..raw("POST", &path, &body)
            },
        ),
        (
            "replayed: date 20 minutes old",
            server.api.clone(),
            RawRequest {
                sdk_date: Some(old_date(20)),
                ..raw("POST", &path, &body)
            },
        ),
        (
            "date in the future",
            server.api.clone(),
            RawRequest {
                sdk_date: Some(old_date(-20)),
                ..raw("POST", &path, &body)
            },
        ),
        (
            "malformed date",
            server.api.clone(),
            RawRequest {
                sdk_date: Some("yesterday".into()),
                ..raw("POST", &path, &body)
            },
        ),
    ];
    for (name, client, request) in cases {
        let r = client.send(request).await.unwrap();
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert_eq!(r.body["error_code"], "IOTDA.000002", "{name}");
        assert!(r.request_id.is_some(), "{name}");
    }
    // Nothing was created by any of them.
    assert_eq!(server.get("/products").await["page"]["count"], 0);
    server.stop().await;
}

fn old_date(minutes_ago: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    ioda_types::time::format_compact(now - minutes_ago * 60_000)
}

#[tokio::test]
async fn unknown_project_and_unknown_api_are_404() {
    let server = server().await;
    let mut other = server.api.clone();
    other.project_id = "0123456789abcdef0123456789abcdef".into();
    let r = other.call("GET", "/devices", None).await.unwrap();
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (404, Some("IOTDA.000005"))
    );
    let r = server
        .api
        .call("GET", "/no-such-resource", None)
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body["error_code"].as_str().unwrap().starts_with("IOTDA."));
    server.stop().await;
}

#[tokio::test]
async fn invalid_bodies_get_400_and_write_nothing() {
    let server = server().await;
    let product = server.product().await;
    let good_product = json!({"name": "p", "device_type": "t", "protocol_type": "MQTT", "service_capabilities": model()});
    let mut cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            "unknown field",
            "/products",
            json!({"name": "p", "device_type": "t", "protocol_type": "MQTT", "service_capabilities": [], "colour": "red"}),
            "IOTDA.000008",
        ),
        (
            "missing name",
            "/products",
            json!({"device_type": "t", "protocol_type": "MQTT", "service_capabilities": []}),
            "IOTDA.000008",
        ),
        (
            "wrong type",
            "/products",
            json!({"name": 5, "device_type": "t", "protocol_type": "MQTT", "service_capabilities": []}),
            "IOTDA.000008",
        ),
        (
            "bad protocol",
            "/products",
            json!({"name": "p", "device_type": "t", "protocol_type": "PIGEON", "service_capabilities": []}),
            "IOTDA.000006",
        ),
        (
            "bad data type",
            "/products",
            json!({"name": "p", "device_type": "t", "protocol_type": "MQTT", "service_capabilities": [
            {"service_id": "s", "service_type": "t", "properties": [{"property_name": "x", "data_type": "float", "method": "R"}]}]}),
            "IOTDA.000008",
        ),
        (
            "min above max",
            "/products",
            json!({"name": "p", "device_type": "t", "protocol_type": "MQTT", "service_capabilities": [
            {"service_id": "s", "service_type": "t", "properties": [{"property_name": "x", "data_type": "int", "min": "9", "max": "1", "method": "R"}]}]}),
            "IOTDA.000006",
        ),
        (
            "name too long",
            "/products",
            json!({"name": "n".repeat(65), "device_type": "t", "protocol_type": "MQTT", "service_capabilities": []}),
            "IOTDA.000006",
        ),
        (
            "device unknown field",
            "/devices",
            json!({"node_id": "n1", "product_id": product, "owner": "me"}),
            "IOTDA.000008",
        ),
        (
            "device bad node id",
            "/devices",
            json!({"node_id": "bad id!", "product_id": product}),
            "IOTDA.000006",
        ),
        (
            "device short secret",
            "/devices",
            json!({"node_id": "n1", "product_id": product, "auth_info": {"secret": "short"}}),
            "IOTDA.000006",
        ),
        (
            "device bad desired",
            "/devices",
            json!({"node_id": "n1", "product_id": product, "shadow": [{"service_id": "Temperature", "desired": {"temp": 900}}]}),
            "IOTDA.000006",
        ),
        (
            "device read-only desired",
            "/devices",
            json!({"node_id": "n1", "product_id": product, "shadow": [{"service_id": "Temperature", "desired": {"count": 1}}]}),
            "IOTDA.000006",
        ),
    ];
    cases.push(("malformed JSON", "/products", Value::Null, "IOTDA.000008"));
    for (name, path, body, code) in cases {
        let request = if body.is_null() {
            RawRequest {
                method: "POST".into(),
                path: server.api.full_path(path),
                body: b"{\"name\": ".to_vec(),
                ..Default::default()
            }
        } else {
            raw("POST", &server.api.full_path(path), &body)
        };
        let r = server.api.send(request).await.unwrap();
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (400, Some(code)),
            "{name}: {}",
            r.body
        );
        assert!(!r.body["error_msg"].as_str().unwrap().is_empty(), "{name}");
    }
    assert_eq!(
        server.get("/products").await["page"]["count"],
        1,
        "only the fixture product exists"
    );
    assert_eq!(
        server.get("/devices").await["page"]["count"],
        0,
        "no device was half-written"
    );
    let r = server
        .api
        .call("POST", "/products", Some(&good_product))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    server.stop().await;
}

#[tokio::test]
async fn pagination_markers_and_ranges() {
    let server = server().await;
    let product = server.product().await;
    for i in 0..5 {
        server.device(&product, &format!("page-{i}")).await;
    }
    let first = server.get("/devices?limit=2").await;
    let names: Vec<&str> = first["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["page-4", "page-3"], "newest first");
    assert_eq!(first["page"]["count"], 5);
    let marker = first["page"]["marker"].as_str().unwrap();
    let second = server
        .get(&format!("/devices?limit=2&marker={marker}"))
        .await;
    let names: Vec<&str> = second["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["page-2", "page-1"]);
    let offset = server.get("/devices?limit=2&offset=4").await;
    assert_eq!(offset["devices"][0]["node_id"], "page-0");
    for (query, code) in [
        ("limit=0", "IOTDA.000017"),
        ("limit=51", "IOTDA.000017"),
        ("offset=501", "IOTDA.000006"),
        ("marker=xyz", "IOTDA.000006"),
        ("limit=abc", "IOTDA.000006"),
        ("bogus=1", "IOTDA.000006"),
    ] {
        let r = server
            .api
            .call("GET", &format!("/devices?{query}"), None)
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (400, Some(code)),
            "{query}: {}",
            r.body
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn resource_lifecycle_errors() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, _) = server.device(&product, "life-1").await;
    let r = server
        .api
        .call("DELETE", &format!("/products/{product}"), None)
        .await
        .unwrap();
    assert_eq!(
        r.status, 409,
        "a product with devices cannot be deleted: {}",
        r.body
    );
    let r = server
        .api
        .call(
            "POST",
            "/devices",
            Some(&json!({"node_id": "life-1", "product_id": product})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 409);
    let r = server
        .api
        .call(
            "POST",
            "/devices",
            Some(&json!({"node_id": "x", "product_id": "no-such-product"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (404, Some("IOTDA.013000"))
    );
    let r = server
        .api
        .call(
            "POST",
            &format!("/devices/{device_id}/action?action_id=explode"),
            Some(&json!({})),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = server
        .api
        .call("DELETE", &format!("/devices/{device_id}"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let r = server
        .api
        .call("GET", &format!("/devices/{device_id}"), None)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (404, Some("IOTDA.014000"))
    );
    let r = server
        .api
        .call("DELETE", &format!("/products/{product}"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    server.stop().await;
}
