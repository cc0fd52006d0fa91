//! MQTT device access end to end: real sockets, rumqttc (3.1.1 and 5) and hand-made packets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ioda_types::{DeviceStatus, PlatformEvent, StatusCause};
use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet, QoS, SubscribeReasonCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn report_topic(device_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/properties/report")
}

async fn publish_and_ack(
    client: &rumqttc::AsyncClient,
    events: &mut rumqttc::EventLoop,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), String> {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    drive(events, 5, |e| {
        matches!(e, Event::Incoming(Packet::PubAck(_)))
    })
    .await
    .map(|_| ())
}

#[tokio::test]
async fn device_reports_properties_into_shadow_history_and_events() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-1").await;
    assert_eq!(server.status(&device_id).await, "INACTIVE");
    let mut bus = server.running.as_ref().unwrap().platform.bus().subscribe();

    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    assert_eq!(server.status(&device_id).await, "ONLINE");
    let report = json!({"services": [{"service_id": "Temperature", "properties": {"temp": 21.5, "mode": "auto"}, "event_time": "20250414T010203Z"}]});
    publish_and_ack(
        &client,
        &mut events,
        &report_topic(&device_id),
        report.to_string().into_bytes(),
    )
    .await
    .unwrap();

    // The PUBACK came after the commit, so the shadow already holds the report.
    let shadow = server.get(&format!("/devices/{device_id}/shadow")).await;
    let service = &shadow["shadow"][0];
    assert_eq!(service["service_id"], "Temperature");
    assert_eq!(
        service["reported"]["properties"],
        json!({"temp": 21.5, "mode": "auto"})
    );
    assert_eq!(service["reported"]["event_time"], "20250414T010203Z");
    assert_eq!(service["version"], 1);
    let history = server
        .get(&format!("/devices/{device_id}/property-history"))
        .await;
    assert_eq!(
        history["reports"][0]["properties"],
        json!({"temp": 21.5, "mode": "auto"})
    );

    let mut saw_online = false;
    let mut saw_report = false;
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(200), bus.recv()).await {
        match &*event {
            PlatformEvent::DeviceStatusChanged {
                status: DeviceStatus::Online,
                cause: StatusCause::Connected,
                device,
                ..
            } => {
                saw_online = device.device_id == device_id;
            }
            PlatformEvent::PropertiesReported {
                services, device, ..
            } => {
                saw_report =
                    device.device_id == device_id && services[0].properties["temp"] == json!(21.5);
            }
            _ => {}
        }
    }
    assert!(
        saw_online && saw_report,
        "online {saw_online}, report {saw_report}"
    );

    client.disconnect().await.unwrap();
    let _ = drive(&mut events, 2, |_| false).await;
    eventually("OFFLINE after disconnect", || async {
        server.status(&device_id).await == "OFFLINE"
    })
    .await;
    let device = server.get(&format!("/devices/{device_id}")).await;
    assert!(
        device["active_time"].is_string() && device["last_offline_time"].is_string(),
        "{device}"
    );
    server.stop().await;
}

