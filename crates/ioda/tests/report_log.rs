//! Forwarding property reports from the stored history (no queue row per report): what waits for a
//! target survives a restart with its message ids, a backlog beyond the action's memory is read
//! back from the history in order, and a new action does not replay the past; what the device
//! trace says about where each uplink and event went, and when it says it (message tracing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::forwarding::*;
use common::receiver::{Answer, Receiver};
use common::*;
use ioda_engine::ManualClock;
use rumqttc::QoS;
use serde_json::{Value, json};

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

/// A server whose report-forwarding actions hold at most `bytes` in memory, on a standing clock.
async fn with_report_memory(bytes: usize) -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| {
            c.signature_window_ms = i64::MAX / 4;
            c.forward.report_memory_bytes = bytes;
        },
        clock.clone(),
    )
    .await;
    (server, clock)
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
    // The reports went out fire-and-forget: wait for all five to be committed.
    let status_path = format!("/routing-rule/actions/{action_id}/status");
    eventually("five reports queued", || async {
        server.get(&status_path).await["queued_messages"] == 5
    })
    .await;
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
async fn a_delivery_answered_while_the_server_stops_is_not_delivered_again() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let adjust = |c: &mut ioda::config::ServeConfig| c.signature_window_ms = i64::MAX / 4;
    let server = server_on(tempfile::tempdir().unwrap(), adjust, clock.clone()).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "log-stop").await;
    let (receiver, url) = Receiver::start().await;
    // The receiver takes the message at once and answers 200 after 800 ms: the server stops
    // in between.
    receiver
        .delay_ms
        .store(800, std::sync::atomic::Ordering::SeqCst);
    rule_with_action(&server, SELECT_COUNT, "", &url).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    report(&device, &device_id, 21.0, 1).await;
    eventually("the receiver has the message", || async {
        receiver.seen.lock().unwrap().len() == 1
    })
    .await;
    device.close().await;
    let dir = server.stop_keep_dir().await;
    assert_eq!(
        counts(&receiver.accepted()),
        vec![1],
        "answered before the stop ended"
    );

    let server = server_on(dir, adjust, clock).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        receiver.seen.lock().unwrap().len(),
        1,
        "delivered once: the stop recorded the delivery"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_backlog_beyond_memory_is_read_back_from_the_history_in_order() {
    // Room for about two messages (`{"n":1}`).
    let (server, clock) = with_report_memory(16).await;
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

/// A whole-envelope rule's reports, read back from the history (the action holds none in memory),
/// carry the properties' stored JSON text: the envelope is the one a live report gets.
#[tokio::test]
async fn whole_envelopes_read_back_from_the_history_carry_the_reported_properties() {
    // Less than one envelope: the reports are read back from the history.
    let (server, _clock) = with_report_memory(16).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "log-env").await;
    let (receiver, url) = Receiver::start().await;
    let (_, action_id) = rule_with_action(&server, "*", "", &url).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    for n in 1..=4 {
        report(&device, &device_id, 20.5 + n as f64, n).await;
    }
    let bodies = wait_accepted(&receiver, 4, 20).await;
    for (n, body) in (1..=4i64).zip(&bodies) {
        assert_eq!(body["resource"], "device.property", "{body}");
        assert_eq!(
            body["notify_data"]["header"]["device_id"],
            device_id.as_str()
        );
        assert_eq!(
            body["notify_data"]["body"]["services"][0]["properties"],
            json!({"count": n, "temp": 20.5 + n as f64}),
            "{body}"
        );
    }
    let status = server
        .get(&format!("/routing-rule/actions/{action_id}/status"))
        .await;
    assert_eq!(status["delivered"], 4, "{status}");
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

/// The device trace, while the device's message trace runs: one entry per uplink says it was
/// stored and where it went (rules matched, rules passed, actions queued); events that are not
/// the device's own data keep an entry of their own for their rules; a success says which
/// attempt it was and carries no error.
#[tokio::test]
async fn the_trace_tells_where_each_uplink_and_event_went() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "trace-1").await;
    server.start_trace(&device_id).await;
    let (receiver, url) = Receiver::start().await;
    let action = |rule_id: &str| json!({"rule_id": rule_id, "channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": url}}});
    let taken = activated_rule(
        &server,
        json!({"subject": {"resource": "device.message", "event": "report"}}),
    )
    .await;
    let passed = activated_rule(
        &server,
        json!({"subject": {"resource": "device.message", "event": "report"}, "where": "notify_data.body.name = 'other'"}),
    )
    .await;
    let status_rule = activated_rule(
        &server,
        json!({"subject": {"resource": "device.status", "event": "update"}}),
    )
    .await;
    let mut action_ids = Vec::new();
    for rule_id in [&taken, &passed, &status_rule] {
        let r = server.post("/routing-rule/actions", action(rule_id)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        action_ids.push(r.body["action_id"].as_str().unwrap().to_owned());
    }
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    message_up(&device, &device_id, "?request_id=m1").await;
    wait_accepted(&receiver, 2, 10).await;
    let entries = || async {
        let trace = server.get(&format!("/devices/{device_id}/trace")).await;
        trace["entries"].as_array().unwrap().clone()
    };
    let of_kind = |entries: &[Value], kind: &str| -> Vec<Value> {
        entries
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["detail"].clone())
            .collect()
    };
    let seen = entries().await;
    let stored = of_kind(&seen, "message_stored");
    assert_eq!(stored.len(), 1, "{seen:?}");
    assert_eq!(stored[0]["request_id"], "m1");
    assert_eq!(
        stored[0]["routing"],
        json!({"matched": [taken], "not_matched": [passed], "queued_for": [action_ids[0]]}),
        "{seen:?}"
    );
    assert!(
        of_kind(&seen, "rules_matched")
            .iter()
            .chain(of_kind(&seen, "rules_not_matched").iter())
            .all(|d| d["subject"] != "device.message/report"),
        "the message's rules are in its stored entry, not in one of their own: {seen:?}"
    );
    let status_entries: Vec<Value> = of_kind(&seen, "rules_matched")
        .into_iter()
        .filter(|d| d["subject"] == "device.status/update")
        .collect();
    assert!(!status_entries.is_empty(), "{seen:?}");
    assert_eq!(status_entries[0]["matched"], json!([status_rule]));
    assert_eq!(status_entries[0]["queued_for"], json!([action_ids[2]]));
    eventually("both deliveries are traced", || async {
        of_kind(&entries().await, "forwarded").len() >= 2
    })
    .await;
    let forwarded = of_kind(&entries().await, "forwarded");
    let of_message: Vec<&Value> = forwarded
        .iter()
        .filter(|d| d["request_id"] == "m1")
        .collect();
    assert_eq!(of_message.len(), 1, "{forwarded:?}");
    assert_eq!(of_message[0]["action_id"], action_ids[0].as_str());
    assert_eq!(of_message[0]["attempt"], 1);
    assert!(of_message[0].get("error").is_none(), "{forwarded:?}");
    device.close().await;
    server.stop().await;
}

