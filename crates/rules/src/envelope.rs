//! IoTDA's push envelope for every platform event:
//! `{resource, event, event_time, event_time_ms, request_id, notify_data: {header, body}}`.

use ioda_types::event::DeviceRef;
use ioda_types::{PlatformEvent, time};
use serde_json::{Map, Value, json};

/// A rule subject: which resource and which event on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject {
    pub resource: &'static str,
    pub event: &'static str,
}

/// Every subject a rule may name.
pub const SUBJECTS: &[Subject] = &[
    Subject {
        resource: "device",
        event: "create",
    },
    Subject {
        resource: "device",
        event: "update",
    },
    Subject {
        resource: "device",
        event: "delete",
    },
    Subject {
        resource: "device.status",
        event: "update",
    },
    Subject {
        resource: "device.property",
        event: "report",
    },
    Subject {
        resource: "device.message",
        event: "report",
    },
    Subject {
        resource: "device.message.status",
        event: "update",
    },
    Subject {
        resource: "device.command.status",
        event: "update",
    },
    Subject {
        resource: "product",
        event: "create",
    },
    Subject {
        resource: "product",
        event: "update",
    },
    Subject {
        resource: "product",
        event: "delete",
    },
];

/// The subject a rule names, if it is one ioda knows; the misspelling `device.commmad.status` that
/// one IoTDA document uses is accepted.
pub fn parse_subject(resource: &str, event: &str) -> Option<Subject> {
    let resource = if resource == "device.commmad.status" {
        "device.command.status"
    } else {
        resource
    };
    SUBJECTS
        .iter()
        .copied()
        .find(|s| s.resource == resource && s.event == event)
}

fn header(d: &DeviceRef) -> Value {
    json!({
        "app_id": d.app_id,
        "device_id": d.device_id,
        "node_id": d.node_id,
        "product_id": d.product_id,
        "gateway_id": d.gateway_id,
        "tags": [],
    })
}

/// The subject of an event; `None` for events no rule can name.
pub fn subject_of(event: &PlatformEvent) -> Option<Subject> {
    let (resource, name) = match event {
        PlatformEvent::DeviceStatusChanged { .. } => ("device.status", "update"),
        PlatformEvent::PropertiesReported { .. } => ("device.property", "report"),
        PlatformEvent::MessageReported { .. } => ("device.message", "report"),
        PlatformEvent::AsyncCommandStatusChanged { .. } => ("device.command.status", "update"),
        PlatformEvent::MessageStatusChanged { .. } => ("device.message.status", "update"),
        PlatformEvent::DeviceCreated { .. } => ("device", "create"),
        PlatformEvent::DeviceUpdated { .. } => ("device", "update"),
        PlatformEvent::DeviceDeleted { .. } => ("device", "delete"),
        PlatformEvent::ProductCreated { .. } => ("product", "create"),
        PlatformEvent::ProductUpdated { .. } => ("product", "update"),
        PlatformEvent::ProductDeleted { .. } => ("product", "delete"),
        PlatformEvent::CommandResponded { .. } => return None,
    };
    parse_subject(resource, name)
}

/// The device an event is about, if any (rules forward per device in order).
pub fn device_of(event: &PlatformEvent) -> Option<&DeviceRef> {
    match event {
        PlatformEvent::DeviceStatusChanged { device, .. }
        | PlatformEvent::PropertiesReported { device, .. }
        | PlatformEvent::MessageReported { device, .. }
        | PlatformEvent::AsyncCommandStatusChanged { device, .. }
        | PlatformEvent::MessageStatusChanged { device, .. }
        | PlatformEvent::DeviceCreated { device, .. }
        | PlatformEvent::DeviceUpdated { device, .. }
        | PlatformEvent::DeviceDeleted { device, .. }
        | PlatformEvent::CommandResponded { device, .. } => Some(device),
        _ => None,
    }
}

