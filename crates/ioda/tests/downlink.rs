//! Downlink end to end: commands, properties, messages and desired state, with a simulated device
//! and, where time matters, a manual clock moved by the test (no real waiting).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use ioda_engine::ManualClock;
use rumqttc::{Event, Packet, QoS};
use serde_json::{Value, json};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The API client signs with the real time; let the server accept it however far its clock moved.
fn wide_signature_window(config: &mut ioda::config::ServeConfig) {
    config.signature_window_ms = 365 * 24 * 3_600_000;
}

async fn manual_server(clock: &Arc<ManualClock>) -> TestServer {
    server_on(
        tempfile::tempdir().unwrap(),
        wide_signature_window,
        clock.clone(),
    )
    .await
}

async fn command_status(server: &TestServer, device_id: &str, command_id: &str) -> Value {
    server
        .get(&format!("/devices/{device_id}/async-commands/{command_id}"))
        .await
}

#[tokio::test]
async fn synchronous_commands_and_their_errors() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "sync-1").await;
    let path = format!("/devices/{device_id}/commands");
    let command =
        json!({"service_id": "Temperature", "command_name": "SET_MODE", "paras": {"mode": "auto"}});

    let offline = server.post(&path, command.clone()).await;
    assert_eq!(
        (offline.status, offline.body["error_code"].as_str()),
        (403, Some("IOTDA.014016"))
    );

    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    let api = server.api.clone();
    let call = tokio::spawn(async move { api.call("POST", &path, Some(&command)).await.unwrap() });
    let (topic, body) = device.next().await;
    assert!(
        topic.starts_with(&format!("$oc/devices/{device_id}/sys/commands/request_id=")),
        "{topic}"
    );
    assert_eq!(
        body,
        json!({"object_device_id": device_id, "service_id": "Temperature", "command_name": "SET_MODE", "paras": {"mode": "auto"}})
    );
    let request_id = request_id_of(&topic);
    let answer =
        json!({"result_code": 0, "response_name": "COMMAND_RESPONSE", "paras": {"result": "done"}});
    device
        .reply(
            format!("$oc/devices/{device_id}/sys/commands/response/request_id={request_id}"),
            answer.clone(),
        )
        .await;
    let response = call.await.unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.body,
        json!({"command_id": request_id, "response": answer})
    );

    let path = format!("/devices/{device_id}/commands");
    let cases = [
        (
            json!({"service_id": "Temperature", "command_name": "REBOOT", "paras": {}}),
            400,
            "IOTDA.000006",
        ),
        (
            json!({"service_id": "Temperature", "command_name": "SET_MODE", "paras": {"speed": 1}}),
            400,
            "IOTDA.000006",
        ),
        (
            json!({"service_id": "Temperature", "command_name": "SET_MODE", "paras": {"mode": 5}}),
            400,
            "IOTDA.000006",
        ),
        (
            json!({"command_name": "SET_MODE", "paras": "on"}),
            400,
            "IOTDA.000006",
        ),
        (
            json!({"command_name": "SET_MODE", "paras": {}, "timeout": 0}),
            400,
            "IOTDA.000006",
        ),
        (
            json!({"command_name": "SET_MODE", "paras": {}, "colour": 1}),
            400,
            "IOTDA.000008",
        ),
    ];
    for (body, status, code) in cases {
        let r = server.post(&path, body.clone()).await;
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (status, Some(code)),
            "{body}: {}",
            r.body
        );
    }
    let r = server
        .post("/devices/no-such-device/commands", json!({"paras": {}}))
        .await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (404, Some("IOTDA.014000"))
    );
    device.quiet(200).await;

    // A device that does not answer: the call times out, and the late answer is only recorded.
    let r = server
        .post(
            &path,
            json!({"command_name": "SET_MODE", "paras": {"mode": "x"}, "timeout": 1}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (408, Some("IOTDA.014111"))
    );
    let (topic, _) = device.next().await;
    device
        .reply(
            format!(
                "$oc/devices/{device_id}/sys/commands/response/request_id={}",
                request_id_of(&topic)
            ),
            json!({"result_code": 0}),
        )
        .await;
    device
        .reply(
            format!("$oc/devices/{device_id}/sys/commands/response/request_id=never-sent"),
            json!({"result_code": 0}),
        )
        .await;
    eventually("late and unknown answers traced", || async {
        server
            .trace_kinds(&device_id)
            .await
            .iter()
            .filter(|k| *k == "response_ignored")
            .count()
            == 2
    })
    .await;
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn properties_set_and_get_round_trip() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "props-1").await;
    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    let api = server.api.clone();
    let set_path = format!("/devices/{device_id}/properties");
    let set = tokio::spawn(async move {
        api.call(
            "PUT",
            &set_path,
            Some(
                &json!({"services": [{"service_id": "Temperature", "properties": {"temp": 22.5}}]}),
            ),
        )
        .await
        .unwrap()
    });
    let (topic, body) = device.next().await;
    assert!(topic.contains("/sys/properties/set/request_id="), "{topic}");
    assert_eq!(
        body["services"],
        json!([{"service_id": "Temperature", "properties": {"temp": 22.5}}])
    );
    device
        .reply(
            topic.replace("/properties/set/", "/properties/set/response/"),
            json!({"result_code": 0, "result_desc": "success"}),
        )
        .await;
    let set = set.await.unwrap();
    assert_eq!(
        (set.status, &set.body["response"]),
        (200, &json!({"result_code": 0, "result_desc": "success"}))
    );

    let api = server.api.clone();
    let get_path = format!("/devices/{device_id}/properties?service_id=Temperature");
    let get = tokio::spawn(async move { api.call("GET", &get_path, None).await.unwrap() });
    let (topic, body) = device.next().await;
    assert_eq!(
        body,
        json!({"object_device_id": device_id, "service_id": "Temperature"})
    );
    let reported =
        json!({"services": [{"service_id": "Temperature", "properties": {"temp": 22.5}}]});
    device
        .reply(
            topic.replace("/properties/get/", "/properties/get/response/"),
            reported.clone(),
        )
        .await;
    let get = get.await.unwrap();
    assert_eq!((get.status, &get.body["response"]), (200, &reported));

    for bad in [
        json!({"services": [{"service_id": "Temperature", "properties": {"count": 1}}]}),
        json!({"services": [{"service_id": "Temperature", "properties": {"temp": 999}}]}),
    ] {
        let r = server
            .api
            .call(
                "PUT",
                &format!("/devices/{device_id}/properties"),
                Some(&bad),
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (400, Some("IOTDA.000006")),
            "{bad}"
        );
    }
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn async_command_resends_on_schedule_then_times_out() {
    let clock = Arc::new(ManualClock::new(now_ms()));
    let server = manual_server(&clock).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "async-1").await;
    // QoS 0 subscriptions: nothing acknowledges the command but an answer, which never comes.
    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    let created = server
        .post(
            &format!("/devices/{device_id}/async-commands"),
            json!({"command_name": "SET_MODE", "paras": {"mode": "auto"}}),
        )
        .await;
    assert_eq!(created.body["status"], "SENT", "{}", created.body);
    let command_id = created.body["command_id"].as_str().unwrap().to_owned();
    let (topic, _) = device.next().await;
    assert_eq!(request_id_of(&topic), command_id);

    // Resends after 10-15 s, 20-30 s and 40-60 s, always with the same request id.
    for window_end in [15_000, 30_000, 60_000] {
        clock.advance(window_end - 1);
        server.platform().tick().await.unwrap();
        assert_eq!(
            command_status(&server, &device_id, &command_id).await["status"],
            "SENT"
        );
        clock.advance(1);
        server.platform().tick().await.unwrap();
        let (topic, _) = device.next().await;
        assert_eq!(
            request_id_of(&topic),
            command_id,
            "a resend is the same command, not a new one"
        );
    }
    // Then TIMEOUT 80-180 s after the last attempt.
    clock.advance(180_000);
    server.platform().tick().await.unwrap();
    let shown = command_status(&server, &device_id, &command_id).await;
    assert_eq!(shown["status"], "TIMEOUT", "{shown}");
    device.quiet(200).await;
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn acknowledged_command_succeeds_once_and_repeats_are_ignored() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "async-2").await;
    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    let mut bus = server.platform().bus().subscribe();
    let created = server.post(&format!("/devices/{device_id}/async-commands"), json!({"command_name": "SET_MODE", "paras": {"mode": "manual"}, "send_strategy": "immediately"})).await;
    let command_id = created.body["command_id"].as_str().unwrap().to_owned();
    let (topic, _) = device.next().await;
    eventually("DELIVERED after the PUBACK", || async {
        command_status(&server, &device_id, &command_id).await["status"] == "DELIVERED"
    })
    .await;
    let answer = json!({"result_code": 1, "response_name": "NOPE", "paras": {"reason": "busy"}});
    let response_topic = format!(
        "$oc/devices/{device_id}/sys/commands/response/request_id={}",
        request_id_of(&topic)
    );
    device.reply(response_topic.clone(), answer.clone()).await;
    eventually("FAILED after a non-zero result", || async {
        command_status(&server, &device_id, &command_id).await["status"] == "FAILED"
    })
    .await;
    device
        .reply(response_topic, json!({"result_code": 0}))
        .await;
    eventually("the repeat is traced", || async {
        server
            .trace_kinds(&device_id)
            .await
            .contains(&"response_ignored".to_owned())
    })
    .await;
    let shown = command_status(&server, &device_id, &command_id).await;
    assert_eq!(
        (shown["status"].as_str(), &shown["result"]),
        (Some("FAILED"), &answer),
        "a repeated answer is not applied"
    );
    let mut statuses = Vec::new();
    while let Ok(Ok(event)) =
        tokio::time::timeout(std::time::Duration::from_millis(200), bus.recv()).await
    {
        if let ioda_types::PlatformEvent::AsyncCommandStatusChanged { status, .. } = &*event {
            statuses.push(status.as_str());
        }
    }
    assert_eq!(statuses, vec!["PENDING", "SENT", "DELIVERED", "FAILED"]);
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn cached_commands_wait_for_the_device_or_expire() {
    let clock = Arc::new(ManualClock::new(now_ms()));
    let server = manual_server(&clock).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "async-3").await;
    let path = format!("/devices/{device_id}/async-commands");
    let create = |strategy: &str, expire: i64| json!({"command_name": "SET_MODE", "paras": {"mode": "auto"}, "send_strategy": strategy, "expire_time": expire});
    let long = server.post(&path, create("delay", 3600)).await;
    assert_eq!(long.body["status"], "PENDING");
    let short = server.post(&path, create("delay", 60)).await;
    assert_eq!(short.body["status"], "PENDING");
    assert_eq!(
        server.post(&path, create("immediately", 3600)).await.body["status"],
        "FAILED"
    );
    assert_eq!(
        server.post(&path, create("delay", 0)).await.body["status"],
        "EXPIRED"
    );
    for bad in [
        create("delay", -1),
        create("delay", 172_801),
        create("whenever", 10),
    ] {
        let r = server.post(&path, bad.clone()).await;
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (400, Some("IOTDA.000006")),
            "{bad}"
        );
    }
    clock.advance(61_000);
    server.platform().tick().await.unwrap();
    let short_id = short.body["command_id"].as_str().unwrap();
    assert_eq!(
        command_status(&server, &device_id, short_id).await["status"],
        "EXPIRED"
    );

    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    let (topic, _) = device.next().await;
    let long_id = long.body["command_id"].as_str().unwrap();
    assert_eq!(
        request_id_of(&topic),
        long_id,
        "only the live cached command is delivered"
    );
    device
        .reply(
            format!("$oc/devices/{device_id}/sys/commands/response/request_id={long_id}"),
            json!({"result_code": 0}),
        )
        .await;
    eventually("SUCCESSFUL", || async {
        command_status(&server, &device_id, long_id).await["status"] == "SUCCESSFUL"
    })
    .await;
    let listed = server
        .get(&format!(
            "/devices/{device_id}/async-commands?status=EXPIRED"
        ))
        .await;
    assert_eq!(listed["page"]["count"], 2);
    device.quiet(200).await;
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_commands_without_new_ids() {
    let clock = Arc::new(ManualClock::new(now_ms()));
    let server = manual_server(&clock).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "async-4").await;
    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    let sent = server
        .post(
            &format!("/devices/{device_id}/async-commands"),
            json!({"command_name": "SET_MODE", "paras": {"mode": "auto"}}),
        )
        .await;
    let sent_id = sent.body["command_id"].as_str().unwrap().to_owned();
    device.next().await;
    device.close().await;
    let cached = server.post(&format!("/devices/{device_id}/async-commands"), json!({"command_name": "SET_MODE", "paras": {"mode": "manual"}, "send_strategy": "delay"})).await;
    let cached_id = cached.body["command_id"].as_str().unwrap().to_owned();
    let dir = server.stop_keep_dir().await;

    clock.advance(15_000);
    let server = server_on(dir, wide_signature_window, clock.clone()).await;
    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    // Both arrive with their original ids (the unacknowledged one may come twice: redelivery on
    // reconnect and the resend schedule are both at-least-once); no new id ever appears.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let id = request_id_of(&device.next().await.0);
        assert!(
            id == sent_id || id == cached_id,
            "unexpected command id {id}"
        );
        seen.insert(id);
    }
    for id in [&sent_id, &cached_id] {
        device
            .reply(
                format!("$oc/devices/{device_id}/sys/commands/response/request_id={id}"),
                json!({"result_code": 0}),
            )
            .await;
    }
    eventually("both SUCCESSFUL", || async {
        let list = server
            .get(&format!(
                "/devices/{device_id}/async-commands?status=SUCCESSFUL"
            ))
            .await;
        list["page"]["count"] == 2
    })
    .await;
    assert_eq!(
        server
            .get(&format!("/devices/{device_id}/async-commands"))
            .await["page"]["count"],
        2,
        "no command was created twice"
    );
    device.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_message_sent_before_the_queue_is_delivered_goes_out_once_behind_the_cached_ones() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "msg-order").await;
    let path = format!("/devices/{device_id}/messages");
    let send = |id: &'static str| {
        let (server, path) = (&server, &path);
        async move {
            let r = server
                .post(path, json!({"message_id": id, "message": {"id": id}}))
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
        }
    };
    send("m1").await;
    send("m2").await;
    // Connected, not subscribed yet: the cached messages wait for the first SUBSCRIBE (or 2 s).
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    send("m3").await;
    client
        .subscribe(
            format!("$oc/devices/{device_id}/sys/messages/down"),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let is_publish = |e: &Event| matches!(e, Event::Incoming(Packet::Publish(_)));
    let mut got = Vec::new();
    while got.len() < 3 {
        let Event::Incoming(Packet::Publish(p)) = drive(&mut events, 5, is_publish).await.unwrap()
        else {
            unreachable!()
        };
        let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        got.push(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["m1", "m2", "m3"], "in the order they were sent");
    assert!(
        drive(&mut events, 1, is_publish).await.is_err(),
        "each delivered once"
    );
    let _ = client.disconnect().await;
    server.stop().await;
}

#[tokio::test]
async fn a_message_that_may_not_be_cached_goes_out_at_once_after_connect() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "msg-ttl0").await;
    // Connected, its queue not delivered yet (no SUBSCRIBE): a ttl 0 message must not wait
    // for it, or it times out first.
    let (client, mut events) = connect(device_options(server.mqtt_port, &device_id, &secret, 60))
        .await
        .unwrap();
    let path = format!("/devices/{device_id}/messages");
    let r = server
        .post(
            &path,
            json!({"message_id": "now", "message": "x", "ttl": 0}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    drive(&mut events, 5, |e| {
        matches!(e, Event::Incoming(Packet::Publish(_)))
    })
    .await
    .expect("pushed at once");
    eventually("DELIVERED", || async {
        server.get(&format!("{path}/now")).await["status"] == "DELIVERED"
    })
    .await;
    let _ = client.disconnect().await;
    server.stop().await;
}

#[tokio::test]
async fn messages_are_cached_in_order_bounded_and_time_out() {
    let clock = Arc::new(ManualClock::new(now_ms()));
    let server = manual_server(&clock).await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "msg-1").await;
    let path = format!("/devices/{device_id}/messages");
    let mut ids = Vec::new();
    for i in 0..21 {
        let r = server
            .post(
                &path,
                json!({"message_id": format!("m{i:02}"), "message": {"n": i}}),
            )
            .await;
        assert_eq!(
            (r.status, r.body["result"]["status"].as_str()),
            (201, Some("PENDING")),
            "{}",
            r.body
        );
        ids.push(format!("m{i:02}"));
    }
    let evicted = server.get(&format!("{path}/m00")).await;
    assert_eq!(evicted["status"], "FAILED");
    assert_eq!(evicted["error_info"]["error_code"], "IOTDA.014124");
    let big = "x".repeat(300 * 1024);
    let r = server.post(&path, json!({"message": big})).await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (400, Some("IOTDA.000006"))
    );
    let r = server
        .post(&path, json!({"message_id": "m05", "message": "again"}))
        .await;
    assert_eq!(r.status, 409);

    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtLeastOnce).await;
    for want in &ids[1..] {
        let (topic, body) = device.next().await;
        assert_eq!(topic, format!("$oc/devices/{device_id}/sys/messages/down"));
        assert_eq!(&body["id"], want, "cached messages arrive in order");
    }
    eventually("all DELIVERED", || async {
        let list = server.get(&path).await;
        list["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["status"] == "DELIVERED")
            .count()
            == 20
    })
    .await;
    device.close().await;

    // A message cached for more than a day times out.
    let r = server.post(&path, json!({"message": "late"})).await;
    let late_id = r.body["message_id"].as_str().unwrap().to_owned();
    clock.advance(24 * 3_600_000 - 1);
    server.platform().tick().await.unwrap();
    assert_eq!(
        server.get(&format!("{path}/{late_id}")).await["status"],
        "PENDING"
    );
    clock.advance(1);
    server.platform().tick().await.unwrap();
    assert_eq!(
        server.get(&format!("{path}/{late_id}")).await["status"],
        "TIMEOUT"
    );
    server.stop().await;
}

