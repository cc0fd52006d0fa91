//! Forwarding fixtures: a rule with an HTTP action, and reports that it forwards.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};

use super::receiver::Receiver;
use super::{SimDevice, TestServer};

/// An active rule on property reports (with `select` and `where`) and an HTTP action to `url`;
/// returns the rule's and the action's ids.
pub async fn rule_with_action(
    server: &TestServer,
    select: &str,
    condition: &str,
    url: &str,
) -> (String, String) {
    let rule = server
        .post("/routing-rule/rules", json!({"rule_name": "r", "subject": {"resource": "device.property", "event": "report"}, "select": select, "where": condition}))
        .await;
    assert_eq!(rule.status, 201, "{}", rule.body);
    assert_eq!(rule.body["active"], false, "new rules start inactive");
    let rule_id = rule.body["rule_id"].as_str().unwrap().to_owned();
    let activate = server
        .api
        .call(
            "PUT",
            &format!("/routing-rule/rules/{rule_id}"),
            Some(&json!({"active": true, "select": select, "where": condition})),
        )
        .await
        .unwrap();
    assert_eq!(activate.body["active"], true, "{}", activate.body);
    let action = server
        .post("/routing-rule/actions", json!({"rule_id": rule_id, "channel": "HTTP_FORWARDING", "channel_detail": {"http_forwarding": {"url": url}}}))
        .await;
    assert_eq!(action.status, 201, "{}", action.body);
    (
        rule_id,
        action.body["action_id"].as_str().unwrap().to_owned(),
    )
}

/// A property report of `temp` and `count`, with request id `r<count>`.
pub async fn report(device: &SimDevice, device_id: &str, temp: f64, count: i64) {
    let body = json!({"services": [{"service_id": "Temperature", "properties": {"temp": temp, "count": count}}]});
    device
        .client
        .publish(
            format!("$oc/devices/{device_id}/sys/properties/report?request_id=r{count}"),
            QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .unwrap();
}

/// Publishes a device message in IoTDA's system format (`query` goes after the topic, say
/// `?request_id=m1`, or is empty).
pub async fn message_up(device: &SimDevice, device_id: &str, query: &str) {
    device
        .client
        .publish(
            format!("$oc/devices/{device_id}/sys/messages/up{query}"),
            QoS::AtLeastOnce,
            false,
            br#"{"content": {"a": 1}, "name": "m"}"#.to_vec(),
        )
        .await
        .unwrap();
}

/// Waits until the receiver has accepted `n` bodies.
pub async fn wait_accepted(receiver: &Receiver, n: usize, secs: u64) -> Vec<Value> {
    for _ in 0..secs * 20 {
        if receiver.accepted().len() >= n {
            return receiver.accepted();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("receiver accepted {:?}, wanted {n}", receiver.accepted());
}
