//! Legacy subscriptions (OceanConnect northbound, `notifyType` + `callbackUrl`): the push bodies of
//! each notify type, built from platform events.

use ioda_types::{Device, PlatformEvent, time};
use serde_json::{Value, json};

/// The notify types ioda pushes.
pub const NOTIFY_TYPES: &[&str] = &[
    "deviceAdded",
    "bindDevice",
    "deviceInfoChanged",
    "deviceDataChanged",
    "deviceDatasChanged",
    "deviceDeleted",
    "commandRsp",
];

/// Checks a callback URL: `http(s)://host:port/path`. A URL without a path is refused, as the
/// legacy platform did; `https` needs TLS, which ioda does not offer yet.
pub fn check_callback_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Err("https callbacks need TLS, which ioda does not offer yet; use http".into());
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("callbackUrl must look like http://host:port/path, got {url:?}"))?;
    match rest.split_once('/') {
        Some((authority, path)) if !authority.is_empty() && !path.is_empty() => Ok(()),
        _ => Err(format!(
            "callbackUrl must include a path, like http://host:port/path; got {url:?}"
        )),
    }
}

fn device_info(d: &Device) -> Value {
    json!({
        "nodeId": d.node_id,
        "name": d.device_name,
        "description": d.description,
        "status": d.shown_status().as_str(),
        "fwVersion": d.fw_version,
        "swVersion": d.sw_version,
        "protocolType": "MQTT",
    })
}

/// The push bodies an event produces for a notify type (none, one, or one per service).
/// `device` is the event's device as stored now, where the body needs its details.
pub fn payloads(notify_type: &str, event: &PlatformEvent, device: Option<&Device>) -> Vec<Value> {
    match (notify_type, event) {
        ("deviceDataChanged", PlatformEvent::PropertiesReported { device: d, request_id, services, .. }) => services
            .iter()
            .map(|s| {
                json!({
                    "notifyType": "deviceDataChanged", "requestId": request_id, "deviceId": d.device_id, "gatewayId": d.gateway_id,
                    "service": { "serviceId": s.service_id, "serviceType": s.service_id, "data": s.properties, "eventTime": time::format_compact(s.event_time) },
                })
            })
            .collect(),
        ("deviceDatasChanged", PlatformEvent::PropertiesReported { device: d, request_id, services, .. }) => {
            let services: Vec<Value> = services
                .iter()
                .map(|s| json!({ "serviceId": s.service_id, "serviceType": s.service_id, "data": s.properties, "eventTime": time::format_compact(s.event_time) }))
                .collect();
            vec![json!({ "notifyType": "deviceDatasChanged", "requestId": request_id, "deviceId": d.device_id, "gatewayId": d.gateway_id, "services": services })]
        }
        ("commandRsp", PlatformEvent::CommandResponded { device: d, command_id, response, at }) => vec![json!({
            "notifyType": "commandRsp",
            "header": { "requestId": command_id, "from": format!("/devices/{}", d.device_id), "to": "/app", "deviceId": d.device_id,
                        "serviceType": Value::Null, "method": "COMMAND_RESPONSE", "timestamp": time::format_compact(*at) },
            "body": response,
        })],
        ("deviceAdded", PlatformEvent::DeviceCreated { device: d, .. }) => vec![json!({
            "notifyType": "deviceAdded", "deviceId": d.device_id, "gatewayId": d.gateway_id,
            "nodeType": if d.gateway_id == d.device_id { "GATEWAY" } else { "ENDPOINT" },
            "deviceInfo": device.map(device_info),
        })],
        ("deviceInfoChanged", PlatformEvent::DeviceUpdated { device: d, .. }) => {
            vec![json!({ "notifyType": "deviceInfoChanged", "deviceId": d.device_id, "gatewayId": d.gateway_id, "deviceInfo": device.map(device_info) })]
        }
        ("deviceDeleted", PlatformEvent::DeviceDeleted { device: d, .. }) => {
            vec![json!({ "notifyType": "deviceDeleted", "deviceId": d.device_id, "gatewayId": d.gateway_id })]
        }
        // bindDevice: the device's first connection ever (its activation).
        ("bindDevice", PlatformEvent::DeviceStatusChanged { device: d, status: ioda_types::DeviceStatus::Online, at, .. }) => match device {
            Some(stored) if stored.first_online_at == Some(*at) => {
                vec![json!({ "notifyType": "bindDevice", "deviceId": d.device_id, "resultCode": "succeeded", "deviceInfo": device_info(stored) })]
            }
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// Whether building a notify type's bodies for this event needs the stored device.
pub fn needs_device(notify_type: &str) -> bool {
    matches!(
        notify_type,
        "deviceAdded" | "deviceInfoChanged" | "bindDevice"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_urls() {
        assert!(check_callback_url("http://127.0.0.1:9000/callback").is_ok());
        assert!(check_callback_url("http://app.example.com:80/a/b").is_ok());
        for bad in [
            "http://127.0.0.1:9000",
            "http://127.0.0.1:9000/",
            "ftp://h:1/x",
            "https://h:443/x",
            "127.0.0.1:9000/x",
        ] {
            assert!(check_callback_url(bad).is_err(), "{bad}");
        }
    }
}