#[tokio::test]
async fn desired_state_is_pushed_until_reported_and_devices_can_read_their_shadow() {
    let server = server().await;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, "shadow-1").await;
    let mut device =
        SimDevice::connect(server.mqtt_port, &device_id, &secret, QoS::AtMostOnce).await;
    let report = json!({"services": [{"service_id": "Temperature", "properties": {"temp": 20.0, "mode": "auto"}}]});
    device
        .client
        .publish(
            format!("$oc/devices/{device_id}/sys/properties/report"),
            QoS::AtLeastOnce,
            false,
            report.to_string(),
        )
        .await
        .unwrap();
    eventually("reported", || async {
        server.get(&format!("/devices/{device_id}/shadow")).await["shadow"][0]["version"] == 1
    })
    .await;

    let shadow_path = format!("/devices/{device_id}/shadow");
    let desired = json!({"shadow": [{"service_id": "Temperature", "desired": {"temp": 25.0, "mode": "auto"}, "version": 1}]});
    let r = server
        .api
        .call("PUT", &shadow_path, Some(&desired))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["shadow"][0]["desired"]["properties"],
        json!({"temp": 25.0, "mode": "auto"})
    );
    assert_eq!(r.body["shadow"][0]["version"], 2);
    let (topic, body) = device.next().await;
    assert!(topic.contains("/sys/properties/set/request_id="), "{topic}");
    assert_eq!(
        body["services"],
        json!([{"service_id": "Temperature", "properties": {"temp": 25.0}}]),
        "only the difference is sent"
    );
    device
        .reply(
            topic.replace("/properties/set/", "/properties/set/response/"),
            json!({"result_code": 0}),
        )
        .await;
    let report = json!({"services": [{"service_id": "Temperature", "properties": {"temp": 25.0}}]});
    device
        .client
        .publish(
            format!("$oc/devices/{device_id}/sys/properties/report"),
            QoS::AtLeastOnce,
            false,
            report.to_string(),
        )
        .await
        .unwrap();
    device.quiet(300).await;

    let stale = server
        .api
        .call("PUT", &shadow_path, Some(&desired))
        .await
        .unwrap();
    assert_eq!(stale.status, 409, "version 1 is stale now: {}", stale.body);
    for bad in [
        json!({"shadow": [{"service_id": "Temperature", "desired": {"count": 3}}]}),
        json!({"shadow": [{"service_id": "Nope", "desired": {"a": 1}}]}),
        json!({"shadow": [{"service_id": "Temperature", "desired": {"a.b": 1}}]}),
    ] {
        let r = server
            .api
            .call("PUT", &shadow_path, Some(&bad))
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (400, Some("IOTDA.000006")),
            "{bad}"
        );
    }

    device
        .reply(
            format!("$oc/devices/{device_id}/sys/shadow/get/request_id=mine-1"),
            json!({"service_id": "Temperature"}),
        )
        .await;
    let (topic, body) = device.next().await;
    assert_eq!(
        topic,
        format!("$oc/devices/{device_id}/sys/shadow/get/response/request_id=mine-1")
    );
    assert_eq!(
        body["shadow"][0]["desired"]["properties"],
        json!({"temp": 25.0, "mode": "auto"})
    );
    assert_eq!(
        body["shadow"][0]["reported"]["properties"],
        json!({"temp": 25.0, "mode": "auto"})
    );
    device.close().await;
    server.stop().await;
}