/// A property report with the given request id.
async fn report_as(device: &SimDevice, device_id: &str, request_id: &str, body: &Value) {
    let topic = format!("$oc/devices/{device_id}/sys/properties/report?request_id={request_id}");
    device
        .client
        .publish(topic, QoS::AtLeastOnce, false, body.to_string())
        .await
        .unwrap();
}

/// A server with a device whose reports a rule forwards to a receiver of the test's.
struct Forwarding {
    server: TestServer,
    clock: Arc<ManualClock>,
    device_id: String,
    secret: String,
    receiver: Receiver,
    action_id: String,
}

async fn forwarding_device(name: &str) -> Forwarding {
    let (server, clock) = with_report_memory(1 << 20).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, name).await;
    let (receiver, url) = Receiver::start().await;
    let (_, action_id) = rule_with_action(&server, SELECT_COUNT, "", &url).await;
    Forwarding {
        server,
        clock,
        device_id,
        secret,
        receiver,
        action_id,
    }
}

/// Waits until the receiver has accepted `n` reports and the action has counted them delivered
/// (the trace decides about a delivery's entry when it counts the delivery).
async fn delivered(server: &TestServer, action_id: &str, receiver: &Receiver, n: u64) {
    wait_accepted(receiver, n as usize, 10).await;
    eventually("the delivery is counted", || async {
        let status = server
            .get(&format!("/routing-rule/actions/{action_id}/status"))
            .await;
        status["delivered"].as_u64() == Some(n)
    })
    .await;
}

/// Waits until the device's trace has an entry of `kind` for `request_id`.
async fn wait_traced(server: &TestServer, device_id: &str, kind: &str, request_id: &str) {
    eventually(&format!("{kind} of {request_id} is traced"), || async {
        entries_of(server, device_id, kind)
            .await
            .iter()
            .any(|(request, _)| request == request_id)
    })
    .await;
}

/// Waits until the device's trace has an entry of `kind`.
async fn wait_kind(server: &TestServer, device_id: &str, kind: &str) {
    eventually(&format!("a {kind} entry"), || async {
        !entries_of(server, device_id, kind).await.is_empty()
    })
    .await;
}

/// The request ids of trace entries.
fn requests(entries: Vec<(String, Value)>) -> Vec<String> {
    entries.into_iter().map(|(request, _)| request).collect()
}

