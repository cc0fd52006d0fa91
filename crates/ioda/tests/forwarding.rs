//! Data forwarding end to end: device → rule → HTTP push to a real receiver, including receivers
//! that fail, hang, drop the connection and come back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::forwarding::*;
use common::receiver::{Answer, Receiver};
use common::*;
use ioda_engine::ManualClock;
use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[tokio::test]
async fn reports_are_pushed_as_iotda_envelopes_through_filters_and_projections() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "fw-1").await;
    let (whole, whole_url) = Receiver::start().await;
    let (picked, picked_url) = Receiver::start().await;
    rule_with_action(
        &server,
        "",
        "notify_data.body.services[0].properties.temp > 30",
        &whole_url,
    )
    .await;
    rule_with_action(&server, "notify_data.header.device_id AS id, notify_data.body.services[0].properties.temp * 2 AS twice", "", &picked_url).await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    report(&device, &device_id, 20.0, 1).await;
    report(&device, &device_id, 36.5, 2).await;

    let pushed = wait_accepted(&whole, 1, 10).await;
    let envelope = &pushed[0];
    assert_eq!(envelope["resource"], "device.property");
    assert_eq!(envelope["event"], "report");
    assert_eq!(
        envelope["request_id"], "r2",
        "the device's request id travels with the data"
    );
    assert_eq!(
        envelope["notify_data"]["header"]["device_id"],
        device_id.as_str()
    );
    assert_eq!(envelope["notify_data"]["header"]["node_id"], "fw-1");
    assert_eq!(
        envelope["notify_data"]["header"]["product_id"],
        product.as_str()
    );
    assert_eq!(
        envelope["notify_data"]["body"]["services"][0]["properties"],
        json!({"temp": 36.5, "count": 2})
    );
    assert!(
        envelope["event_time"]
            .as_str()
            .is_some_and(|t| t.len() == 16 && t.ends_with('Z'))
    );
    let projected = wait_accepted(&picked, 2, 10).await;
    assert_eq!(
        projected,
        vec![
            json!({"id": device_id, "twice": 40}),
            json!({"id": device_id, "twice": 73})
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        whole.accepted().len(),
        1,
        "the report below the threshold is filtered out"
    );
    device.close().await;
    server.stop().await;
}

/// A server forwarding each report's device and count to a receiver, and connected devices.
async fn devices_forwarding_to_a_receiver(
    nodes: &[&str],
) -> (TestServer, Receiver, Vec<(String, SimDevice)>) {
    let server = server().await;
    let product = server.product().await;
    let (receiver, url) = Receiver::start().await;
    rule_with_action(
        &server,
        "notify_data.header.device_id AS d, notify_data.body.services[0].properties.count AS n",
        "",
        &url,
    )
    .await;
    let mut devices = Vec::new();
    for node in nodes {
        let (device_id, secret) = server.device(&product, node).await;
        let device =
            SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
        devices.push((device_id, device));
    }
    (server, receiver, devices)
}

