//! HTTPS device access: `POST /v5/device-auth` for a token, then uplink-only publishes; each kind
//! of bad request answered in IoTDA's error shape, tokens expiring, the rate limit, and nothing
//! pushed to a device that cannot be reached.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{TestServer, hour_stamp, server, server_on, tls_handshake};
use ioda_engine::ManualClock;
use openssl::ssl::SslVersion;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request over TLS (verified with ioda's CA): the status and the body as JSON
/// (`Value::Null` when empty).
async fn request(
    server: &TestServer,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let port = server.running.as_ref().unwrap().https_addr.unwrap().port();
    let ca = server.dir.path().join("tls/ca.pem");
    let mut tls = tls_handshake(port, &ca, SslVersion::TLS1_2, None)
        .await
        .expect("TLS 1.2, verified with ioda's CA");
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("access_token: {token}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    // The server may close before it has read a refused body whole.
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn post(server: &TestServer, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    request(server, path, token, body.to_string().as_bytes()).await
}

/// `POST /v5/device-auth` with the device's secret: the token.
async fn authenticate(server: &TestServer, device_id: &str, secret: &str) -> String {
    let ts = hour_stamp();
    let password = ioda_engine::auth::device_password(secret, &ts);
    let body =
        json!({"device_id": device_id, "sign_type": 0, "timestamp": ts, "password": password});
    let (status, answer) = post(server, "/v5/device-auth", None, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["expires_in"], 86_399);
    let token = answer["access_token"].as_str().unwrap().to_owned();
    assert!((32..=256).contains(&token.len()), "{token}");
    token
}

fn report_path(device_id: &str) -> String {
    format!("/v5/devices/{device_id}/sys/properties/report")
}

fn report(properties: Value) -> Value {
    json!({"services": [{"service_id": "Temperature", "properties": properties}]})
}

fn assert_error(answer: (u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error_code"], code, "{}", answer.1);
    assert!(
        answer.1["error_msg"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn a_device_authenticates_reports_and_sends_messages_over_https() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "https-1").await;
    server.start_trace(&device_id).await;
    let token = authenticate(&server, &device_id, &secret).await;

    let sent = post(
        &server,
        &report_path(&device_id),
        Some(&token),
        report(json!({"temp": 9.5})),
    )
    .await;
    assert_eq!(sent.0, 200, "{}", sent.1);
    server.wait_reported(&device_id, json!({"temp": 9.5})).await;
    // No connection to watch: the status follows the data, as an NB-IoT device's does.
    server.wait_status(&device_id, "ONLINE").await;

    let message = json!({"name": "hello", "id": "m-1", "content": "from https"});
    let path = format!("/v5/devices/{device_id}/sys/messages/up");
    let sent = post(&server, &path, Some(&token), message).await;
    assert_eq!(sent.0, 200, "{}", sent.1);
    server.wait_trace(&device_id, "message_stored").await;

    // Authenticating again gives a new token; the previous one still serves for 30 s.
    let renewed = authenticate(&server, &device_id, &secret).await;
    assert_ne!(renewed, token);
    for token in [&token, &renewed] {
        let sent = post(
            &server,
            &report_path(&device_id),
            Some(token),
            report(json!({"temp": 10.0})),
        )
        .await;
        assert_eq!(sent.0, 200, "{}", sent.1);
    }

    // HTTPS access is uplink only: a message for the device waits as for an offline device.
    let created = server
        .post(
            &format!("/devices/{device_id}/messages"),
            json!({"message": "for later"}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let message_id = created.body["message_id"].as_str().unwrap().to_owned();
    post(
        &server,
        &report_path(&device_id),
        Some(&renewed),
        report(json!({"temp": 11.0})),
    )
    .await;
    server
        .wait_reported(&device_id, json!({"temp": 11.0}))
        .await;
    let shown = server
        .get(&format!("/devices/{device_id}/messages/{message_id}"))
        .await;
    assert_eq!(shown["status"], "PENDING", "{shown}");
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_are_answered_in_iotdas_error_shape_and_lose_nothing() {
    let server = common::server_with(|c| c.engine.max_payload = 2048).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "https-bad").await;
    let (other_id, other_secret) = server.device(&product, "https-other").await;
    let ts = hour_stamp();
    let password = ioda_engine::auth::device_password(&secret, &ts);

    let auth = "/v5/device-auth";
    assert_error(
        request(&server, auth, None, b"{not json").await,
        400,
        "IOTDA.000006",
    );
    let missing = json!({"device_id": device_id, "timestamp": ts, "password": password});
    assert_error(
        post(&server, auth, None, missing).await,
        400,
        "IOTDA.000006",
    );
    let bad_stamp = json!({"device_id": device_id, "sign_type": 0, "timestamp": "2026-11-28", "password": password});
    assert_error(
        post(&server, auth, None, bad_stamp).await,
        400,
        "IOTDA.000006",
    );
    let wrong = json!({"device_id": device_id, "sign_type": 0, "timestamp": ts, "password": "0".repeat(64)});
    assert_error(post(&server, auth, None, wrong).await, 401, "IOTDA.000002");
    let unknown =
        json!({"device_id": "nobody", "sign_type": 0, "timestamp": ts, "password": password});
    assert_error(
        post(&server, auth, None, unknown).await,
        401,
        "IOTDA.000002",
    );

    let token = authenticate(&server, &device_id, &secret).await;
    let other_token = authenticate(&server, &other_id, &other_secret).await;
    let path = report_path(&device_id);
    let good = report(json!({"temp": 1.0}));
    assert_error(
        post(&server, &path, None, good.clone()).await,
        403,
        "IOTDA.000004",
    );
    assert_error(
        post(&server, &path, Some("forged"), good.clone()).await,
        403,
        "IOTDA.000004",
    );
    assert_error(
        post(&server, &path, Some(&other_token), good.clone()).await,
        403,
        "IOTDA.000004",
    );
    assert_error(
        request(&server, &path, Some(&token), b"[1, 2").await,
        400,
        "IOTDA.000006",
    );
    assert_error(
        post(&server, &path, Some(&token), json!({"services": 5})).await,
        400,
        "IOTDA.000006",
    );
    let huge = report(json!({"note": "x".repeat(4096)}));
    assert_error(
        post(&server, &path, Some(&token), huge).await,
        413,
        "IOTDA.000006",
    );
    let elsewhere = format!("/v5/devices/{device_id}/sys/events/up");
    assert_error(
        post(&server, &elsewhere, Some(&token), good.clone()).await,
        404,
        "IOTDA.000001",
    );

    // None of that stopped the device's good report.
    assert_eq!(post(&server, &path, Some(&token), good).await.0, 200);
    server.wait_reported(&device_id, json!({"temp": 1.0})).await;

    // A frozen device is refused, with or without a token.
    let frozen = server
        .post(&format!("/devices/{device_id}/freeze"), json!({}))
        .await;
    assert!(frozen.status < 300, "{}", frozen.body);
    let report_again = post(&server, &path, Some(&token), report(json!({"temp": 2.0}))).await;
    assert_error(report_again, 403, "IOTDA.000004");
    let auth_again =
        json!({"device_id": device_id, "sign_type": 0, "timestamp": ts, "password": password});
    assert_error(
        post(&server, auth, None, auth_again).await,
        403,
        "IOTDA.000004",
    );
    server.stop().await;
}

#[tokio::test]
async fn tokens_expire_and_the_rate_limit_answers_429() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = Arc::new(ManualClock::new(now));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| {
            c.engine.rate_limit = 2;
            // The signed API calls stay valid however far the clock is moved.
            c.signature_window_ms = i64::MAX / 4;
        },
        clock.clone(),
    )
    .await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "https-clock").await;
    let path = report_path(&device_id);
    let first = authenticate(&server, &device_id, &secret).await;

    // The clock stands still: two reports fit in the device's second, the third does not.
    for temp in [1.0, 2.0] {
        let sent = post(&server, &path, Some(&first), report(json!({"temp": temp}))).await;
        assert_eq!(sent.0, 200, "{}", sent.1);
    }
    let third = post(&server, &path, Some(&first), report(json!({"temp": 3.0}))).await;
    assert_error(third, 429, "IOTDA.021101");
    clock.advance(1_000);
    let sent = post(&server, &path, Some(&first), report(json!({"temp": 4.0}))).await;
    assert_eq!(sent.0, 200, "{}", sent.1);

    // A new token leaves the previous one 30 s.
    let second = authenticate(&server, &device_id, &secret).await;
    clock.advance(30_001);
    let late = post(&server, &path, Some(&first), report(json!({"temp": 5.0}))).await;
    assert_error(late, 403, "IOTDA.000004");
    let sent = post(&server, &path, Some(&second), report(json!({"temp": 6.0}))).await;
    assert_eq!(sent.0, 200, "{}", sent.1);
    server.wait_reported(&device_id, json!({"temp": 6.0})).await;
    // And a token lasts a day.
    clock.advance(86_400_000);
    let expired = post(&server, &path, Some(&second), report(json!({"temp": 7.0}))).await;
    assert_error(expired, 403, "IOTDA.000004");

    // The status follows the data: ABNORMAL after 25 h without any...
    let platform = server.platform().clone();
    platform.tick().await.unwrap();
    assert_eq!(server.status(&device_id).await, "ONLINE");
    clock.advance(3_600_000);
    platform.tick().await.unwrap();
    assert_eq!(server.status(&device_id).await, "ABNORMAL");
    // ...until the device connects over MQTT: then the connection decides, not the data timers,
    // even when it also reports over HTTPS meanwhile.
    let options = common::device_options(server.mqtt_port, &device_id, &secret, 60);
    let (_client, _events) = common::connect(options).await.expect("CONNACK");
    server.wait_status(&device_id, "ONLINE").await;
    let third = authenticate(&server, &device_id, &secret).await;
    let sent = post(&server, &path, Some(&third), report(json!({"temp": 8.0}))).await;
    assert_eq!(sent.0, 200, "{}", sent.1);
    clock.advance(50 * 3_600_000);
    platform.tick().await.unwrap();
    assert_eq!(server.status(&device_id).await, "ONLINE");
    server.stop().await;
}

#[tokio::test]
async fn a_token_does_not_outlive_its_device_or_its_secret() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "https-again").await;
    let path = report_path(&device_id);
    let token = authenticate(&server, &device_id, &secret).await;
    assert_eq!(
        post(&server, &path, Some(&token), report(json!({"temp": 1.0})))
            .await
            .0,
        200
    );

    // A new secret: the token of the old one is refused; the new secret's works.
    let reset = server
        .post(
            &format!("/devices/{device_id}/action?action_id=resetSecret"),
            json!({"secret": "the-new-secret-1"}),
        )
        .await;
    assert!(reset.status < 300, "{}", reset.body);
    let refused = post(&server, &path, Some(&token), report(json!({"temp": 2.0}))).await;
    assert_error(refused, 403, "IOTDA.000004");
    let token = authenticate(&server, &device_id, "the-new-secret-1").await;
    assert_eq!(
        post(&server, &path, Some(&token), report(json!({"temp": 3.0})))
            .await
            .0,
        200
    );

    // Deleted and registered again under the same id: the old registration's token is refused.
    let deleted = server
        .api
        .call("DELETE", &format!("/devices/{device_id}"), None)
        .await
        .unwrap();
    assert!(deleted.status < 300, "{}", deleted.body);
    let (again, secret) = server.device(&product, "https-again").await;
    assert_eq!(again, device_id);
    let refused = post(&server, &path, Some(&token), report(json!({"temp": 4.0}))).await;
    assert_error(refused, 403, "IOTDA.000004");
    let token = authenticate(&server, &device_id, &secret).await;
    assert_eq!(
        post(&server, &path, Some(&token), report(json!({"temp": 5.0})))
            .await
            .0,
        200
    );
    server.wait_reported(&device_id, json!({"temp": 5.0})).await;
    server.stop().await;
}

#[tokio::test]
async fn a_gateway_reports_its_children_over_https() {
    let server = server().await;
    let product = server.product().await;
    let (gateway_id, secret) = server.device(&product, "https-gw").await;
    let body = json!({"node_id": "https-child", "product_id": product, "gateway_id": gateway_id});
    let created = server.post("/devices", body).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let child_id = created.body["device_id"].as_str().unwrap().to_owned();
    let token = authenticate(&server, &gateway_id, &secret).await;
    // IoTDA spells the HTTPS resource with a hyphen.
    let path = format!("/v5/devices/{gateway_id}/sys/gateway/sub-devices/properties/report");

    let children = json!({"devices": [{"device_id": child_id, "services": [{"service_id": "Temperature", "properties": {"temp": 4.5}}]}]});
    let sent = post(&server, &path, Some(&token), children).await;
    assert_eq!(sent.0, 200, "{}", sent.1);
    server.wait_reported(&child_id, json!({"temp": 4.5})).await;

    // Fifty children at most over HTTPS, and a body that is no batch report, are refused.
    let many: Vec<Value> = (0..51)
        .map(|i| json!({"device_id": format!("c{i}"), "services": []}))
        .collect();
    let refused = post(&server, &path, Some(&token), json!({ "devices": many })).await;
    assert_error(refused, 400, "IOTDA.000006");
    let refused = post(&server, &path, Some(&token), report(json!({"temp": 1}))).await;
    assert_error(refused, 400, "IOTDA.000006");
    server.stop().await;
}