/// The entries of `kind` in a device's trace, oldest first, as `(request_id, detail)`.
async fn entries_of(server: &TestServer, device_id: &str, kind: &str) -> Vec<(String, Value)> {
    let trace = server
        .get(&format!("/devices/{device_id}/trace?limit=1000"))
        .await;
    let mut found: Vec<(String, Value)> = trace["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| {
            let detail = e["detail"].clone();
            (
                detail["request_id"].as_str().unwrap_or("").to_owned(),
                detail,
            )
        })
        .collect();
    found.reverse();
    found
}

/// What goes wrong is always traced; the stages of what goes right (stored, forwarded) only while
/// the device's message trace runs: started, stopped, or run out.
#[tokio::test]
async fn successful_traffic_is_traced_only_while_the_message_trace_runs() {
    let Forwarding {
        server,
        clock,
        device_id,
        secret,
        receiver,
        action_id,
    } = forwarding_device("traced-1").await;
    let tracing = |body: Value| body["tracing"].clone();
    let trace_url = format!("/devices/{device_id}/trace");
    assert_eq!(
        tracing(server.get(&trace_url).await),
        json!({"started": false, "until": null, "all_devices": false})
    );
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    // Not traced: a report that goes right, and one that loses a property (traced whatever).
    report(&device, &device_id, 20.0, 1).await;
    let lossy = json!({"services": [{"service_id": "Temperature", "properties": {"temp": 1.0, "count": 2, "bogus": 3}}]});
    report_as(&device, &device_id, "r2", &lossy).await;
    delivered(&server, &action_id, &receiver, 2).await;
    // Traced.
    let start_url = format!("{trace_url}/start");
    let start = |seconds: i64| server.post(&start_url, json!({"duration": seconds}));
    let started = start(600).await;
    assert_eq!(started.status, 200, "{}", started.body);
    assert_eq!(
        started.body["tracing"]["until"],
        ioda_types::time::format_iso_millis(1_764_150_000_000 + 600_000)
    );
    report(&device, &device_id, 20.0, 3).await;
    delivered(&server, &action_id, &receiver, 3).await;
    // Stopped.
    let stopped = server.post(&format!("{trace_url}/stop"), json!({})).await;
    assert_eq!(tracing(stopped.body)["started"], false);
    report(&device, &device_id, 20.0, 4).await;
    delivered(&server, &action_id, &receiver, 4).await;
    // Run out.
    assert_eq!(start(60).await.status, 200);
    clock.advance(61_000);
    assert_eq!(
        tracing(server.get(&trace_url).await),
        json!({"started": false, "until": null, "all_devices": false}),
        "a trace that ran out"
    );
    report(&device, &device_id, 20.0, 5).await;
    delivered(&server, &action_id, &receiver, 5).await;
    // Traced again: once its forwarding is in the trace, so is everything before it.
    assert_eq!(start(600).await.status, 200);
    report(&device, &device_id, 20.0, 6).await;
    delivered(&server, &action_id, &receiver, 6).await;
    wait_traced(&server, &device_id, "forwarded", "r6").await;
    assert_eq!(
        requests(entries_of(&server, &device_id, "report_stored").await),
        ["r2", "r3", "r6"],
        "stored: the lossy report and the traced ones"
    );
    assert_eq!(
        requests(entries_of(&server, &device_id, "property_rejected").await),
        ["r2"]
    );
    assert_eq!(
        requests(entries_of(&server, &device_id, "forwarded").await),
        ["r3", "r6"],
        "forwarded: the traced reports"
    );
    device.close().await;
    server.stop().await;
}

/// A report stored while the trace ran keeps its `forwarded` entry when the trace stops before
/// the report reaches the receiver: the routing its `report_stored` names is followed through.
#[tokio::test]
async fn a_report_traced_when_stored_is_traced_when_delivered_after_the_trace_stops() {
    let Forwarding {
        server,
        device_id,
        secret,
        receiver,
        action_id,
        ..
    } = forwarding_device("traced-2").await;
    let trace_url = format!("/devices/{device_id}/trace");
    let started = server
        .post(&format!("{trace_url}/start"), json!({"duration": 600}))
        .await;
    assert_eq!(started.status, 200, "{}", started.body);
    // The receiver holds its answer, so the trace stops while the report is on its way.
    receiver
        .delay_ms
        .store(1_500, std::sync::atomic::Ordering::Relaxed);
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    report(&device, &device_id, 20.0, 1).await;
    eventually("the receiver has the report", || async {
        !receiver.seen.lock().unwrap().is_empty()
    })
    .await;
    let stopped = server.post(&format!("{trace_url}/stop"), json!({})).await;
    assert_eq!(stopped.body["tracing"]["started"], false);
    receiver
        .delay_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    delivered(&server, &action_id, &receiver, 1).await;
    wait_traced(&server, &device_id, "forwarded", "r1").await;
    // Stopped means stopped for what is stored from now on.
    report(&device, &device_id, 20.0, 2).await;
    delivered(&server, &action_id, &receiver, 2).await;
    assert_eq!(
        requests(entries_of(&server, &device_id, "forwarded").await),
        ["r1"]
    );
    device.close().await;
    server.stop().await;
}

