//! Device events (`$oc/devices/{id}/sys/events/up`): a gateway's management of its children,
//! time synchronisation, and the versions a device reports of itself. Any other event is
//! accepted and traced, so an operator sees what a device sent.

use ioda_mqtt::server::PublishVerdict;
use ioda_store::DeviceVersions;
use ioda_types::time;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::access::DeviceSession;
use crate::downlink::new_request_id;
use crate::gateway::SUB_DEVICE_MANAGER;

/// MQTT 5 "payload format invalid".
pub(crate) const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
/// Events handled from one publish, at most; the rest are traced and dropped (each may cost
/// the platform store work and an answer).
const MAX_EVENTS_PER_PUBLISH: usize = 10;

#[derive(Deserialize)]
struct Events {
    #[serde(default)]
    object_device_id: Option<String>,
    services: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    service_id: String,
    event_type: String,
    /// Device SDKs send `""` when they do not correlate.
    #[serde(default)]
    event_id: Option<String>,
    #[serde(default)]
    paras: Value,
}

/// The topic of events to a device.
pub(crate) fn events_down_topic(device_id: &str) -> String {
    format!("$oc/devices/{device_id}/sys/events/down")
}

/// An event to a device, as IoTDA writes it; `event_id` echoes the request it answers.
pub(crate) fn event_body(
    object_device_id: &str,
    service_id: &str,
    event_type: &str,
    event_id: Option<String>,
    paras: Value,
    now: i64,
) -> Vec<u8> {
    let mut event = json!({
        "service_id": service_id,
        "event_type": event_type,
        "event_time": time::format_compact(now),
        "paras": paras,
    });
    if let Some(event_id) = event_id {
        event["event_id"] = json!(event_id);
    }
    json!({ "object_device_id": object_device_id, "services": [event] })
        .to_string()
        .into_bytes()
}

/// A millisecond time a device sent as a number or, as the Python SDK does, a string of digits.
fn millis(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// `version_report` and `sdk_info_report` paras, as versions to keep.
fn reported_versions(paras: &Value) -> DeviceVersions {
    let field = |key: &str| {
        paras
            .get(key)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty() && v.len() <= 256)
            .map(str::to_owned)
    };
    DeviceVersions {
        fw: field("fw_version"),
        sw: field("sw_version"),
        sdk: field("device_sdk_version"),
    }
}

impl DeviceSession {
    /// Handles each event of an `events/up` publish; the PUBACK follows what they stored.
    pub(crate) async fn handle_events(&mut self, payload: &[u8], now: i64) -> PublishVerdict {
        let events: Events = match serde_json::from_slice(payload) {
            Ok(events) => events,
            Err(error) => {
                let detail = json!({ "error": format!("not an event document: {error}") });
                self.record("event_malformed", detail).await;
                return PublishVerdict::Discard(PAYLOAD_FORMAT_INVALID);
            }
        };
        // Absent, empty or the connected device's own id: the event is the connected device's.
        let child = events
            .object_device_id
            .filter(|id| !id.is_empty() && *id != self.device.device_id);
        let count = events.services.len();
        if count > MAX_EVENTS_PER_PUBLISH {
            let detail = json!({ "events": count, "handled": MAX_EVENTS_PER_PUBLISH, "why": "too many events in one publish" });
            self.record("event_refused", detail).await;
        }
        for event in events.services.into_iter().take(MAX_EVENTS_PER_PUBLISH) {
            self.handle_event(child.as_deref(), event, now).await;
        }
        PublishVerdict::Accept
    }