/// A reported message's content: JSON when it is JSON (IoTDA's system format contributes its
/// `content`, `name` and `id`), text when it is UTF-8, Base64 otherwise.
fn message_body(topic: &str, payload: &[u8]) -> Value {
    if let Ok(Value::Object(system)) = serde_json::from_slice::<Value>(payload)
        && system.contains_key("content")
    {
        return json!({ "topic": topic, "content": system["content"], "name": system.get("name"), "id": system.get("id") });
    }
    let content = match std::str::from_utf8(payload) {
        Ok(text) => {
            serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        Err(_) => {
            return json!({ "topic": topic, "content": base64(payload), "encoding": "base64" });
        }
    };
    json!({ "topic": topic, "content": content })
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The envelope of an event. `detail` is the full resource where the body carries one (the device
/// for `device` create/update, the product for `product` create/update), looked up by the caller.
pub fn envelope(event: &PlatformEvent, detail: Option<Value>, request_id: &str) -> Option<Value> {
    let subject = subject_of(event)?;
    let (at, header, body) = match event {
        PlatformEvent::PropertiesReported {
            device,
            services,
            at,
            ..
        } => {
            // Built as values, not through `json!`: that would run the properties through serde's
            // serializer, the costliest step of forwarding a report.
            let services: Vec<Value> = services
                .iter()
                .map(|s| {
                    let mut service = Map::with_capacity(3);
                    service.insert("service_id".into(), Value::String(s.service_id.clone()));
                    service.insert("properties".into(), Value::Object(s.properties.clone()));
                    service.insert(
                        "event_time".into(),
                        Value::String(time::format_compact(s.event_time)),
                    );
                    Value::Object(service)
                })
                .collect();
            let mut body = Map::with_capacity(1);
            body.insert("services".into(), Value::Array(services));
            (*at, Some(header(device)), Some(Value::Object(body)))
        }
        PlatformEvent::MessageReported {
            device,
            topic,
            payload,
            at,
            ..
        } => (
            *at,
            Some(header(device)),
            Some(message_body(topic, payload)),
        ),
        PlatformEvent::DeviceStatusChanged {
            device, status, at, ..
        } => {
            let mut body = json!({ "status": status.as_str(), "status_update_time": time::format_iso_millis(*at) });
            if *status == ioda_types::DeviceStatus::Online {
                body["last_online_time"] = json!(time::format_compact(*at));
            }
            (*at, Some(header(device)), Some(body))
        }
        PlatformEvent::AsyncCommandStatusChanged {
            device,
            command_id,
            status,
            result,
            at,
        } => {
            let mut body = detail.clone().unwrap_or_else(|| json!({}));
            body["command_id"] = json!(command_id);
            body["status"] = json!(status.as_str());
            body["result"] = json!(result);
            (*at, Some(header(device)), Some(body))
        }
        PlatformEvent::MessageStatusChanged {
            device,
            message_id,
            status,
            at,
        } => {
            let mut body = detail.clone().unwrap_or_else(|| json!({}));
            body["message_id"] = json!(message_id);
            body["status"] = json!(status.as_str());
            body["timestamp"] = json!(time::format_compact(*at));
            (*at, Some(header(device)), Some(body))
        }
        PlatformEvent::DeviceCreated { at, .. } | PlatformEvent::DeviceUpdated { at, .. } => {
            (*at, None, detail.clone())
        }
        PlatformEvent::DeviceDeleted { device, at } => (*at, Some(header(device)), None),
        PlatformEvent::ProductCreated { at, .. } | PlatformEvent::ProductUpdated { at, .. } => {
            (*at, None, detail.clone())
        }
        PlatformEvent::ProductDeleted {
            project_id: _,
            product_id,
            at,
        } => {
            let body = detail
                .clone()
                .unwrap_or_else(|| json!({ "product_id": product_id }));
            (*at, None, Some(body))
        }
        PlatformEvent::CommandResponded { .. } => return None,
    };
    let mut notify_data = json!({});
    if let Some(header) = header {
        notify_data["header"] = header;
    }
    if let Some(body) = body {
        notify_data["body"] = body;
    }
    let mut envelope = json!({
        "resource": subject.resource,
        "event": subject.event,
        "event_time": time::format_compact(at),
        "event_time_ms": time::format_iso_millis(at),
        "request_id": request_id,
    });
    // Moved in, not passed to `json!`, which would copy the body through serde's serializer.
    envelope["notify_data"] = notify_data;
    Some(envelope)
}

/// A property report's envelope as text, written straight from the report: the same text as
/// `envelope(..).to_string()` (keys in the same sorted order), without building and dropping the
/// value tree, which copied every property (the report path's costliest step in forwarding, for
/// rules that forward the whole envelope and test nothing in it). `None` for other events.
pub fn report_envelope_text(event: &PlatformEvent, request_id: &str) -> Option<String> {
    let PlatformEvent::PropertiesReported {
        device,
        services,
        at,
        ..
    } = event
    else {
        return None;
    };
    let mut out: Vec<u8> = Vec::with_capacity(512);
    out.extend_from_slice(br#"{"event":"report","event_time":"#);
    json_str(&mut out, &time::format_compact(*at));
    out.extend_from_slice(br#","event_time_ms":"#);
    json_str(&mut out, &time::format_iso_millis(*at));
    out.extend_from_slice(br#","notify_data":{"body":{"services":["#);
    for (i, service) in services.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"event_time":"#);
        json_str(&mut out, &time::format_compact(service.event_time));
        out.extend_from_slice(br#","properties":"#);
        out.extend_from_slice(service.properties_json.as_bytes());
        out.extend_from_slice(br#","service_id":"#);
        json_str(&mut out, &service.service_id);
        out.push(b'}');
    }
    out.extend_from_slice(br#"]},"header":{"app_id":"#);
    let fields = [
        (&device.app_id, r#","device_id":"#),
        (&device.device_id, r#","gateway_id":"#),
        (&device.gateway_id, r#","node_id":"#),
        (&device.node_id, r#","product_id":"#),
        (&device.product_id, r#","tags":[]}},"request_id":"#),
    ];
    for (value, next_key) in fields {
        json_str(&mut out, value);
        out.extend_from_slice(next_key.as_bytes());
    }
    json_str(&mut out, request_id);
    out.extend_from_slice(br#","resource":"device.property"}"#);
    String::from_utf8(out).ok()
}

/// Appends `value` as a JSON string, escaped as serde_json escapes it.
fn json_str(out: &mut Vec<u8>, value: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ioda_types::event::ReportedService;

    fn device() -> DeviceRef {
        DeviceRef {
            project_id: "p".into(),
            app_id: "app".into(),
            device_id: "prod_n1".into(),
            node_id: "n1".into(),
            product_id: "prod".into(),
            gateway_id: "prod_n1".into(),
        }
    }

    #[test]
    fn a_report_envelope_written_as_text_is_the_value_tree_rendered() {
        let odd = DeviceRef {
            app_id: "a\"pp\n".into(),
            device_id: "d/é".into(),
            node_id: "n\\1".into(),
            gateway_id: String::new(),
            ..device()
        };
        let props = |v: Value| v.as_object().cloned().unwrap_or_default();
        let service = |id: &str, properties: Value, event_time: i64| {
            ReportedService::new(id.into(), props(properties), event_time)
        };
        let cases: Vec<(DeviceRef, Vec<ReportedService>, i64, &str)> = vec![
            (
                device(),
                vec![service("T", json!({"temp": 21.5}), 0)],
                1_000,
                "r1",
            ),
            (device(), vec![], 1_764_150_000_123, ""),
            (
                odd,
                vec![
                    service(
                        "A",
                        json!({"z": [1, {"b": null}], "a": "x\"y", "m": {"k": true}}),
                        5,
                    ),
                    service("B\"", json!({}), 1_764_150_000_999),
                ],
                1_764_150_001_000,
                "req\u{1}",
            ),
        ];
        for (device, services, at, request_id) in cases {
            let event = PlatformEvent::PropertiesReported {
                device: std::sync::Arc::new(device),
                request_id: request_id.into(),
                services,
                at,
            };
            let tree = envelope(&event, None, request_id).unwrap().to_string();
            assert_eq!(report_envelope_text(&event, request_id), Some(tree));
        }
        let other = PlatformEvent::DeviceDeleted {
            device: std::sync::Arc::new(device()),
            at: 1,
        };
        assert_eq!(report_envelope_text(&other, "r"), None);
    }

    #[test]
    fn property_report_envelope() {
        let mut properties = serde_json::Map::new();
        properties.insert("temp".into(), json!(21.5));
        let event = PlatformEvent::PropertiesReported {
            device: std::sync::Arc::new(device()),
            request_id: "r1".into(),
            services: vec![ReportedService::new("T".into(), properties, 0)],
            at: 1_000,
        };
        let envelope = envelope(&event, None, "r1").unwrap();
        assert_eq!(
            envelope,
            json!({
                "resource": "device.property", "event": "report",
                "event_time": "19700101T000001Z", "event_time_ms": "1970-01-01T00:00:01.000Z", "request_id": "r1",
                "notify_data": {
                    "header": {"app_id": "app", "device_id": "prod_n1", "node_id": "n1", "product_id": "prod", "gateway_id": "prod_n1", "tags": []},
                    "body": {"services": [{"service_id": "T", "properties": {"temp": 21.5}, "event_time": "19700101T000000Z"}]}
                }
            })
        );
    }

    #[test]
    fn message_bodies() {
        assert_eq!(
            message_body("t", br#"{"content": {"a": 1}, "name": "n", "id": "i"}"#),
            json!({"topic": "t", "content": {"a": 1}, "name": "n", "id": "i"})
        );
        assert_eq!(
            message_body("t", b"hello"),
            json!({"topic": "t", "content": "hello"})
        );
        assert_eq!(
            message_body("t", b"[1,2]"),
            json!({"topic": "t", "content": [1, 2]})
        );
        assert_eq!(
            message_body("t", &[0xff, 0x00, 0x10]),
            json!({"topic": "t", "content": "/wAQ", "encoding": "base64"})
        );
    }

    #[test]
    fn subjects() {
        assert_eq!(
            parse_subject("device.commmad.status", "update").map(|s| s.resource),
            Some("device.command.status")
        );
        assert_eq!(parse_subject("device.property", "update"), None);
        assert_eq!(parse_subject("batchtask", "update"), None);
    }
}