#[tokio::test]
async fn devices_are_delivered_side_by_side_each_in_order() {
    let (server, receiver, devices) = devices_forwarding_to_a_receiver(&[
        "lane-a", "lane-b", "lane-c", "lane-d", "lane-e", "lane-f",
    ])
    .await;
    receiver.delay_ms.store(20, Ordering::SeqCst);
    for n in 1..=8 {
        for (device_id, device) in &devices {
            report(device, device_id, 20.0, n).await;
        }
    }
    let accepted = wait_accepted(&receiver, 48, 20).await;
    for (device_id, _) in &devices {
        let counts: Vec<i64> = accepted
            .iter()
            .filter(|b| b["d"] == device_id.as_str())
            .map(|b| b["n"].as_i64().unwrap())
            .collect();
        assert_eq!(counts, (1..=8).collect::<Vec<_>>(), "order of {device_id}");
    }
    assert!(
        receiver.max_in_flight.load(Ordering::SeqCst) > 1,
        "different devices' messages should overlap their round trips"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_hanging_delivery_holds_up_only_its_own_lane() {
    let (server, receiver, devices) =
        devices_forwarding_to_a_receiver(&["slow", "b1", "b2", "b3", "b4", "b5", "b6"]).await;
    // The first delivery gets no answer (the action's timeout is 15 s).
    receiver.plan(&[Answer::Hang]);
    let (slow_id, slow) = &devices[0];
    report(slow, slow_id, 20.0, 1).await;
    eventually("the slow device's report reaches the receiver", || async {
        !receiver.seen.lock().unwrap().is_empty()
    })
    .await;
    for n in 1..=3 {
        for (device_id, device) in &devices[1..] {
            report(device, device_id, 20.0, n).await;
        }
    }
    // Devices on other lanes go on while it hangs (those sharing its lane wait behind it, in
    // order); six devices over 16 lanes all sharing the slow one's lane is a 1-in-16^6 chance.
    eventually("another device's reports are all delivered", || async {
        let accepted = receiver.accepted();
        devices[1..].iter().any(|(device_id, _)| {
            accepted
                .iter()
                .filter(|b| b["d"] == device_id.as_str())
                .count()
                == 3
        })
    })
    .await;
    assert!(
        receiver
            .accepted()
            .iter()
            .all(|b| b["d"] != slow_id.as_str()),
        "the slow delivery is still hanging"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_busy_devices_backlog_arrives_in_order_across_a_failure() {
    // Above the default 50 messages a second per device.
    let server = server_with(|c| c.engine.rate_limit = 1000).await;
    let product = server.product().await;
    let (receiver, url) = Receiver::start().await;
    rule_with_action(
        &server,
        "notify_data.body.services[0].properties.count AS n",
        "",
        &url,
    )
    .await;
    let (device_id, secret) = server.device(&product, "busy").await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    // More than a lane holds at once (64), so most wait for room; the 70th attempt fails while
    // messages after it are on the lane or waiting for it.
    let mut plan = vec![Answer::Ok; 69];
    plan.push(Answer::Status(500));
    receiver.plan(&plan);
    for n in 1..=150 {
        report(&device, &device_id, 20.0, n).await;
    }
    let accepted = wait_accepted(&receiver, 150, 20).await;
    let counts: Vec<i64> = accepted.iter().map(|b| b["n"].as_i64().unwrap()).collect();
    assert_eq!(counts, (1..=150).collect::<Vec<_>>());
    let attempts = receiver.seen.lock().unwrap().len();
    assert!(
        attempts > 150,
        "the failed one was tried again ({attempts} attempts)"
    );
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn failures_are_retried_in_order_with_stable_message_ids() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| {
            c.signature_window_ms = i64::MAX / 4;
            // Short, for the hanging answer; long enough that a loaded machine's answered attempt
            // never times out too (it would be delivered twice).
            c.forward.timeout = Duration::from_secs(2);
        },
        clock.clone(),
    )
    .await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "fw-2").await;
    let (receiver, url) = Receiver::start().await;
    receiver.plan(&[
        Answer::Status(500),
        Answer::Hang,
        Answer::Close,
        Answer::Status(503),
    ]);
    let (rule_id, action_id) = rule_with_action(
        &server,
        "notify_data.body.services[0].properties.count AS n",
        "",
        &url,
    )
    .await;
    // The device's message trace runs (a day: the manual clock skips the backoffs).
    let started = server
        .post(
            &format!("/devices/{device_id}/trace/start"),
            json!({"duration": 86_400}),
        )
        .await;
    assert_eq!(started.status, 200, "{}", started.body);
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    for n in 1..=3 {
        report(&device, &device_id, 21.0, n).await;
    }
    // Four failed attempts, each followed by a backoff that the manual clock skips.
    for _ in 0..40 {
        if receiver.accepted().len() == 3 {
            break;
        }
        clock.advance(61_000);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        receiver.accepted(),
        vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})],
        "all delivered, in order"
    );
    let seen = receiver.seen.lock().unwrap().clone();
    let first_ids: Vec<&String> = seen
        .iter()
        .filter(|(_, b)| *b == json!({"n": 1}))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(first_ids.len(), 5, "four failures then a success: {seen:?}");
    assert!(
        first_ids
            .iter()
            .all(|id| *id == first_ids[0] && !id.is_empty()),
        "retries keep the message id: {first_ids:?}"
    );
    let status = server
        .get(&format!("/routing-rule/actions/{action_id}/status"))
        .await;
    assert_eq!(
        (
            status["delivered"].as_u64(),
            status["failed_attempts"].as_u64(),
            status["queued_messages"].as_i64()
        ),
        (Some(3), Some(4), Some(0)),
        "{status}"
    );
    // The device trace tells the whole story of report 1: stored (with the rule it matched and
    // the action it was queued for), failed (why), forwarded.
    let trace = server
        .get(&format!("/devices/{device_id}/trace?limit=200"))
        .await;
    let stages: Vec<(String, Value)> = trace["entries"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .filter(|e| e["detail"]["request_id"] == "r1")
        .map(|e| (e["kind"].as_str().unwrap().to_owned(), e["detail"].clone()))
        .collect();
    let kinds: Vec<&str> = stages.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "report_stored",
            "forward_failed",
            "forward_failed",
            "forward_failed",
            "forward_failed",
            "forwarded"
        ],
        "{trace}"
    );
    assert_eq!(
        stages[0].1["routing"],
        json!({"matched": [rule_id], "not_matched": [], "queued_for": [action_id]}),
        "{trace}"
    );
    assert!(
        stages[1].1["error"].as_str().unwrap().contains("500"),
        "{trace}"
    );
    assert!(
        stages[2].1["error"].as_str().unwrap().contains("no answer"),
        "{trace}"
    );
    assert_eq!(
        (stages[5].1["attempt"].as_i64(), stages[5].1.get("error")),
        (Some(5), None),
        "a success says which attempt it was, and no error: {trace}"
    );
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_failing_target_is_marked_probed_and_its_queue_bounded() {
    let clock = Arc::new(ManualClock::new(1_764_150_000_000));
    let server = server_on(
        tempfile::tempdir().unwrap(),
        |c| {
            c.signature_window_ms = i64::MAX / 4;
            c.forward.failing_after = 3;
            c.forward.max_queue_bytes = 100;
        },
        clock.clone(),
    )
    .await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "fw-3").await;
    // Nothing listens on this port: every attempt fails to connect.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/push", dead.local_addr().unwrap());
    drop(dead);
    let (_, action_id) = rule_with_action(
        &server,
        "notify_data.body.services[0].properties.count AS n",
        "",
        &dead_url,
    )
    .await;
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    for n in 1..=20 {
        report(&device, &device_id, 21.0, n).await;
    }
    let status_path = format!("/routing-rule/actions/{action_id}/status");
    for _ in 0..40 {
        if server.get(&status_path).await["failing"] == true {
            break;
        }
        clock.advance(61_000);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let status = server.get(&status_path).await;
    assert_eq!(status["failing"], true, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("connect")),
        "{status}"
    );
    // The queue limit (100 bytes) keeps only the newest messages, and says how many it dropped.
    // The worker trims every 10 s of platform time, when it wakes.
    let mut status = server.get(&status_path).await;
    for _ in 0..20 {
        clock.advance(11_000);
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = server.get(&status_path).await;
        if status["queued_bytes"].as_i64() <= Some(100) {
            break;
        }
    }
    assert!(status["queued_bytes"].as_i64().unwrap() <= 100, "{status}");
    assert!(
        status["dropped_queue_full"].as_u64().unwrap() > 0,
        "{status}"
    );

    // Moving the target to a live receiver: the probe (every 3 minutes) finds it and drains the queue.
    let (receiver, url) = Receiver::start().await;
    let r = server.api.call("PUT", &format!("/routing-rule/actions/{action_id}"), Some(&json!({"channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": url}}}))).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    clock.advance(180_000);
    // What survived the size limit is delivered in order, the newest (n = 20) last.
    eventually("the newest message is delivered", || async {
        receiver.accepted().last() == Some(&json!({"n": 20}))
    })
    .await;
    let delivered = receiver.accepted();
    assert!(
        delivered.len() < 20,
        "the size limit dropped the oldest: {delivered:?}"
    );
    let status = server.get(&status_path).await;
    assert_eq!(status["failing"], false);

    // Age limit: messages older than a day are dropped and counted.
    // A small selection, so the 100-byte queue limit of this server never drops it first.
    let (_, old_action) = rule_with_action(
        &server,
        "notify_data.body.services[0].properties.count AS n",
        "",
        &dead_url,
    )
    .await;
    report(&device, &device_id, 21.0, 99).await;
    let old_status = format!("/routing-rule/actions/{old_action}/status");
    // The message must be queued (at the old time) before the clock jumps a day.
    eventually("the message queued", || async {
        server.get(&old_status).await["queued_messages"] == 1
    })
    .await;
    clock.advance(24 * 3_600_000 + 20_000);
    for _ in 0..100 {
        if server.get(&old_status).await["dropped_too_old"].as_u64() == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.get(&old_status).await["dropped_too_old"], 1);
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn bad_rules_and_actions_are_refused_with_reasons() {
    let server = server().await;
    let rule = |subject: Value, select: &str, condition: &str| json!({"subject": subject, "select": select, "where": condition});
    let ok_subject = json!({"resource": "device.property", "event": "report"});
    let cases = [
        (
            rule(
                json!({"resource": "device.property", "event": "delete"}),
                "",
                "",
            ),
            "unknown subject",
        ),
        (
            rule(json!({"resource": "nonsense", "event": "report"}), "", ""),
            "unknown subject",
        ),
        (
            rule(ok_subject.clone(), "", "temp >"),
            "where clause, at character 7",
        ),
        (
            rule(ok_subject.clone(), "explode(x)", ""),
            "select clause, at character 1: unknown function",
        ),
        (
            json!({"subject": ok_subject.clone(), "app_type": "SOMETIMES"}),
            "app_type",
        ),
    ];
    for (body, needle) in cases {
        let r = server.post("/routing-rule/rules", body.clone()).await;
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (400, Some("IOTDA.000006")),
            "{body}"
        );
        assert!(
            r.body["error_msg"].as_str().unwrap().contains(needle),
            "{body}: {}",
            r.body
        );
    }
    let rule_id = server
        .post("/routing-rule/rules", rule(ok_subject, "", ""))
        .await
        .body["rule_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (channel, detail, needle) in [
        (
            "HTTP_FORWARDING",
            json!({"http_forwarding": {"url": "not a url"}}),
            "http://",
        ),
        (
            "HTTP_FORWARDING",
            json!({"http_forwarding": {"url": "http://host:99999/x"}}),
            "host[:port]",
        ),
        ("HTTP_FORWARDING", json!({}), "url is required"),
        ("CARRIER_PIGEON", json!({}), "not available"),
    ] {
        let r = server
            .post(
                "/routing-rule/actions",
                json!({"rule_id": rule_id, "channel": channel, "channel_detail": detail}),
            )
            .await;
        assert_eq!(r.status, 400, "{channel} {detail}: {}", r.body);
        assert!(
            r.body["error_msg"].as_str().unwrap().contains(needle),
            "{}",
            r.body
        );
    }
    let r = server.post("/routing-rule/actions", json!({"rule_id": "nope", "channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": "http://h/x"}}})).await;
    assert_eq!(r.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn every_subject_is_pushed_with_its_envelope() {
    let server = server().await;
    let (receiver, url) = Receiver::start().await;
    let subjects = [
        ("device", "create"),
        ("device", "update"),
        ("device", "delete"),
        ("device.status", "update"),
        ("device.message", "report"),
        ("device.message.status", "update"),
        ("device.command.status", "update"),
        ("product", "create"),
        ("product", "update"),
    ];
    for (resource, event) in subjects {
        let rule_id = activated_rule(
            &server,
            json!({"subject": {"resource": resource, "event": event}}),
        )
        .await;
        server.post("/routing-rule/actions", json!({"rule_id": rule_id, "channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": url}}})).await;
    }
    let product = server.product().await;
    server
        .api
        .call(
            "PUT",
            &format!("/products/{product}"),
            Some(&json!({"description": "changed"})),
        )
        .await
        .unwrap();
    let (device_id, secret) = server.device(&product, "env-1").await;
    server
        .api
        .call(
            "PUT",
            &format!("/devices/{device_id}"),
            Some(&json!({"device_name": "named"})),
        )
        .await
        .unwrap();
    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    message_up(&device, &device_id, "").await;
    server
        .post(
            &format!("/devices/{device_id}/messages"),
            json!({"message_id": "down-1", "message": "hi"}),
        )
        .await;
    server
        .post(
            &format!("/devices/{device_id}/async-commands"),
            json!({"command_name": "SET_MODE", "paras": {"mode": "auto"}}),
        )
        .await;
    device.close().await;
    eventually("OFFLINE", || async {
        server.status(&device_id).await == "OFFLINE"
    })
    .await;
    server
        .api
        .call("DELETE", &format!("/devices/{device_id}"), None)
        .await
        .unwrap();

    let find = |resource: &str, event: &str, extra: &dyn Fn(&Value) -> bool| {
        receiver
            .accepted()
            .into_iter()
            .find(|e| e["resource"] == resource && e["event"] == event && extra(e))
    };
    for _ in 0..100 {
        if find("device", "delete", &|_| true).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created = find("device", "create", &|_| true).expect("device create");
    assert_eq!(created["notify_data"]["body"]["node_id"], "env-1");
    let updated = find("device", "update", &|_| true).expect("device update");
    assert_eq!(updated["notify_data"]["body"]["device_name"], "named");
    let deleted = find("device", "delete", &|_| true).expect("device delete");
    assert_eq!(
        deleted["notify_data"]["header"]["device_id"],
        device_id.as_str()
    );
    let online = find("device.status", "update", &|e| {
        e["notify_data"]["body"]["status"] == "ONLINE"
    })
    .expect("online");
    assert!(online["notify_data"]["body"]["last_online_time"].is_string());
    assert!(
        find(
            "device.status",
            "update",
            &|e| e["notify_data"]["body"]["status"] == "OFFLINE"
        )
        .is_some()
    );
    let message = find("device.message", "report", &|_| true).expect("message");
    assert_eq!(message["notify_data"]["body"]["content"], json!({"a": 1}));
    assert_eq!(message["notify_data"]["body"]["name"], "m");
    let delivered = find("device.message.status", "update", &|e| {
        e["notify_data"]["body"]["status"] == "DELIVERED"
    })
    .expect("message status");
    assert_eq!(delivered["notify_data"]["body"]["message_id"], "down-1");
    let sent = find("device.command.status", "update", &|e| {
        e["notify_data"]["body"]["status"] == "SENT"
    })
    .expect("command status");
    assert!(sent["notify_data"]["body"]["command_id"].is_string());
    let product_created = find("product", "create", &|_| true).expect("product create");
    assert_eq!(
        product_created["notify_data"]["body"]["product_id"],
        product.as_str()
    );
    let product_updated = find("product", "update", &|_| true).expect("product update");
    assert_eq!(
        product_updated["notify_data"]["body"]["description"],
        "changed"
    );
    server.stop().await;
}