    async fn handle_event(&mut self, child: Option<&str>, event: Event, now: i64) {
        // An answer echoes its request's id, or carries one of its own.
        let event_id = event
            .event_id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| new_request_id(now));
        let kind = (event.service_id.as_str(), event.event_type.as_str());
        let answer = match (child, kind) {
            (None, (SUB_DEVICE_MANAGER, "sub_device_update_status")) => {
                let paras = self.update_child_statuses(&event.paras, now).await;
                Some(("sub_device_update_status_response", paras))
            }
            (None, (SUB_DEVICE_MANAGER, "add_sub_device_request")) => Some((
                "add_sub_device_response",
                self.add_children(&event.paras).await,
            )),
            (None, (SUB_DEVICE_MANAGER, "delete_sub_device_request")) => {
                let paras = self.delete_children(&event.paras).await;
                Some(("delete_sub_device_response", paras))
            }
            (None, (SUB_DEVICE_MANAGER, "sub_device_sync_request")) => {
                let since = event.paras.get("version").and_then(millis);
                self.start_child_sync(since).await;
                None
            }
            (_, ("$time_sync", "time_sync_request")) => {
                self.answer_time_sync(child, &event.paras, event_id.clone(), now)
                    .await;
                None
            }
            (_, ("$ota", "version_report") | ("$sdk_info", "sdk_info_report")) => {
                self.keep_versions(child, &event.paras).await;
                None
            }
            _ => {
                let detail = json!({ "object_device_id": child, "service_id": event.service_id, "event_type": event.event_type, "event_id": event_id, "paras": event.paras });
                self.record("event_received", detail).await;
                None
            }
        };
        if let Some((event_type, paras)) = answer {
            let own = self.device.device_id.clone();
            self.send_event(&own, SUB_DEVICE_MANAGER, event_type, event_id, paras);
        }
    }

    /// `time_sync_response`, to the device or the child the request named; a request
    /// without a readable `device_send_time` is traced, not answered (SDKs would fail on it).
    async fn answer_time_sync(
        &mut self,
        child: Option<&str>,
        paras: &Value,
        event_id: String,
        now: i64,
    ) {
        let Some(device_send_time) = paras.get("device_send_time").and_then(millis) else {
            let detail = json!({ "event_type": "time_sync_request", "error": "paras.device_send_time must be milliseconds" });
            self.record("event_malformed", detail).await;
            return;
        };
        let subject = child.unwrap_or(&self.device.device_id).to_owned();
        let paras = json!({ "device_send_time": device_send_time, "server_recv_time": now, "server_send_time": self.platform.now() });
        self.send_event(
            &subject,
            "$time_sync",
            "time_sync_response",
            event_id,
            paras,
        );
    }

    /// Answers `sub_device_sync_request` from a task of its own, one at a time per connection:
    /// a request while one is answered is traced and dropped.
    async fn start_child_sync(&mut self, since: Option<i64>) {
        let running = std::mem::replace(&mut self.link.state().child_sync_running, true);
        if running {
            let detail = json!({ "event_type": "sub_device_sync_request", "why": "a sync is being answered" });
            self.record("event_refused", detail).await;
            return;
        }
        let (platform, link) = (self.platform.clone(), self.link.clone());
        let gateway_id = self.device.device_id.clone();
        tokio::spawn(async move {
            platform.sync_children(&gateway_id, since).await;
            link.state().child_sync_running = false;
        });
    }

    /// Sends an event to this connection's device (about itself or a child) from another
    /// task: this connection's task is the only reader of its own outbox.
    fn send_event(
        &self,
        object_device_id: &str,
        service_id: &'static str,
        event_type: &'static str,
        event_id: String,
        paras: Value,
    ) {
        let platform = self.platform.clone();
        let device_id = self.device.device_id.clone();
        let body = event_body(
            object_device_id,
            service_id,
            event_type,
            Some(event_id),
            paras,
            platform.now(),
        );
        tokio::spawn(async move {
            let topic = events_down_topic(&device_id);
            if platform.push(&device_id, topic, body, false).await.is_err() {
                let detail = json!({ "event_type": event_type, "why": "the device went away" });
                platform
                    .trace_now(&device_id, "event_not_sent", detail)
                    .await;
            }
        });
    }

    /// The versions a device (or one of this gateway's children) reported of itself.
    async fn keep_versions(&mut self, child: Option<&str>, paras: &Value) {
        let versions = reported_versions(paras);
        if versions == DeviceVersions::default() {
            return;
        }
        let subject = match child {
            None => self.device.device_id.clone(),
            Some(child)
                if self
                    .platform
                    .is_child_of(child, &self.device.device_id)
                    .await =>
            {
                child.to_owned()
            }
            Some(child) => {
                let detail = json!({ "device_id": child, "why": "not a child of this gateway" });
                self.record("sub_device_refused", detail).await;
                return;
            }
        };
        if let Err(error) = self.platform.store.set_versions(subject, versions).await {
            tracing::warn!(%error, "could not keep a device's versions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_times_are_read_as_numbers_or_digits() {
        let cases = [
            (json!(1582685678789_i64), Some(1582685678789)),
            (json!("1582685678789"), Some(1582685678789)),
            (json!("soon"), None),
            (json!(1.5), None),
            (json!(null), None),
        ];
        for (value, expected) in cases {
            assert_eq!(millis(&value), expected, "{value}");
        }
    }

    #[test]
    fn versions_keep_only_what_was_reported() {
        let cases = [
            (
                json!({"fw_version": "f1", "sw_version": "s1"}),
                (Some("f1"), Some("s1"), None),
            ),
            (
                json!({"device_sdk_version": "C_v1.0.0", "sw_version": ""}),
                (None, None, Some("C_v1.0.0")),
            ),
            (json!({"fw_version": 3}), (None, None, None)),
            (json!({"fw_version": "x".repeat(257)}), (None, None, None)),
            (json!(null), (None, None, None)),
        ];
        for (paras, (fw, sw, sdk)) in cases {
            let v = reported_versions(&paras);
            assert_eq!(
                (v.fw.as_deref(), v.sw.as_deref(), v.sdk.as_deref()),
                (fw, sw, sdk),
                "{paras}"
            );
        }
    }

    #[test]
    fn an_answer_echoes_its_request() {
        let body = event_body(
            "gw",
            SUB_DEVICE_MANAGER,
            "add_sub_device_response",
            Some("e1".into()),
            json!({"a": 1}),
            0,
        );
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["object_device_id"], "gw");
        let event = &value["services"][0];
        assert_eq!(event["event_id"], "e1");
        assert_eq!(event["event_type"], "add_sub_device_response");
        assert_eq!(event["event_time"], "19700101T000000Z");
        assert_eq!(event["paras"]["a"], 1);
        let body = event_body("gw", "$time_sync", "time_sync_response", None, json!({}), 0);
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert!(value["services"][0].get("event_id").is_none());
    }
}
