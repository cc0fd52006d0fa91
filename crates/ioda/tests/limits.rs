//! Limits that protect the platform from its peers, and retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ioda::client::RawRequest;
use ioda_engine::ManualClock;
use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_connection_holds_at_most_100_subscriptions() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "lim-1").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    let mut codes = Vec::new();
    for i in 0..101 {
        client
            .subscribe(
                format!("$oc/devices/{device_id}/user/t{i}"),
                QoS::AtMostOnce,
            )
            .await
            .unwrap();
        let Event::Incoming(Packet::SubAck(ack)) = drive(&mut events, 5, |e| {
            matches!(e, Event::Incoming(Packet::SubAck(_)))
        })
        .await
        .unwrap() else {
            unreachable!()
        };
        codes.extend(ack.return_codes);
    }
    assert!(
        codes[..100]
            .iter()
            .all(|c| *c == SubscribeReasonCode::Success(QoS::AtMostOnce))
    );
    assert_eq!(codes[100], SubscribeReasonCode::Failure);
    // Re-subscribing to a filter it holds is still fine.
    client
        .subscribe(format!("$oc/devices/{device_id}/user/t0"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let Event::Incoming(Packet::SubAck(ack)) = drive(&mut events, 5, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap() else {
        unreachable!()
    };
    assert_eq!(
        ack.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // The refusal is traced from a task of its own (SUBSCRIBE is answered without waiting for
    // the store), so the entry may land just after the SUBACK.
    eventually("the refused subscription is traced", || async {
        server
            .trace_kinds(&device_id)
            .await
            .contains(&"subscribe_refused".to_owned())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_connect_is_refused_before_authentication() {
    let server = server().await;
    let mut socket = TcpStream::connect(("127.0.0.1", server.mqtt_port))
        .await
        .unwrap();
    let big = "x".repeat(20 * 1024);
    socket
        .write_all(&raw_connect("c_0_0_2025041401", "u", &big, 60))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a CONNACK");
    server.stop().await;
}

#[tokio::test]
async fn an_unsigned_content_hash_cannot_stand_in_for_the_body() {
    let server = server().await;
    let path = server.api.full_path("/products");
    let signed_body = b"{}".to_vec();
    let hash = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"; // sha256("{}")
    let request = RawRequest {
        method: "POST".into(),
        path,
        body: signed_body,
        tampered_body: Some(json!({"name": "evil", "device_type": "t", "protocol_type": "MQTT", "service_capabilities": []}).to_string().into_bytes()),
        extra_headers: vec![("x-sdk-content-sha256".into(), hash.into())],
        ..Default::default()
    };
    let r = server.api.send(request).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(server.get("/products").await["page"]["count"], 0);
    server.stop().await;
}

#[tokio::test]
async fn uncacheable_messages_fail_at_once_when_the_device_is_away() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, _) = server.device(&product, "lim-2").await;
    let r = server
        .post(
            &format!("/devices/{device_id}/messages"),
            json!({"message": "now or never", "ttl": 0}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["result"]["status"].as_str()),
        (201, Some("FAILED")),
        "{}",
        r.body
    );
    server.stop().await;
}

#[tokio::test]
async fn stored_history_is_kept_for_the_retention_period_only() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| {
            c.signature_window_ms = i64::MAX / 4;
            c.engine.history_retention_ms = 7 * 86_400_000;
        },
        clock.clone(),
    )
    .await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "lim-3").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    report_acked(&client, &mut events, &device_id, json!({"count": 1})).await;
    let history_path = format!("/devices/{device_id}/property-history");
    clock.advance(7 * 86_400_000 - 1_000);
    server.platform().tick().await.unwrap();
    assert_eq!(
        server.get(&history_path).await["reports"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    clock.advance(2_000);
    server.platform().tick().await.unwrap();
    assert_eq!(
        server.get(&history_path).await["reports"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let shadow = server.get(&format!("/devices/{device_id}/shadow")).await;
    assert_eq!(
        shadow["shadow"][0]["reported"]["properties"],
        json!({"count": 1}),
        "the shadow stays"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_never_blocks_the_api() {
    let server = server_with(|c| c.mqtt_write_timeout = Duration::from_millis(500)).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "lim-4").await;
    let socket = raw_device(server.mqtt_port, &device_id, &secret, 60).await;
    // From here on the client reads nothing; the platform keeps sending 200 KB messages.
    let big = "x".repeat(200 * 1024);
    let mut slowest = Duration::ZERO;
    for _ in 0..120 {
        let started = std::time::Instant::now();
        let r = server
            .post(
                &format!("/devices/{device_id}/messages"),
                json!({ "message": big }),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        slowest = slowest.max(started.elapsed());
        if server.status(&device_id).await == "OFFLINE" {
            break;
        }
    }
    assert!(
        slowest < Duration::from_secs(5),
        "an API call waited {slowest:?} on a stalled device"
    );
    eventually("the stalled connection is dropped", || async {
        server.status(&device_id).await == "OFFLINE"
    })
    .await;
    drop(socket);
    server.stop().await;
}
