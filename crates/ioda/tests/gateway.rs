//! Gateways over real MQTT connections: a gateway reports its children's properties in one
//! publish, sets their status, adds and deletes them, is told of children the API adds or
//! deletes, and synchronises time; every bad request gets an answer or a trace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{SimDevice, TestServer, eventually, server};
use rumqttc::QoS;
use serde_json::{Value, json};

/// Registers a child of `gateway_id` through the API.
async fn child(server: &TestServer, product_id: &str, gateway_id: &str, node_id: &str) -> String {
    let body = json!({"node_id": node_id, "product_id": product_id, "gateway_id": gateway_id});
    let r = server.post("/devices", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["device_id"].as_str().unwrap().to_owned()
}

/// Publishes an event of the gateway's `$sub_device_manager` (or another service).
async fn event(
    gateway: &SimDevice,
    gateway_id: &str,
    service_id: &str,
    event_type: &str,
    paras: Value,
) {
    let body = json!({
        "object_device_id": gateway_id,
        "services": [{"service_id": service_id, "event_type": event_type, "event_time": "20261128T120000Z", "event_id": "ev-1", "paras": paras}]
    });
    gateway
        .reply(format!("$oc/devices/{gateway_id}/sys/events/up"), body)
        .await;
}

/// The next event to the gateway, which must be of `event_type`: its `services[0]`.
async fn next_event(gateway: &mut SimDevice, gateway_id: &str, event_type: &str) -> Value {
    let (topic, body) = gateway.next().await;
    assert_eq!(topic, format!("$oc/devices/{gateway_id}/sys/events/down"));
    let event = body["services"][0].clone();
    assert_eq!(event["event_type"], event_type, "{body}");
    event
}

async fn report_children(gateway: &SimDevice, gateway_id: &str, devices: Value) {
    gateway
        .reply(
            format!("$oc/devices/{gateway_id}/sys/gateway/sub_devices/properties/report"),
            json!({ "devices": devices }),
        )
        .await;
}

async fn reported(server: &TestServer, device_id: &str) -> Value {
    let shadow = server.get(&format!("/devices/{device_id}/shadow")).await;
    shadow["shadow"][0]["reported"]["properties"].clone()
}

#[tokio::test]
async fn a_gateway_reports_for_its_children_and_keeps_their_status() {
    let server = server().await;
    let product = server.product().await;
    let (gw, secret) = server.device(&product, "gw-1").await;
    let (stranger, _) = server.device(&product, "stranger").await;
    let first = child(&server, &product, &gw, "child-1").await;
    let second = child(&server, &product, &gw, "child-2").await;
    let mut gateway = SimDevice::connect(server.mqtt_port, &gw, &secret, QoS::AtLeastOnce).await;

    report_children(
        &gateway,
        &gw,
        json!([
            {"device_id": first, "services": [{"service_id": "Temperature", "properties": {"temp": 21.5}}]},
            {"device_id": second, "services": [{"service_id": "Temperature", "properties": {"temp": 19, "count": -1}}]},
            {"device_id": stranger, "services": [{"service_id": "Temperature", "properties": {"temp": 30}}]},
            {"device_id": "no-such-device", "services": []}
        ]),
    )
    .await;
    server.wait_reported(&first, json!({"temp": 21.5})).await;
    server.wait_reported(&second, json!({"temp": 19})).await;
    // Each child's report is in its own trace; the refusals are in the gateway's.
    server.wait_trace(&second, "property_rejected").await;
    server.wait_trace(&gw, "sub_device_refused").await;
    assert_eq!(reported(&server, &stranger).await, Value::Null);
    let history = server
        .get(&format!("/devices/{first}/property-history"))
        .await;
    assert_eq!(
        history["reports"][0]["properties"]["temp"], 21.5,
        "{history}"
    );

    event(
        &gateway,
        &gw,
        "$sub_device_manager",
        "sub_device_update_status",
        json!({"device_statuses": [
            {"device_id": first, "status": "ONLINE"},
            {"device_id": second, "status": "OFFLINE"},
            {"device_id": stranger, "status": "ONLINE"},
            {"device_id": first, "status": "SLEEPING"}
        ]}),
    )
    .await;
    let answer = next_event(&mut gateway, &gw, "sub_device_update_status_response").await;
    assert_eq!(answer["event_id"], "ev-1");
    assert_eq!(
        answer["paras"]["successful_devices"],
        json!([{"device_id": first, "status": "ONLINE"}, {"device_id": second, "status": "OFFLINE"}])
    );
    let failed = answer["paras"]["failed_devices"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{answer}");
    assert_eq!(failed[0]["device_id"], stranger.as_str());
    assert_eq!(failed[0]["error_code"], "IOTDA.021104");
    assert_eq!(failed[1]["error_code"], "IOTDA.000006");
    assert_eq!(server.status(&first).await, "ONLINE");
    assert_eq!(server.status(&second).await, "OFFLINE");
    assert_eq!(server.status(&stranger).await, "INACTIVE");

    // IoTDA leaves a child's status to its gateway, even when the gateway goes away.
    gateway.close().await;
    server.wait_status(&gw, "OFFLINE").await;
    assert_eq!(server.status(&first).await, "ONLINE");
    server.stop().await;
}

#[tokio::test]
async fn a_gateway_adds_and_deletes_children_and_hears_of_the_apis() {
    let server = server().await;
    let product = server.product().await;
    let (gw, secret) = server.device(&product, "gw-2").await;
    let (other, _) = server.device(&product, "other-gw").await;
    let mut gateway = SimDevice::connect(server.mqtt_port, &gw, &secret, QoS::AtLeastOnce).await;

    event(
        &gateway,
        &gw,
        "$sub_device_manager",
        "add_sub_device_request",
        json!({"devices": [
            {"node_id": "a", "product_id": product, "name": "child a", "extension_info": {"slot": 1}},
            {"node_id": "b", "product_id": product, "device_id": "chosen-id-b", "parent_device_id": gw},
            {"node_id": "c", "product_id": "no-such-product"},
            {"product_id": product},
            {"node_id": "d", "product_id": product, "parent_device_id": other},
            {"node_id": "a", "product_id": product}
        ]}),
    )
    .await;
    let answer = next_event(&mut gateway, &gw, "add_sub_device_response").await;
    assert_eq!(answer["event_id"], "ev-1");
    let added = answer["paras"]["successful_devices"].as_array().unwrap();
    assert_eq!(added.len(), 2, "{answer}");
    let child_a = format!("{product}_a");
    assert_eq!(added[0]["device_id"], child_a.as_str());
    assert_eq!(added[0]["parent_device_id"], gw.as_str());
    assert_eq!(added[0]["name"], "child a");
    assert_eq!(added[0]["status"], "INACTIVE");
    assert_eq!(added[0]["extension_info"]["slot"], 1);
    assert_eq!(added[1]["device_id"], "chosen-id-b");
    let failed: Vec<(&str, &str)> = answer["paras"]["failed_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["node_id"].as_str().unwrap_or(""),
                f["error_code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        failed,
        [
            ("c", "IOTDA.013000"),
            ("", "IOTDA.000006"),
            ("d", "IOTDA.000006"),
            ("a", "IOTDA.014115")
        ]
    );
    let listed = server.get(&format!("/devices?gateway_id={gw}")).await;
    let mut ids: Vec<&str> = listed["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .filter(|id| *id != gw)
        .collect();
    ids.sort_unstable();
    let mut expected = vec![child_a.as_str(), "chosen-id-b"];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    // What the gateway asked for itself is answered, not notified as well.
    gateway.quiet(300).await;

    // A child the API adds is announced to its connected gateway with a fresh version.
    let child_c = child(&server, &product, &gw, "c").await;
    let notify = next_event(&mut gateway, &gw, "add_sub_device_notify").await;
    assert_eq!(notify["paras"]["devices"][0]["device_id"], child_c.as_str());
    assert_eq!(
        notify["paras"]["devices"][0]["parent_device_id"],
        gw.as_str()
    );
    let first_version = notify["paras"]["version"].as_i64().unwrap();
    assert!(first_version > 0);

    event(
        &gateway,
        &gw,
        "$sub_device_manager",
        "delete_sub_device_request",
        json!({"devices": [child_a, other, 7]}),
    )
    .await;
    let answer = next_event(&mut gateway, &gw, "delete_sub_device_response").await;
    assert_eq!(answer["paras"]["successful_devices"], json!([child_a]));
    let failed = answer["paras"]["failed_devices"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{answer}");
    assert!(failed.iter().all(|f| f["error_code"] == "IOTDA.021104"));
    let gone = server
        .api
        .call("GET", &format!("/devices/{child_a}"), None)
        .await
        .unwrap();
    assert_eq!(gone.status, 404);
    assert_eq!(server.status(&other).await, "INACTIVE");

    let r = server
        .api
        .call("DELETE", &format!("/devices/{child_c}"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    let notify = next_event(&mut gateway, &gw, "delete_sub_device_notify").await;
    assert_eq!(notify["paras"]["devices"][0]["device_id"], child_c.as_str());
    let second_version = notify["paras"]["version"].as_i64().unwrap();
    assert!(second_version > first_version);

    // A gateway that asks what changed since a version hears of the deletions after it (`a`,
    // which it asked for itself, and `c`), then gets the whole list, each under a newer version.
    event(
        &gateway,
        &gw,
        "$sub_device_manager",
        "sub_device_sync_request",
        json!({"version": first_version}),
    )
    .await;
    let deleted = next_event(&mut gateway, &gw, "delete_sub_device_notify").await;
    assert_eq!(
        deleted["paras"]["devices"],
        json!([
            {"parent_device_id": gw, "node_id": "a", "device_id": child_a},
            {"parent_device_id": gw, "node_id": "c", "device_id": child_c}
        ])
    );
    let deleted_version = deleted["paras"]["version"].as_i64().unwrap();
    assert!(deleted_version > second_version);
    let notify = next_event(&mut gateway, &gw, "add_sub_device_notify").await;
    assert_eq!(
        notify["paras"]["devices"].as_array().unwrap().len(),
        1,
        "{notify}"
    );
    assert_eq!(notify["paras"]["devices"][0]["device_id"], "chosen-id-b");
    assert!(notify["paras"]["version"].as_i64().unwrap() > deleted_version);
    assert!(!notify["event_id"].as_str().unwrap().is_empty(), "{notify}");
    gateway.quiet(200).await;
    server.stop().await;
}

#[tokio::test]
async fn time_sync_versions_and_other_events() {
    let server = server().await;
    let product = server.product().await;
    let (gw, secret) = server.device(&product, "gw-3").await;
    let first = child(&server, &product, &gw, "child-t").await;
    let mut gateway = SimDevice::connect(server.mqtt_port, &gw, &secret, QoS::AtLeastOnce).await;

    // The Python SDK sends its time as a string of digits.
    event(
        &gateway,
        &gw,
        "$time_sync",
        "time_sync_request",
        json!({"device_send_time": "1582685678789"}),
    )
    .await;
    let answer = next_event(&mut gateway, &gw, "time_sync_response").await;
    let paras = &answer["paras"];
    assert_eq!(paras["device_send_time"], 1582685678789_i64);
    let received = paras["server_recv_time"].as_i64().unwrap();
    let sent = paras["server_send_time"].as_i64().unwrap();
    assert!(received > 1_700_000_000_000 && received <= sent, "{answer}");
    // A request without a readable time is traced, not answered, and another without an
    // event id gets an answer with one.
    event(
        &gateway,
        &gw,
        "$time_sync",
        "time_sync_request",
        json!({"device_send_time": "soon"}),
    )
    .await;
    server.wait_trace(&gw, "event_malformed").await;
    gateway.quiet(200).await;
    let body = json!({"services": [{"service_id": "$time_sync", "event_type": "time_sync_request", "event_id": null, "paras": {"device_send_time": 5}}]});
    gateway
        .reply(format!("$oc/devices/{gw}/sys/events/up"), body)
        .await;
    let answer = next_event(&mut gateway, &gw, "time_sync_response").await;
    assert_eq!(answer["paras"]["device_send_time"], 5);
    assert!(
        answer["event_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{answer}"
    );

    event(
        &gateway,
        &gw,
        "$sdk_info",
        "sdk_info_report",
        json!({"device_sdk_version": "Python_v1.2.0", "sw_version": "v1.0", "fw_version": "v2.0"}),
    )
    .await;
    // A child's version report comes over its gateway's connection.
    let body = json!({"object_device_id": first, "services": [{"service_id": "$ota", "event_type": "version_report", "paras": {"fw_version": "c-fw-3"}}]});
    gateway
        .reply(format!("$oc/devices/{gw}/sys/events/up"), body)
        .await;
    eventually("the versions", || async {
        let device = server.get(&format!("/devices/{gw}")).await;
        let child = server.get(&format!("/devices/{first}")).await;
        device["sw_version"] == "v1.0"
            && device["fw_version"] == "v2.0"
            && device["device_sdk_version"] == "Python_v1.2.0"
            && child["fw_version"] == "c-fw-3"
    })
    .await;

    // An event the platform has no use for is kept in the trace; an unreadable one is refused.
    event(
        &gateway,
        &gw,
        "$log",
        "log_report",
        json!({"type": "DEVICE_STATUS", "content": "up"}),
    )
    .await;
    server.wait_trace(&gw, "event_received").await;
    gateway
        .client
        .publish(
            format!("$oc/devices/{gw}/sys/events/up"),
            QoS::AtLeastOnce,
            false,
            "{\"services\": 5}",
        )
        .await
        .unwrap();
    eventually("an unreadable event document refused", || async {
        let trace = server.get(&format!("/devices/{gw}/trace")).await;
        trace["entries"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "event_malformed"
                && e["detail"]["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not an event document")
        })
    })
    .await;
    // Ten events of one publish are handled, the rest traced.
    let many: Vec<Value> = (0..11).map(|i| json!({"service_id": "$sdk_info", "event_type": "sdk_info_report", "paras": {"sw_version": format!("v{i}")}})).collect();
    gateway
        .reply(
            format!("$oc/devices/{gw}/sys/events/up"),
            json!({"services": many}),
        )
        .await;
    server.wait_trace(&gw, "event_refused").await;
    // So is a status update without its list, and a batch report that is not one.
    event(
        &gateway,
        &gw,
        "$sub_device_manager",
        "sub_device_update_status",
        json!({}),
    )
    .await;
    let answer = next_event(&mut gateway, &gw, "sub_device_update_status_response").await;
    assert!(
        answer["paras"]["error"]
            .as_str()
            .unwrap()
            .contains("device_statuses"),
        "{answer}"
    );
    report_children(&gateway, &gw, json!({"device_id": first})).await;
    server.wait_trace(&gw, "report_malformed").await;
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"device_id": format!("c{i}"), "services": []}))
        .collect();
    report_children(&gateway, &gw, Value::Array(too_many)).await;
    eventually("a refusal of 101 children", || async {
        let trace = server.get(&format!("/devices/{gw}/trace")).await;
        trace["entries"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "report_malformed"
                && e["detail"]["error"].as_str().unwrap_or("").contains("101")
        })
    })
    .await;
    // The connection took all of it and is still there.
    assert_eq!(server.status(&gw).await, "ONLINE");
    gateway.close().await;
    server.stop().await;
}

#[tokio::test]
async fn commands_and_property_requests_reach_a_child_through_its_gateway() {
    let server = server().await;
    let product = server.product().await;
    let (gw, secret) = server.device(&product, "gw-4").await;
    let first = child(&server, &product, &gw, "child-cmd").await;
    let command =
        json!({"service_id": "Temperature", "command_name": "SET_MODE", "paras": {"mode": "auto"}});
    let path = format!("/devices/{first}/commands");

    // No gateway connected: the child cannot be reached.
    let r = server.post(&path, command.clone()).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body["error_code"], "IOTDA.014016");

    let mut gateway = SimDevice::connect(server.mqtt_port, &gw, &secret, QoS::AtLeastOnce).await;
    let call = common::spawn_call(&server, "POST", path, command);
    let (topic, body) = gateway.next().await;
    assert!(
        topic.starts_with(&format!("$oc/devices/{gw}/sys/commands/request_id=")),
        "{topic}"
    );
    assert_eq!(body["object_device_id"], first.as_str());
    assert_eq!(body["command_name"], "SET_MODE");
    let request_id = common::request_id_of(&topic);
    gateway
        .reply(
            format!("$oc/devices/{gw}/sys/commands/response/request_id={request_id}"),
            json!({"result_code": 0, "paras": {"mode": "auto"}}),
        )
        .await;
    let r = call.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["response"]["paras"]["mode"], "auto");

    let api = server.api.clone();
    let get_path = format!("/devices/{first}/properties?service_id=Temperature");
    let call = tokio::spawn(async move { api.call("GET", &get_path, None).await.unwrap() });
    let (topic, body) = gateway.next().await;
    assert!(
        topic.starts_with(&format!("$oc/devices/{gw}/sys/properties/get/request_id=")),
        "{topic}"
    );
    assert_eq!(body["object_device_id"], first.as_str());
    let request_id = common::request_id_of(&topic);
    gateway
        .reply(
            format!("$oc/devices/{gw}/sys/properties/get/response/request_id={request_id}"),
            json!({"services": [{"service_id": "Temperature", "properties": {"temp": 7}}]}),
        )
        .await;
    let r = call.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["response"]["services"][0]["properties"]["temp"], 7,
        "{}",
        r.body
    );
    gateway.close().await;
    server.stop().await;
}

