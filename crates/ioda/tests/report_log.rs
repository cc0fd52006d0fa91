//! Forwarding property reports from the stored history (no queue row per report): what waits for a
//! target survives a restart with its message ids, a backlog beyond the action's memory is read
//! back from the history in order, and a new action does not replay the past.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::forwarding::*;
use common::receiver::{Answer, Receiver};
use common::*;
use ioda_engine::ManualClock;
use rumqttc::QoS;
use serde_json::Value;

const SELECT_COUNT: &str = "notify_data.body.services[0].properties.count AS n";

fn counts(bodies: &[Value]) -> Vec<i64> {
    bodies.iter().map(|b| b["n"].as_i64().unwrap()).collect()
}

/// The message ids the receiver saw for the report numbered `n`.
fn ids_of(receiver: &Receiver, n: i64) -> Vec<String> {
    let seen = receiver.seen.lock().unwrap();
    seen.iter()
        .filter(|(_, body)| body["n"] == n)
        .map(|(id, _)| id.clone())
        .collect()
}

#[tokio::test]
async fn reports_waiting_for_a_target_survive_a_restart_with_their_message_ids() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let adjust = |c: &mut ioda::config::ServeConfig| c.signature_window_ms = i64::MAX / 4;
    let server = server_on(tempfile::tempdir().unwrap(), adjust, clock.clone()).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "log-1").await;
    let (receiver, url) = Receiver::start().await;
    // The first attempt fails; its retry is not due before the restart (the clock stands still),
    // and the device's later reports wait behind it.
    receiver.plan(&[Answer::Status(503)]);
    let (_, action_id) = rule_with_action(&server, SELECT_COUNT, "", &url).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    for n in 1..=5 {
        report(&device, &device_id, 21.0, n).await;
    }
    eventually("the first attempt failed", || async {
        receiver.seen.lock().unwrap().len() == 1
    })
    .await;
    let status = server
        .get(&format!("/routing-rule/actions/{action_id}/status"))
        .await;
    assert_eq!(status["queued_messages"], 5, "{status}");
    device.close().await;
    let dir = server.stop_keep_dir().await;

    // After the restart the five are read back from the stored history and delivered in order.
    let server = server_on(dir, adjust, clock.clone()).await;
    assert_eq!(
        counts(&wait_accepted(&receiver, 5, 10).await),
        vec![1, 2, 3, 4, 5]
    );
    let first = ids_of(&receiver, 1);
    assert_eq!(first.len(), 2, "one failure, one success: {first:?}");
    assert_eq!(first[0], first[1], "the message id survives the restart");
    let all: std::collections::HashSet<String> =
        (1..=5).flat_map(|n| ids_of(&receiver, n)).collect();
    assert_eq!(all.len(), 5, "one id per report: {all:?}");

    // A rule added now forwards what comes from now on, not the stored past.
    let (late_receiver, late_url) = Receiver::start().await;
    rule_with_action(&server, SELECT_COUNT, "", &late_url).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    report(&device, &device_id, 21.0, 6).await;
    assert_eq!(counts(&wait_accepted(&late_receiver, 1, 10).await), vec![6]);
    assert_eq!(
        counts(&wait_accepted(&receiver, 6, 10).await),
        vec![1, 2, 3, 4, 5, 6]
    );
    device.close().await;
    let dir = server.stop_keep_dir().await;

    // What was delivered is settled: another restart delivers nothing again.
    let server = server_on(dir, adjust, clock).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(counts(&receiver.accepted()), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(counts(&late_receiver.accepted()), vec![6]);
    server.stop().await;
}

#[tokio::test]
async fn a_backlog_beyond_memory_is_read_back_from_the_history_in_order() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| {
            c.signature_window_ms = i64::MAX / 4;
            // Room for about two messages (`{"n":1}`).
            c.forward.report_memory_bytes = 16;
        },
        clock.clone(),
    )
    .await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "log-2").await;
    let (receiver, url) = Receiver::start().await;
    receiver.plan(&[Answer::Status(503)]);
    let (_, action_id) = rule_with_action(&server, SELECT_COUNT, "", &url).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    for n in 1..=30 {
        report(&device, &device_id, 21.0, n).await;
    }
    let status_path = format!("/routing-rule/actions/{action_id}/status");
    eventually("the backlog beyond memory waits in the history", || async {
        server.get(&status_path).await["reports_in_history"].as_i64() >= Some(25)
    })
    .await;
    let status = server.get(&status_path).await;
    assert!(status["queued_messages"].as_i64().unwrap() <= 3, "{status}");
    // The retry comes due: everything is delivered once, in order.
    clock.advance(61_000);
    let delivered = wait_accepted(&receiver, 30, 20).await;
    assert_eq!(counts(&delivered), (1..=30).collect::<Vec<_>>());
    let status = server.get(&status_path).await;
    assert_eq!(
        (
            status["delivered"].as_u64(),
            status["reports_in_history"].as_i64()
        ),
        (Some(30), Some(0)),
        "{status}"
    );
    // Memory takes over again: a new report goes out at once.
    report(&device, &device_id, 21.0, 31).await;
    assert_eq!(wait_accepted(&receiver, 31, 10).await.len(), 31);
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn queue_rows_left_by_an_older_version_go_out_first() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let adjust = |c: &mut ioda::config::ServeConfig| c.signature_window_ms = i64::MAX / 4;
    let server = server_on(tempfile::tempdir().unwrap(), adjust, clock.clone()).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "log-3").await;
    let (receiver, url) = Receiver::start().await;
    let (_, action_id) = rule_with_action(&server, SELECT_COUNT, "", &url).await;
    let dir = server.stop_keep_dir().await;
    // An older version queued reports for this action as rows.
    let store =
        ioda_store::Store::open(&dir.path().join("ioda.db"), ioda_store::Durability::Normal)
            .unwrap();
    let row = |n: i64| ioda_store::NewForward {
        action_id: action_id.clone(),
        message_id: format!("old-{n}"),
        payload: format!(r#"{{"n":{n}}}"#),
        device_id: Some(device_id.clone()),
        request_id: Some(format!("old-{n}")),
    };
    store
        .enqueue_forward(vec![row(1), row(2)], vec![], 1_764_150_000_000)
        .await
        .unwrap();
    store.close().await;

    let server = server_on(dir, adjust, clock).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    report(&device, &device_id, 21.0, 3).await;
    assert_eq!(
        counts(&wait_accepted(&receiver, 3, 10).await),
        vec![1, 2, 3]
    );
    assert_eq!(ids_of(&receiver, 1), vec!["old-1"]);
    let status = server
        .get(&format!("/routing-rule/actions/{action_id}/status"))
        .await;
    assert_eq!(
        (
            status["delivered"].as_u64(),
            status["queued_messages"].as_i64()
        ),
        (Some(3), Some(0)),
        "{status}"
    );
    device.close().await;
    server.stop().await;
}
