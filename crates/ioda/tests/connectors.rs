//! Forwarding to real brokers and databases on this machine: Mosquitto (MQTT), NATS with JetStream
//! and PostgreSQL. `.ci/run` starts them when they are not running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

fn suffix() -> String {
    let mut bytes = [0u8; 6];
    getrandom_fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom_fill(bytes: &mut [u8]) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (nanos >> (i * 8)) as u8 ^ (std::process::id() as u8).wrapping_mul(i as u8 + 1);
    }
}

async fn active_rule(server: &TestServer, select: &str) -> String {
    activated_rule(
        server,
        json!({"subject": {"resource": "device.property", "event": "report"}, "select": select}),
    )
    .await
}

async fn add_action(server: &TestServer, rule_id: &str, channel: &str, detail: Value) -> String {
    let r = server
        .post(
            "/routing-rule/actions",
            json!({"rule_id": rule_id, "channel": channel, "channel_detail": detail}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["action_id"].as_str().unwrap().to_owned()
}

async fn reporting_device(server: &TestServer, node: &str) -> (String, SimDevice) {
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, node).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    (device_id, device)
}

async fn report(device: &SimDevice, device_id: &str, temp: f64) {
    let body = json!({"services": [{"service_id": "Temperature", "properties": {"temp": temp}}]});
    device
        .client
        .publish(
            format!("$oc/devices/{device_id}/sys/properties/report"),
            QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn forwards_to_an_mqtt_broker() {
    let server = server().await;
    let topic = format!("ioda-test/{}", suffix());
    let mut options = MqttOptions::new(format!("sub-{}", suffix()), "127.0.0.1", 1883);
    options.set_keep_alive(Duration::from_secs(30));
    let (subscriber, mut events) = rumqttc::AsyncClient::new(options, 16);
    subscriber
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .unwrap();
    drive(&mut events, 5, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await
    .unwrap();

    let rule_id = active_rule(&server, "").await;
    add_action(
        &server,
        &rule_id,
        "MQTT_FORWARDING",
        json!({"mqtt_forwarding": {"host": "127.0.0.1", "port": 1883, "topic": topic, "qos": 1}}),
    )
    .await;
    let (device_id, device) = reporting_device(&server, "mq-1").await;
    report(&device, &device_id, 22.5).await;
    let envelope = next_envelope(&mut events).await;
    assert_eq!(envelope["resource"], "device.property");
    assert_eq!(
        envelope["notify_data"]["header"]["device_id"],
        device_id.as_str()
    );
    assert_eq!(
        envelope["notify_data"]["body"]["services"][0]["properties"]["temp"],
        22.5
    );

    // Reports sent back to back all arrive, in order (40: within the device's rate limit).
    for i in 0..40 {
        report(&device, &device_id, f64::from(i)).await;
    }
    for i in 0..40 {
        let envelope = next_envelope(&mut events).await;
        assert_eq!(
            envelope["notify_data"]["body"]["services"][0]["properties"]["temp"],
            f64::from(i),
            "message {i} in order"
        );
    }

    let unreachable = server.post("/routing-rule/actions", json!({"rule_id": rule_id, "channel": "MQTT_FORWARDING", "channel_detail": {"mqtt_forwarding": {"host": "127.0.0.1", "port": 1, "topic": "x"}}})).await;
    assert_eq!(unreachable.status, 400, "{}", unreachable.body);
    assert!(
        unreachable.body["error_msg"]
            .as_str()
            .unwrap()
            .contains("cannot reach"),
        "{}",
        unreachable.body
    );
    device.close().await;
    server.stop().await;
}

/// The next envelope the subscriber receives.
async fn next_envelope(events: &mut rumqttc::EventLoop) -> Value {
    let Event::Incoming(Packet::Publish(publish)) = drive(events, 10, |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    .unwrap() else {
        unreachable!()
    };
    serde_json::from_slice(&publish.payload).unwrap()
}

#[tokio::test]
async fn forwards_to_nats_and_jetstream() {
    let server = server().await;
    let nats = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let subject = format!("ioda.test.{}", suffix());
    let mut subscription = nats.subscribe(subject.clone()).await.unwrap();
    nats.flush().await.unwrap();
    let stream_subject = format!("ioda.js.{}", suffix());
    let jetstream = async_nats::jetstream::new(nats.clone());
    let stream_name = stream_subject.replace('.', "_");
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![stream_subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();

    let rule_id = active_rule(
        &server,
        "notify_data.header.device_id AS id, notify_data.body.services[0].properties.temp AS temp",
    )
    .await;
    add_action(
        &server,
        &rule_id,
        "NATS_FORWARDING",
        json!({"nats_forwarding": {"url": "nats://127.0.0.1:4222", "subject": subject}}),
    )
    .await;
    add_action(&server, &rule_id, "NATS_FORWARDING", json!({"nats_forwarding": {"url": "nats://127.0.0.1:4222", "subject": stream_subject, "jetstream": true}})).await;
    let (device_id, device) = reporting_device(&server, "nats-1").await;
    report(&device, &device_id, 19.0).await;

    let message = tokio::time::timeout(Duration::from_secs(10), futures_next(&mut subscription))
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&message).unwrap(),
        json!({"id": device_id, "temp": 19.0})
    );
    // Reports sent back to back are published in batches, one confirmation each: all of them
    // arrive, in the order the device sent them (40: within the device's rate limit).
    for i in 0..40 {
        report(&device, &device_id, f64::from(i)).await;
    }
    for i in 0..40 {
        let message =
            tokio::time::timeout(Duration::from_secs(10), futures_next(&mut subscription))
                .await
                .unwrap();
        let body: Value = serde_json::from_slice(&message).unwrap();
        assert_eq!(body["temp"], f64::from(i), "message {i} in order");
    }
    let mut stored = 0;
    for _ in 0..100 {
        let mut stream = jetstream.get_stream(&stream_name).await.unwrap();
        stored = stream.info().await.unwrap().state.messages;
        if stored == 41 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored, 41, "JetStream stored every forwarded message");
    jetstream.delete_stream(&stream_name).await.unwrap();
    device.close().await;
    server.stop().await;
}

async fn futures_next(subscription: &mut async_nats::Subscriber) -> bytes::Bytes {
    use futures_util::StreamExt;
    subscription.next().await.unwrap().payload
}

#[tokio::test]
async fn inserts_into_postgresql_and_survives_a_broken_table() {
    let server = server().await;
    let (pg, connection) = tokio_postgres::connect(
        "host=127.0.0.1 user=postgres dbname=test",
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let table = format!("ioda_fw_{}", suffix());
    let create =
        format!("CREATE TABLE {table} (device_id text, temp double precision, received text)");
    pg.batch_execute(&create).await.unwrap();

    let rule_id = active_rule(&server, "notify_data.header.device_id AS id, notify_data.body.services[0].properties.temp AS t, event_time").await;
    let detail = json!({"postgresql_forwarding": {"url": "postgres://postgres@127.0.0.1/test", "table_name": table,
        "column_mappings": [{"column_name": "device_id", "json_key": "id"}, {"column_name": "temp", "json_key": "t"}, {"column_name": "received", "json_key": "event_time"}]}});
    let action_id = add_action(&server, &rule_id, "POSTGRESQL_FORWARDING", detail).await;
    let (device_id, device) = reporting_device(&server, "pg-1").await;
    report(&device, &device_id, 30.25).await;
    let count_rows = || async {
        pg.query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1)
    };
    eventually("a row inserted", || async { count_rows().await == 1 }).await;
    let row = pg
        .query_one(&format!("SELECT device_id, temp FROM {table}"), &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, f64>(1)),
        (device_id.clone(), 30.25)
    );

    // The table goes away: attempts fail and are counted, the message waits in the queue.
    pg.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    report(&device, &device_id, 31.0).await;
    let status_path = format!("/routing-rule/actions/{action_id}/status");
    eventually("a failed attempt", || async {
        server.get(&status_path).await["failed_attempts"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let status = server.get(&status_path).await;
    assert_eq!(status["queued_messages"], 1, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL"),
        "{status}"
    );
    // Back again: the queued message arrives (the retry backs off for a second or two).
    pg.batch_execute(&create).await.unwrap();
    for _ in 0..100 {
        if count_rows().await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count_rows().await,
        1,
        "nothing was lost while the table was missing"
    );
    pg.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();

    let bad = server.post("/routing-rule/actions", json!({"rule_id": rule_id, "channel": "POSTGRESQL_FORWARDING", "channel_detail": {"postgresql_forwarding": {"url": "postgres://postgres@127.0.0.1/test", "table_name": "x; drop", "column_mappings": [{"column_name": "a", "json_key": "b"}]}}})).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn publishes_to_rabbitmq_with_confirms_and_refuses_unroutable_messages() {
    use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
    let server = server().await;
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("ioda-test-{}", suffix());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();

    let rule_id = active_rule(
        &server,
        "notify_data.header.device_id AS id, notify_data.body.services[0].properties.temp AS temp",
    )
    .await;
    add_action(
        &server,
        &rule_id,
        "RABBITMQ_FORWARDING",
        json!({"rabbitmq_forwarding": {"url": url, "exchange": "", "routing_key": queue}}),
    )
    .await;
    let nowhere = add_action(&server, &rule_id, "RABBITMQ_FORWARDING", json!({"rabbitmq_forwarding": {"url": url, "exchange": "", "routing_key": format!("{queue}-missing")}})).await;
    let (device_id, device) = reporting_device(&server, "amqp-1").await;
    report(&device, &device_id, 18.0).await;

    let mut got = None;
    for _ in 0..100 {
        if let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got = Some(message);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = got.expect("a message in the queue");
    assert_eq!(
        serde_json::from_slice::<Value>(&message.delivery.data).unwrap(),
        json!({"id": device_id, "temp": 18.0})
    );
    assert!(
        message.delivery.properties.message_id().is_some(),
        "the message id travels as an AMQP property"
    );

    // The broker cannot route the other action's messages: they are not counted as delivered.
    let status_path = format!("/routing-rule/actions/{nowhere}/status");
    eventually("an unroutable attempt", || async {
        server.get(&status_path).await["failed_attempts"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let status = server.get(&status_path).await;
    assert!(
        status["last_error"].as_str().unwrap().contains("route"),
        "{status}"
    );
    assert_eq!(status["queued_messages"], 1);

    // Reports sent back to back are published in batches and confirmed together: all of them
    // arrive, in order (40: within the device's rate limit).
    for i in 0..40 {
        report(&device, &device_id, f64::from(i)).await;
    }
    let mut temps = Vec::new();
    for _ in 0..200 {
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(message) => {
                let body: Value = serde_json::from_slice(&message.delivery.data).unwrap();
                temps.push(body["temp"].as_f64().unwrap());
            }
            None if temps.len() == 40 => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let expected: Vec<f64> = (0..40).map(f64::from).collect();
    assert_eq!(temps, expected, "every report once, in order");
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    device.close().await;
    server.stop().await;
}