async fn async_status(server: &TestServer, device_id: &str, command_id: &str) -> String {
    let path = format!("/devices/{device_id}/async-commands/{command_id}");
    server.get(&path).await["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn what_waits_for_a_child_goes_out_when_its_gateway_connects() {
    let server = server().await;
    let product = server.product().await;
    let (gw, secret) = server.device(&product, "gw-5").await;
    let (stranger, _) = server.device(&product, "not-a-child").await;
    let first = child(&server, &product, &gw, "child-q").await;
    // The gateway is away: an immediate command fails, a delayed one and a message wait.
    let command = |strategy: &str| json!({"service_id": "Temperature", "command_name": "SET_MODE", "paras": {"mode": "manual"}, "send_strategy": strategy});
    let path = format!("/devices/{first}/async-commands");
    let failed = server.post(&path, command("immediately")).await;
    assert_eq!(failed.body["status"], "FAILED", "{}", failed.body);
    let waiting = server.post(&path, command("delay")).await;
    assert_eq!(waiting.body["status"], "PENDING", "{}", waiting.body);
    let command_id = waiting.body["command_id"].as_str().unwrap().to_owned();
    let cached = server
        .post(
            &format!("/devices/{first}/messages"),
            json!({"message": {"waited": true}}),
        )
        .await;
    assert_eq!(cached.status, 201, "{}", cached.body);
    assert_eq!(cached.body["result"]["status"], "PENDING");
    let message_id = cached.body["message_id"].as_str().unwrap().to_owned();

    let mut gateway = SimDevice::connect(server.mqtt_port, &gw, &secret, QoS::AtLeastOnce).await;
    let mut got = std::collections::HashMap::new();
    for _ in 0..2 {
        let (topic, body) = gateway.next().await;
        assert_eq!(body["object_device_id"], first.as_str(), "{topic}: {body}");
        let kind = if topic.contains("/sys/commands/") {
            "command"
        } else {
            "message"
        };
        got.insert(kind, (topic, body));
    }
    let (topic, body) = &got["command"];
    assert_eq!(
        *topic,
        format!("$oc/devices/{gw}/sys/commands/request_id={command_id}")
    );
    assert_eq!(body["command_name"], "SET_MODE");
    let (topic, body) = &got["message"];
    assert_eq!(*topic, format!("$oc/devices/{gw}/sys/messages/down"));
    assert_eq!(body["id"], message_id.as_str());
    eventually("the message DELIVERED", || async {
        let message = server
            .get(&format!("/devices/{first}/messages/{message_id}"))
            .await;
        message["status"] == "DELIVERED"
    })
    .await;

    // The gateway answers for its child on its own topic; an answer for a device that is not
    // its child is ignored.
    let response = format!("$oc/devices/{gw}/sys/commands/response/request_id={command_id}");
    gateway
        .reply(
            response,
            json!({"result_code": 0, "paras": {"mode": "manual"}}),
        )
        .await;
    eventually("SUCCESSFUL", || async {
        async_status(&server, &first, &command_id).await == "SUCCESSFUL"
    })
    .await;
    let other = server
        .post(
            &format!("/devices/{stranger}/async-commands"),
            command("delay"),
        )
        .await;
    let other_id = other.body["command_id"].as_str().unwrap().to_owned();
    let response = format!("$oc/devices/{gw}/sys/commands/response/request_id={other_id}");
    gateway.reply(response, json!({"result_code": 0})).await;
    server.wait_trace(&gw, "response_ignored").await;
    assert_eq!(async_status(&server, &stranger, &other_id).await, "PENDING");

    // While the gateway is connected, a message to its child goes out at once.
    let sent = server
        .post(
            &format!("/devices/{first}/messages"),
            json!({"message": "now"}),
        )
        .await;
    let (topic, body) = gateway.next().await;
    assert_eq!(topic, format!("$oc/devices/{gw}/sys/messages/down"));
    assert_eq!(body["object_device_id"], first.as_str());
    assert_eq!(body["id"], sent.body["message_id"]);
    gateway.close().await;
    server.stop().await;
}

#[tokio::test]
async fn a_long_child_list_arrives_in_order_and_child_status_survives_a_restart() {
    let clock: std::sync::Arc<dyn ioda_engine::Clock> =
        std::sync::Arc::new(ioda_engine::SystemClock);
    let server = common::server_on(tempfile::tempdir().unwrap(), |_| {}, clock.clone()).await;
    let product = server.product().await;
    let (gw, secret) = server.device(&product, "gw-6").await;
    let mut gateway = SimDevice::connect(server.mqtt_port, &gw, &secret, QoS::AtLeastOnce).await;
    for batch in 0..5 {
        let devices: Vec<Value> = (0..50)
            .map(|i| json!({"node_id": format!("n{batch}-{i}"), "product_id": product}))
            .collect();
        event(
            &gateway,
            &gw,
            "$sub_device_manager",
            "add_sub_device_request",
            json!({ "devices": devices }),
        )
        .await;
        let answer = next_event(&mut gateway, &gw, "add_sub_device_response").await;
        assert_eq!(
            answer["paras"]["successful_devices"]
                .as_array()
                .unwrap()
                .len(),
            50
        );
    }

    // Three notifications of at most a hundred, in the order of their versions (SDKs drop one
    // whose version is not above the last they kept).
    event(
        &gateway,
        &gw,
        "$sub_device_manager",
        "sub_device_sync_request",
        json!({}),
    )
    .await;
    let (mut listed, mut versions) = (std::collections::BTreeSet::new(), Vec::new());
    for expected in [100, 100, 50] {
        let notify = next_event(&mut gateway, &gw, "add_sub_device_notify").await;
        let devices = notify["paras"]["devices"].as_array().unwrap();
        assert_eq!(devices.len(), expected);
        listed.extend(
            devices
                .iter()
                .map(|d| d["device_id"].as_str().unwrap().to_owned()),
        );
        versions.push(notify["paras"]["version"].as_i64().unwrap());
    }
    assert_eq!(listed.len(), 250);
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    gateway.quiet(200).await;

    // Two children's messages may carry the same id: both go out on the gateway's connection.
    let (first, second) = (format!("{product}_n0-0"), format!("{product}_n0-1"));
    for child_id in [&first, &second] {
        let r = server
            .post(
                &format!("/devices/{child_id}/messages"),
                json!({"message_id": "same-id", "message": "hi"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let mut named = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let (_, body) = gateway.next().await;
        assert_eq!(body["id"], "same-id");
        named.insert(body["object_device_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(named, [first.clone(), second.clone()].into());
    // Raw bytes could not name the child to its gateway.
    let raw = server
        .post(
            &format!("/devices/{first}/messages"),
            json!({"message": "hi", "payload_format": "raw"}),
        )
        .await;
    assert_eq!(raw.status, 400, "{}", raw.body);
    assert_eq!(raw.body["error_code"], "IOTDA.000006");

    // The status a gateway gave its child is kept across a restart of the platform.
    let statuses = json!({"device_statuses": [{"device_id": first, "status": "ONLINE"}]});
    event(
        &gateway,
        &gw,
        "$sub_device_manager",
        "sub_device_update_status",
        statuses,
    )
    .await;
    next_event(&mut gateway, &gw, "sub_device_update_status_response").await;
    gateway.close().await;
    let dir = server.stop_keep_dir().await;
    let server = common::server_on(dir, |_| {}, clock).await;
    assert_eq!(server.status(&first).await, "ONLINE");
    assert_eq!(server.status(&gw).await, "OFFLINE");
    server.stop().await;
}