/// Starting a trace checks what it is given; a deleted device's trace ends with it; `trace_all`
/// traces every device without starting anything.
#[tokio::test]
async fn message_trace_requests_are_checked_and_trace_all_needs_none() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, _) = server.device(&product, "traced-2").await;
    let start = format!("/devices/{device_id}/trace/start");
    // (body, status, what the error names)
    let cases: Vec<(&str, u16, &str)> = vec![
        (r#"{"duration": 0}"#, 400, "duration"),
        (r#"{"duration": -5}"#, 400, "duration"),
        (r#"{"duration": 604801}"#, 400, "duration"),
        (r#"{"duration": "long"}"#, 400, "invalid type"),
        (r#"{"duration": 60, "level": 3}"#, 400, "unknown field"),
        (r#"{"duration": 6"#, 400, "malformed JSON"),
        (r#"{"duration": 1}"#, 200, ""),
        (r#"{"duration": 604800}"#, 200, ""),
    ];
    for (body, status, names) in cases {
        let request = ioda::client::RawRequest {
            method: "POST".into(),
            path: server.api.full_path(&start),
            body: body.as_bytes().to_vec(),
            ..Default::default()
        };
        let r = server.api.send(request).await.unwrap();
        assert_eq!(r.status, status, "{body}: {}", r.body);
        if status == 200 {
            assert_eq!(r.body["tracing"]["started"], true, "{body}: {}", r.body);
        } else {
            assert!(
                r.body["error_msg"].as_str().unwrap_or("").contains(names),
                "{body}: {}",
                r.body
            );
        }
    }
    for verb in ["start", "stop"] {
        let unknown = server
            .post(&format!("/devices/nobody/trace/{verb}"), json!({}))
            .await;
        assert_eq!(unknown.status, 404, "{verb}: {}", unknown.body);
    }
    // A deleted device's trace ends with it: registered again, it is not traced.
    let r = server.post(&start, json!({})).await;
    assert_eq!(r.body["tracing"]["started"], true, "{}", r.body);
    let deleted = server
        .api
        .call("DELETE", &format!("/devices/{device_id}"), None)
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    let (again, _) = server.device(&product, "traced-2").await;
    assert_eq!(again, device_id);
    let trace = server.get(&format!("/devices/{device_id}/trace")).await;
    assert_eq!(trace["tracing"]["started"], false, "{trace}");
    server.stop().await;

    let server = server_with(|c| c.engine.trace_all = true).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "traced-3").await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    report(&device, &device_id, 20.0, 1).await;
    wait_kind(&server, &device_id, "report_stored").await;
    let trace = server.get(&format!("/devices/{device_id}/trace")).await;
    assert_eq!(
        trace["tracing"],
        json!({"started": false, "until": null, "all_devices": true})
    );
    device.close().await;
    server.stop().await;
}

/// An untraced device's failures are traced, and so is the success that ends them; so is a report
/// that kept none of its properties.
#[tokio::test]
async fn an_untraced_device_still_shows_failures_their_end_and_lost_reports() {
    let Forwarding {
        server,
        clock,
        device_id,
        secret,
        receiver,
        ..
    } = forwarding_device("traced-4").await;
    receiver.plan(&[Answer::Status(503)]);
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    report(&device, &device_id, 20.0, 1).await;
    wait_kind(&server, &device_id, "forward_failed").await;
    clock.advance(61_000);
    wait_accepted(&receiver, 1, 10).await;
    wait_kind(&server, &device_id, "forwarded").await;
    let forwarded = entries_of(&server, &device_id, "forwarded").await;
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    assert_eq!(
        (forwarded[0].0.as_str(), forwarded[0].1["attempt"].as_i64()),
        ("r1", Some(2))
    );
    let nothing_kept =
        json!({"services": [{"service_id": "Temperature", "properties": {"bogus": 3}}]});
    report_as(&device, &device_id, "r2", &nothing_kept).await;
    wait_kind(&server, &device_id, "report_stored").await;
    let stored = entries_of(&server, &device_id, "report_stored").await;
    assert_eq!(stored.len(), 1, "only the lost report: {stored:?}");
    assert_eq!(stored[0].0, "r2");
    assert_eq!(stored[0].1["applied_services"], json!([]));
    assert_eq!(stored[0].1["rejected_properties"], 1);
    device.close().await;
    server.stop().await;
}