async fn poll_v5(events: &mut rumqttc::v5::EventLoop) -> rumqttc::v5::Event {
    tokio::time::timeout(std::time::Duration::from_secs(5), events.poll())
        .await
        .expect("an MQTT event within 5 s")
        .expect("the MQTT connection stays up")
}

/// An MQTT 5 device, set up by `adjust`, subscribed to its messages; the client must be kept alive.
const QOS0: rumqttc::v5::mqttbytes::QoS = rumqttc::v5::mqttbytes::QoS::AtMostOnce;
const QOS1: rumqttc::v5::mqttbytes::QoS = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;

async fn v5_message_device(
    server: &TestServer,
    node_id: &str,
    qos: rumqttc::v5::mqttbytes::QoS,
    adjust: impl FnOnce(&mut rumqttc::v5::MqttOptions),
) -> (String, rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let product = server.product().await;
    let (device_id, secret) = server.device(&product, node_id).await;
    let mut options = device_options_v5(server.mqtt_port, &device_id, &secret);
    adjust(&mut options);
    let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 16);
    let down = format!("$oc/devices/{device_id}/sys/messages/down");
    client.subscribe(&down, qos).await.unwrap();
    while !matches!(
        poll_v5(&mut events).await,
        rumqttc::v5::Event::Incoming(P5::SubAck(_))
    ) {}
    (device_id, client, events)
}