#[tokio::test]
async fn connect_refusals_use_iotda_connack_codes() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-2").await;
    let port = server.mqtt_port;
    let refused = |r: Result<_, ConnectionError>| match r {
        Err(ConnectionError::ConnectionRefused(code)) => Some(code),
        _ => None,
    };
    let wrong = device_options(port, &device_id, "not-the-secret", 60);
    assert_eq!(
        refused(connect(wrong).await),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    let unknown = device_options(port, "no-such-device", &secret, 60);
    assert_eq!(
        refused(connect(unknown).await),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    let keepalive = device_options(port, &device_id, &secret, 10);
    assert_eq!(
        refused(connect(keepalive).await),
        Some(ConnectReturnCode::BadClientId)
    );
    let mut bad_id = device_options(port, &device_id, &secret, 60);
    bad_id.set_client_id("not-an-iotda-client-id".into());
    assert_eq!(
        refused(connect(bad_id).await),
        Some(ConnectReturnCode::BadClientId)
    );

    let r = server
        .api
        .call("POST", &format!("/devices/{device_id}/freeze"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(server.status(&device_id).await, "FROZEN");
    let frozen = device_options(port, &device_id, &secret, 60);
    assert_eq!(
        refused(connect(frozen).await),
        Some(ConnectReturnCode::NotAuthorized)
    );
    let r = server
        .api
        .call("POST", &format!("/devices/{device_id}/unfreeze"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert!(
        connect(device_options(port, &device_id, &secret, 60))
            .await
            .is_ok()
    );

    let trace = server.get(&format!("/devices/{device_id}/trace")).await;
    let reasons: Vec<String> = trace["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"]["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    for expected in [
        "wrong password",
        "keepalive outside the accepted range",
        "device is frozen",
    ] {
        assert!(
            reasons.iter().any(|r| r == expected),
            "{expected} not in {reasons:?}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_second_connection_takes_over_and_status_stays_online() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-3").await;
    let (_first, mut first_events) =
        connect(device_options(server.mqtt_port, &device_id, &secret, 60))
            .await
            .unwrap();
    let (second, mut second_events) =
        connect(device_options(server.mqtt_port, &device_id, &secret, 60))
            .await
            .unwrap();
    let first_end = drive(&mut first_events, 5, |_| false).await;
    assert!(
        first_end.is_err() && first_end != Err("timed out".into()),
        "first connection must be closed: {first_end:?}"
    );
    assert_eq!(server.status(&device_id).await, "ONLINE");
    let report = json!({"services": [{"service_id": "Temperature", "properties": {"count": 1}}]});
    publish_and_ack(
        &second,
        &mut second_events,
        &report_topic(&device_id),
        report.to_string().into_bytes(),
    )
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn keepalive_expiry_closes_the_connection_and_marks_offline() {
    let server = server_with(|c| c.engine.keepalive_min = 1).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-4").await;
    let mut bus = server.running.as_ref().unwrap().platform.bus().subscribe();
    let mut socket = raw_device(server.mqtt_port, &device_id, &secret, 1).await;
    // Silent client: the server must give up after 1.5 x keepalive.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed after {:?}",
        started.elapsed()
    );
    eventually("OFFLINE after keepalive expiry", || async {
        server.status(&device_id).await == "OFFLINE"
    })
    .await;
    let mut cause = None;
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(200), bus.recv()).await {
        if let PlatformEvent::DeviceStatusChanged {
            status: DeviceStatus::Offline,
            cause: c,
            ..
        } = &*event
        {
            cause = Some(*c);
        }
    }
    assert_eq!(cause, Some(StatusCause::KeepaliveExpired));
    server.stop().await;
}

#[tokio::test]
async fn model_mismatches_are_traced_and_valid_properties_applied() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-5").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    let report = json!({"services": [
        {"service_id": "Temperature", "properties": {"temp": 500, "count": 7, "mode": "eco", "ghost": 1, "count_typo": "x"}},
        {"service_id": "NoSuchService", "properties": {"a": 1}}
    ]});
    publish_and_ack(
        &client,
        &mut events,
        &report_topic(&device_id),
        report.to_string().into_bytes(),
    )
    .await
    .unwrap();
    let shadow = server.get(&format!("/devices/{device_id}/shadow")).await;
    assert_eq!(
        shadow["shadow"][0]["reported"]["properties"],
        json!({"count": 7})
    );
    assert_eq!(shadow["shadow"].as_array().unwrap().len(), 1);
    let trace = server.get(&format!("/devices/{device_id}/trace")).await;
    let mut rejected: Vec<(String, String)> = trace["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "property_rejected")
        .map(|e| {
            (
                e["detail"]["property"].as_str().unwrap_or("*").to_owned(),
                e["detail"]["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    rejected.sort();
    assert_eq!(
        rejected,
        vec![
            ("*".into(), "service is not in the product model".into()),
            (
                "count_typo".into(),
                "property is not in the product model".into()
            ),
            (
                "ghost".into(),
                "property is not in the product model".into()
            ),
            ("mode".into(), "value is not in enum_list".into()),
            ("temp".into(), "value is above the maximum 120".into()),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_report_is_acknowledged_traced_and_changes_nothing() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-6").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    for bad in [
        &b"{not json"[..],
        br#"{"services": 5}"#,
        br#"{"services": [{"service_id": 1, "properties": {}}]}"#,
    ] {
        publish_and_ack(
            &client,
            &mut events,
            &report_topic(&device_id),
            bad.to_vec(),
        )
        .await
        .unwrap();
    }
    let kinds = server.trace_kinds(&device_id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "report_malformed").count(),
        3,
        "{kinds:?}"
    );
    let shadow = server.get(&format!("/devices/{device_id}/shadow")).await;
    assert_eq!(shadow["shadow"], json!([]));
    // The connection is still usable.
    let good = json!({"services": [{"service_id": "Temperature", "properties": {"count": 2}}]});
    publish_and_ack(
        &client,
        &mut events,
        &report_topic(&device_id),
        good.to_string().into_bytes(),
    )
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn oversize_payload_closes_the_connection_and_is_traced() {
    let server = server_with(|c| c.engine.max_payload = 1024).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-7").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    let big = vec![b'x'; 2000];
    let result = publish_and_ack(
        &client,
        &mut events,
        &format!("$oc/devices/{device_id}/sys/messages/up"),
        big,
    )
    .await;
    assert!(
        result.is_err(),
        "an oversize publish must not be acknowledged"
    );
    eventually("payload_too_large traced", || async {
        server
            .trace_kinds(&device_id)
            .await
            .contains(&"payload_too_large".to_owned())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn cross_device_topics_are_refused() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-8").await;
    let (other_id, _) = server.device(&product, "node-9").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    client
        .subscribe(
            format!("$oc/devices/{other_id}/sys/commands/#"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let suback = drive(&mut events, 5, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap();
    let Event::Incoming(Packet::SubAck(suback)) = suback else {
        unreachable!()
    };
    assert_eq!(suback.return_codes, vec![SubscribeReasonCode::Failure]);
    client
        .subscribe(
            format!("$oc/devices/{device_id}/sys/commands/#"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let suback = drive(&mut events, 5, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap();
    let Event::Incoming(Packet::SubAck(suback)) = suback else {
        unreachable!()
    };
    assert_eq!(
        suback.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    let report = json!({"services": [{"service_id": "Temperature", "properties": {"count": 3}}]});
    let result = publish_and_ack(
        &client,
        &mut events,
        &report_topic(&other_id),
        report.to_string().into_bytes(),
    )
    .await;
    assert!(
        result.is_err(),
        "MQTT 3.1.1: a denied publish closes the connection"
    );
    let kinds = server.trace_kinds(&device_id).await;
    assert!(
        kinds.contains(&"publish_denied".into()) && kinds.contains(&"subscribe_denied".into()),
        "{kinds:?}"
    );
    let other_shadow = server.get(&format!("/devices/{other_id}/shadow")).await;
    assert_eq!(other_shadow["shadow"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn mqtt5_gets_reason_codes_for_denied_and_rate_limited_publishes() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason};
    use rumqttc::v5::{AsyncClient, Event as E5};
    // Platform time stands still, so no token comes back while the burst is answered (each
    // refusal waits for its trace entry to commit, which may take long on a loaded machine).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let clock = std::sync::Arc::new(ioda_engine::ManualClock::new(now));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| c.engine.rate_limit = 5,
        clock,
    )
    .await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-10").await;
    let options = device_options_v5(server.mqtt_port, &device_id, &secret);
    let (client, mut events) = AsyncClient::new(options, 64);
    let report = json!({"services": [{"service_id": "Temperature", "properties": {"count": 4}}]})
        .to_string();
    client
        .publish(
            "$oc/devices/other/sys/properties/report",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            report.clone(),
        )
        .await
        .unwrap();
    for _ in 0..12 {
        client
            .publish(
                report_topic(&device_id),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                report.clone(),
            )
            .await
            .unwrap();
    }
    let mut reasons = Vec::new();
    while reasons.len() < 13 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.poll())
            .await
            .unwrap()
            .unwrap();
        if let E5::Incoming(P5::PubAck(ack)) = event {
            reasons.push(ack.reason);
        }
    }
    assert_eq!(reasons[0], PubAckReason::NotAuthorized);
    let ok = reasons
        .iter()
        .filter(|r| **r == PubAckReason::Success)
        .count();
    let limited = reasons
        .iter()
        .filter(|r| **r == PubAckReason::QuotaExceeded)
        .count();
    // The denied publish took one of the five tokens; order is kept, so the successes come first.
    assert!(ok == 4 && limited == 8, "{reasons:?}");
    assert!(
        reasons[1..=ok].iter().all(|r| *r == PubAckReason::Success),
        "{reasons:?}"
    );
    let kinds = server.trace_kinds(&device_id).await;
    assert!(
        kinds.contains(&"rate_limited".into()) && kinds.contains(&"publish_denied".into()),
        "{kinds:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_packets_close_the_connection() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-11").await;
    // Garbage instead of CONNECT.
    let mut socket = TcpStream::connect(("127.0.0.1", server.mqtt_port))
        .await
        .unwrap();
    socket.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "no CONNACK for garbage");
    // A QoS 2 publish after a valid CONNECT.
    let mut socket = raw_device(server.mqtt_port, &device_id, &secret, 60).await;
    let mut qos2 = raw_publish(&report_topic(&device_id), b"{}", Some(1));
    qos2[0] = 0x34;
    socket.write_all(&qos2).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    eventually("protocol_error traced", || async {
        server
            .trace_kinds(&device_id)
            .await
            .contains(&"protocol_error".to_owned())
    })
    .await;
    eventually("OFFLINE after protocol error", || async {
        server.status(&device_id).await == "OFFLINE"
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_tells_mqtt5_clients_why_and_marks_them_offline() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet as P5};
    use rumqttc::v5::{AsyncClient, Event as E5};
    let mut server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-12").await;
    let options = device_options_v5(server.mqtt_port, &device_id, &secret);
    let (_client, mut events) = AsyncClient::new(options, 8);
    loop {
        if let E5::Incoming(P5::ConnAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let running = server.running.take().unwrap();
    let stopping = tokio::spawn(running.stop());
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll())
            .await
            .unwrap()
        {
            Ok(E5::Incoming(P5::Disconnect(d))) => break Some(d.reason_code),
            Ok(_) => continue,
            // rumqttc surfaces a server DISCONNECT as a state error carrying the reason.
            Err(rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
            )) => {
                break Some(reason_code);
            }
            Err(_) => break None,
        }
    };
    assert_eq!(reason, Some(DisconnectReasonCode::ServerShuttingDown));
    stopping.await.unwrap().unwrap();
    // The OFFLINE written during shutdown is on disk: a restart shows it.
    let config = ioda::config::ServeConfig::ephemeral(server.dir.path());
    let restarted = ioda::serve::start(config).await.unwrap();
    let device = restarted
        .platform
        .device(&server.api.project_id, &device_id)
        .await
        .unwrap();
    assert_eq!(device.status, ioda_types::DeviceStatus::Offline);
    assert!(device.last_offline_at.is_some());
    restarted.stop().await.unwrap();
}

#[tokio::test]
async fn sign_type_1_checks_the_timestamp_against_the_clock() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-13").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let with_stamp = |sign_type: u8, ms: i64| {
        let ts = ioda_types::time::format_hour_stamp(ms);
        let mut options = device_options(server.mqtt_port, &device_id, &secret, 60);
        options.set_client_id(format!("{device_id}_0_{sign_type}_{ts}"));
        options.set_credentials(
            device_id.clone(),
            ioda_engine::auth::device_password(&secret, &ts),
        );
        options
    };
    let five_hours = 5 * 3_600_000;
    assert!(connect(with_stamp(1, now)).await.is_ok());
    let stale = connect(with_stamp(1, now - five_hours)).await.err();
    assert!(
        matches!(
            stale,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "{stale:?}"
    );
    // Sign type 0 does not compare the timestamp with the clock.
    assert!(connect(with_stamp(0, now - five_hours)).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn messages_and_custom_topics_are_stored_and_published_as_events() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-14").await;
    let mut bus = server.running.as_ref().unwrap().platform.bus().subscribe();
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    let up = format!("$oc/devices/{device_id}/sys/messages/up?request_id=req-1");
    publish_and_ack(&client, &mut events, &up, b"\x00\x01binary".to_vec())
        .await
        .unwrap();
    let custom = format!("$oc/devices/{device_id}/user/telemetry");
    publish_and_ack(&client, &mut events, &custom, b"hello".to_vec())
        .await
        .unwrap();
    let stored = server
        .running
        .as_ref()
        .unwrap()
        .platform
        .store()
        .message_count(device_id.clone())
        .await
        .unwrap();
    assert_eq!(stored, 2);
    let mut seen = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(200), bus.recv()).await {
        if let PlatformEvent::MessageReported {
            topic,
            payload,
            request_id,
            ..
        } = &*event
        {
            seen.push((topic.clone(), payload.to_vec(), request_id.clone()));
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0],
        (
            format!("$oc/devices/{device_id}/sys/messages/up"),
            b"\x00\x01binary".to_vec(),
            "req-1".to_owned()
        )
    );
    assert_eq!(
        (seen[1].0.as_str(), seen[1].1.as_slice()),
        (custom.as_str(), &b"hello"[..])
    );
    server.stop().await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn gzip_reports_are_inflated_within_the_payload_limit() {
    let server = server_with(|c| c.engine.max_payload = 64 * 1024).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-15").await;
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    let topic = format!("{}?encoding=gzip", report_topic(&device_id));
    let report = json!({"services": [{"service_id": "Temperature", "properties": {"temp": 12.5}}]});
    publish_and_ack(
        &client,
        &mut events,
        &topic,
        gzip(report.to_string().as_bytes()),
    )
    .await
    .unwrap();
    let shadow = server.get(&format!("/devices/{device_id}/shadow")).await;
    assert_eq!(
        shadow["shadow"][0]["reported"]["properties"],
        json!({"temp": 12.5})
    );
    // Not gzip at all, and a small payload that inflates past the limit: both refused and traced.
    publish_and_ack(&client, &mut events, &topic, b"plain text".to_vec())
        .await
        .unwrap();
    let bomb = gzip(&vec![b' '; 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    publish_and_ack(&client, &mut events, &topic, bomb)
        .await
        .unwrap();
    let trace = server.get(&format!("/devices/{device_id}/trace")).await;
    let errors: Vec<String> = trace["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "payload_rejected")
        .map(|e| e["detail"]["error"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("beyond"))
            && errors.iter().any(|e| e.contains("not valid gzip")),
        "{errors:?}"
    );
    server.stop().await;
}

/// `/metrics` (unsigned, Prometheus text) counts where each QoS 1 acknowledgement spent its time.
#[tokio::test]
async fn puback_stages_are_counted_in_metrics() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "node-metrics").await;
    let http = server.running.as_ref().unwrap().http_addr;
    let before = scrape(http).await;
    let commits_before = stage_count(&before, "commit");
    let jobs_before = series_count(&before, "ioda_store_job_commit_seconds_count ");
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    let good = json!({"services": [{"service_id": "Temperature", "properties": {"temp": 1}}]});
    // A QoS 0 report has no acknowledgement to count (and is handled before the next one).
    client
        .publish(
            report_topic(&device_id),
            QoS::AtMostOnce,
            false,
            good.to_string(),
        )
        .await
        .unwrap();
    for payload in [
        good.to_string().into_bytes(),
        b"{not json".to_vec(),
        good.to_string().into_bytes(),
    ] {
        publish_and_ack(&client, &mut events, &report_topic(&device_id), payload)
            .await
            .unwrap();
    }

    let text = scrape(http).await;
    // Other tests of this binary may share the process (`cargo test`), never fewer.
    let commits = stage_count(&text, "commit") - commits_before;
    assert!(commits >= 3, "{text}");
    if std::env::var_os("NEXTEST").is_some() {
        assert_eq!(commits, 3, "{text}");
    }
    assert!(text.contains("# TYPE ioda_mqtt_puback_stage_seconds histogram"));
    assert!(text.contains(r#"ioda_mqtt_puback_stage_seconds_bucket{stage="write",le="+Inf"}"#));
    // The two acknowledged good reports were write jobs of the store.
    let jobs = series_count(&text, "ioda_store_job_commit_seconds_count ") - jobs_before;
    assert!(jobs >= 2, "{text}");
    server.stop().await;
}

/// GETs `/metrics` without a signature; checks the status and content type.
async fn scrape(http: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(http).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: ioda\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    body.to_owned()
}

fn stage_count(text: &str, stage: &str) -> u64 {
    series_count(
        text,
        &format!("ioda_mqtt_puback_stage_seconds_count{{stage=\"{stage}\"}} "),
    )
}

fn series_count(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {text}"))
}