/// A CA and a server certificate for `localhost`/127.0.0.1 it signed, made with the openssl CLI.
fn test_pki(dir: &std::path::Path) -> (String, rustls::ServerConfig) {
    use rustls_pki_types::pem::PemObject;
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "openssl {args:?}");
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ioda test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(dir.join("srv.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("srv.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    (std::fs::read_to_string(dir.join("ca.pem")).unwrap(), config)
}

#[tokio::test]
async fn https_push_verifies_the_receiver_against_a_custom_ca() {
    let pki = tempfile::tempdir().unwrap();
    let (ca_pem, server_config) = test_pki(pki.path());
    let (receiver, url) = Receiver::start_tls(server_config).await;
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "tls-1").await;
    let rule_id = activated_rule(&server, json!({"subject": {"resource": "device.property", "event": "report"}, "select": "notify_data.header.device_id AS id"})).await;
    let trusted = json!({"rule_id": rule_id, "channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": url, "ca_pem": ca_pem}}});
    assert_eq!(
        server.post("/routing-rule/actions", trusted).await.status,
        201
    );
    // Without the CA the receiver's certificate cannot be verified: nothing is delivered, and why is visible.
    let untrusted = server.post("/routing-rule/actions", json!({"rule_id": rule_id, "channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": url}}})).await;
    let untrusted_id = untrusted.body["action_id"].as_str().unwrap().to_owned();
    let bad_ca = server.post("/routing-rule/actions", json!({"rule_id": rule_id, "channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": url, "ca_pem": "junk"}}})).await;
    assert_eq!(bad_ca.status, 400, "{}", bad_ca.body);

    let device = SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    report(&device, &device_id, 25.0, 1).await;
    let delivered = wait_accepted(&receiver, 1, 10).await;
    assert_eq!(delivered, vec![json!({"id": device_id})]);
    let status_path = format!("/routing-rule/actions/{untrusted_id}/status");
    eventually("a failed TLS attempt", || async {
        server.get(&status_path).await["failed_attempts"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let status = server.get(&status_path).await;
    assert!(
        status["last_error"].as_str().unwrap().contains("TLS"),
        "{status}"
    );
    assert_eq!(
        receiver.accepted().len(),
        1,
        "the unverified channel delivered nothing"
    );
    device.close().await;
    server.stop().await;
}