#[tokio::test]
async fn mqtt5_maximum_packet_size_fails_oversized_messages_unsent() {
    use rumqttc::v5::Event as E5;
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let server = server().await;
    let (device_id, _client, mut events) = v5_message_device(&server, "small-1", QOS0, |options| {
        options.set_max_packet_size(Some(1024));
    })
    .await;

    // The client said it accepts at most 1 KiB: the big message must not be sent (MQTT 5
    // 3.1.2.11.4) and fails with the reason; the small one goes through (at QoS 0, as subscribed).
    let path = format!("/devices/{device_id}/messages");
    let big = json!({"message_id": "big", "message": "x".repeat(2000)});
    assert_eq!(server.post(&path, big).await.status, 201);
    let small = json!({"message_id": "small", "message": "hello"});
    assert_eq!(server.post(&path, small).await.status, 201);
    let mut received = Vec::new();
    while received.is_empty() {
        if let E5::Incoming(P5::Publish(publish)) = poll_v5(&mut events).await {
            let body: Value = serde_json::from_slice(&publish.payload).unwrap();
            received.push(body["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(received, ["small"]);
    eventually("small DELIVERED", || async {
        server.get(&format!("{path}/small")).await["status"] == "DELIVERED"
    })
    .await;
    let big = server.get(&format!("{path}/big")).await;
    assert_eq!(big["status"], "FAILED", "{big}");
    let reason = big["error_info"]["error_msg"].as_str().unwrap_or_default();
    assert!(reason.contains("at most 1024"), "{big}");
    server.stop().await;
}

#[tokio::test]
async fn mqtt5_receive_maximum_bounds_unacknowledged_publishes() {
    use rumqttc::v5::Event as E5;
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let server = server().await;
    let (device_id, _client, mut events) =
        v5_message_device(&server, "window-1", QOS1, |options| {
            options.set_receive_maximum(Some(2));
            options.set_manual_acks(true);
        })
        .await;

    // The device acknowledges nothing: only two QoS 1 publishes may be outstanding, the rest go at
    // QoS 0 and stay PENDING on the platform (they were not acknowledged).
    let path = format!("/devices/{device_id}/messages");
    for i in 0..4 {
        let message = json!({"message_id": format!("w{i}"), "message": i});
        assert_eq!(server.post(&path, message).await.status, 201);
    }
    let mut qos = Vec::new();
    while qos.len() < 4 {
        if let E5::Incoming(P5::Publish(publish)) = poll_v5(&mut events).await {
            qos.push(publish.qos as u8);
        }
    }
    assert_eq!(qos, [1, 1, 0, 0]);
    for i in 0..4 {
        let status = server.get(&format!("{path}/w{i}")).await["status"].clone();
        assert_eq!(status, "PENDING", "w{i} was never acknowledged");
    }
    server.stop().await;
}
