//! Gateways and their children, the IoTDA way: a gateway reports its children's properties in
//! one publish (`sys/gateway/sub_devices/properties/report`), keeps their status and adds and
//! deletes them (`$sub_device_manager` events), and is told of children added or deleted
//! through the API (`add_sub_device_notify`, `delete_sub_device_notify`).

use std::collections::HashMap;

use ioda_mqtt::codec::reason;
use ioda_mqtt::server::PublishVerdict;
use ioda_types::{Device, DeviceStatus, PlatformEvent, StatusCause};
use serde_json::{Value, json};

use crate::access::DeviceSession;
use crate::devices::NewDevice;
use crate::events::PAYLOAD_FORMAT_INVALID;
use crate::report_parse::parse_sub_device_report;
use crate::{EngineError, Platform};

/// The event service of child management.
pub(crate) const SUB_DEVICE_MANAGER: &str = "$sub_device_manager";
/// Children in one batch report over MQTT, at most (IoTDA's limit); also the children named in
/// one notification.
pub(crate) const MAX_CHILDREN_PER_REPORT: usize = 100;
/// Children one add or delete request may name, at most.
const MAX_CHILDREN_PER_REQUEST: usize = 50;
/// Entries in one status update, at most.
const MAX_STATUSES_PER_UPDATE: usize = 100;
/// IoTDA's code for a child that does not exist or is not the gateway's.
const NOT_A_CHILD: &str = "IOTDA.021104";
const INVALID_PARAMETER: &str = "IOTDA.000006";

/// How a child appears in the events to its gateway (IoTDA's DeviceInfo).
pub(crate) fn child_info(platform: &Platform, child: &Device) -> Value {
    let product = platform.cached_product(&child.product_id);
    json!({
        "parent_device_id": child.gateway_id,
        "node_id": child.node_id,
        "device_id": child.device_id,
        "name": child.device_name,
        "description": child.description,
        "manufacturer_id": product.as_ref().and_then(|p| p.manufacturer_name.clone()),
        "model": product.as_ref().map(|p| p.name.clone()),
        "product_id": child.product_id,
        "fw_version": child.fw_version,
        "sw_version": child.sw_version,
        "status": child.shown_status().as_str(),
        "extension_info": child.extension_info,
    })
}

/// The answer when the store cannot say which devices are the gateway's children: every entry
/// failed, with IoTDA's internal error (not "not a child", which would mislead the gateway).
fn store_failure(list: &[Value]) -> Value {
    let failed: Vec<Value> = list
        .iter()
        .map(|entry| {
            let device_id = entry.get("device_id").unwrap_or(entry);
            json!({ "device_id": device_id, "error_code": "IOTDA.000000", "error_msg": "the platform could not read its devices" })
        })
        .collect();
    json!({ "successful_devices": [], "failed_devices": failed })
}

/// An IoTDA error code for a child a request could not add or delete.
fn error_code(error: &EngineError) -> &'static str {
    match error {
        EngineError::Invalid(_) => INVALID_PARAMETER,
        EngineError::NotFound("product") => "IOTDA.013000",
        EngineError::NotFound(_) => NOT_A_CHILD,
        EngineError::Conflict(_) => "IOTDA.014115",
        _ => "IOTDA.000000",
    }
}

/// A list of up to `max` entries under `paras[key]`, or the answer that says why not.
fn entries<'a>(paras: &'a Value, key: &str, max: usize) -> Result<&'a [Value], Value> {
    match paras.get(key).and_then(Value::as_array) {
        Some(list) if !list.is_empty() && list.len() <= max => Ok(list),
        _ => {
            let error = format!("paras.{key} must be an array of 1 to {max} entries");
            Err(json!({ "successful_devices": [], "failed_devices": [], "error": error }))
        }
    }
}

fn string_field(entry: &Value, key: &str) -> Option<String> {
    entry
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl DeviceSession {
    /// This gateway's children among `device_ids`, by id, in one read; `None` when the store
    /// cannot tell.
    async fn children_of_mine(&self, device_ids: Vec<String>) -> Option<HashMap<String, Device>> {
        let found = self.platform.store.devices(device_ids).await.ok()?;
        let gateway = &self.device;
        Some(
            found
                .into_iter()
                .filter(|d| d.gateway_id == gateway.device_id && d.device_id != gateway.device_id)
                .filter(|d| d.project_id == gateway.project_id)
                .map(|d| (d.device_id.clone(), d))
                .collect(),
        )
    }

    /// `sys/gateway/sub_devices/properties/report`: each child's report goes the way a directly
    /// connected device's does (validated against the child's model, stored, forwarded, in the
    /// child's trace); the PUBACK waits for all of them. A child that is not this gateway's is
    /// refused and traced on the gateway; the others are kept.
    pub(crate) async fn report_sub_devices(
        &mut self,
        payload: &[u8],
        request_id: String,
        now: i64,
    ) -> PublishVerdict {
        let children = match parse_sub_device_report(payload) {
            Ok(children) if children.len() <= MAX_CHILDREN_PER_REPORT => children,
            Ok(children) => {
                let error = format!(
                    "{} devices in one report; at most {MAX_CHILDREN_PER_REPORT}",
                    children.len()
                );
                let detail = json!({ "request_id": request_id, "error": error });
                self.record("report_malformed", detail).await;
                return PublishVerdict::Discard(PAYLOAD_FORMAT_INVALID);
            }
            Err(error) => {
                let detail = json!({ "request_id": request_id, "error": error });
                self.record("report_malformed", detail).await;
                return PublishVerdict::Discard(PAYLOAD_FORMAT_INVALID);
            }
        };
        let ids = children.iter().map(|c| c.device_id.clone()).collect();
        let Some(known) = self.children_of_mine(ids).await else {
            return PublishVerdict::Refuse(reason::UNSPECIFIED);
        };
        let mut submitted = Vec::with_capacity(children.len());
        for child in children {
            let Some(record) = known.get(&child.device_id) else {
                let detail = json!({ "request_id": request_id, "device_id": child.device_id, "error_code": NOT_A_CHILD, "why": "not a child of this gateway" });
                self.record("sub_device_refused", detail).await;
                continue;
            };
            let raw = match child.services {
                Ok(raw) => raw,
                Err(error) => {
                    let detail = json!({ "request_id": request_id, "gateway_id": self.device.device_id, "error": error });
                    self.record_on(&child.device_id, "report_malformed", detail)
                        .await;
                    continue;
                }
            };
            match self
                .submit_report(&record.reference(), raw, request_id.clone(), now)
                .await
            {
                Ok(report) => submitted.push(report),
                // The store is stopping or failing: the gateway sends it all again. What was
                // handed over already still gets its follow-up (forwarding, the bus).
                Err(PublishVerdict::Refuse(code)) => {
                    let platform = self.platform.clone();
                    tokio::spawn(async move {
                        for report in submitted {
                            report.committed(&platform).await;
                        }
                    });
                    return PublishVerdict::Refuse(code);
                }
                Err(_) => {} // Traced on the child.
            }
        }
        let platform = self.platform.clone();
        PublishVerdict::AcceptAfter(Box::pin(async move {
            let mut code = reason::SUCCESS;
            for report in submitted {
                if report.committed(&platform).await.is_none() {
                    code = reason::UNSPECIFIED;
                }
            }
            code
        }))
    }

    /// `sub_device_update_status`: each child's status as its gateway sees it (IoTDA leaves
    /// children's status to their gateway). The answer lists what was applied and what not.
    pub(crate) async fn update_child_statuses(&mut self, paras: &Value, now: i64) -> Value {
        let list = match entries(paras, "device_statuses", MAX_STATUSES_PER_UPDATE) {
            Ok(list) => list,
            Err(refusal) => return refusal,
        };
        let ids = list.iter().filter_map(|e| string_field(e, "device_id"));
        let Some(children) = self.children_of_mine(ids.collect()).await else {
            return store_failure(list);
        };
        let (mut successful, mut failed) = (Vec::new(), Vec::new());
        for entry in list {
            let device_id = string_field(entry, "device_id");
            let status = entry
                .get("status")
                .and_then(Value::as_str)
                .and_then(|s| match s {
                    "ONLINE" => Some(DeviceStatus::Online),
                    "OFFLINE" => Some(DeviceStatus::Offline),
                    _ => None,
                });
            let fail = |code: &str, why: &str| json!({ "device_id": device_id, "error_code": code, "error_msg": why });
            let Some(status) = status else {
                failed.push(fail(INVALID_PARAMETER, "status must be ONLINE or OFFLINE"));
                continue;
            };
            let Some(child) = device_id.as_ref().and_then(|id| children.get(id)) else {
                failed.push(fail(NOT_A_CHILD, "not a child of this gateway"));
                continue;
            };
            match self.platform.set_child_status(child, status, now).await {
                Ok(()) => successful
                    .push(json!({ "device_id": child.device_id, "status": status.as_str() })),
                Err(error) => failed.push(fail("IOTDA.000000", &error.to_string())),
            }
        }
        json!({ "successful_devices": successful, "failed_devices": failed })
    }

    /// `add_sub_device_request`: registers children under this gateway (up to 50).
    pub(crate) async fn add_children(&mut self, paras: &Value) -> Value {
        let list = match entries(paras, "devices", MAX_CHILDREN_PER_REQUEST) {
            Ok(list) => list,
            Err(refusal) => return refusal,
        };
        let gateway = self.device.clone();
        let (mut successful, mut failed) = (Vec::new(), Vec::new());
        for entry in list {
            let node_id = string_field(entry, "node_id");
            let product_id = string_field(entry, "product_id");
            let fail = |code: &str, why: String| json!({ "node_id": node_id, "product_id": product_id, "error_code": code, "error_msg": why });
            let parent = string_field(entry, "parent_device_id");
            if parent.as_ref().is_some_and(|p| *p != gateway.device_id) {
                failed.push(fail(
                    INVALID_PARAMETER,
                    "parent_device_id must be this gateway".into(),
                ));
                continue;
            }
            let (Some(node), Some(product)) = (node_id.clone(), product_id.clone()) else {
                let why = "node_id and product_id are required".into();
                failed.push(fail(INVALID_PARAMETER, why));
                continue;
            };
            let new = NewDevice {
                device_id: string_field(entry, "device_id"),
                node_id: node,
                product_id: product,
                device_name: string_field(entry, "name"),
                description: string_field(entry, "description"),
                gateway_id: Some(gateway.device_id.clone()),
                app_id: Some(gateway.app_id.clone()).filter(|a| !a.is_empty()),
                extension_info: entry
                    .get("extension_info")
                    .filter(|e| !e.is_null())
                    .cloned(),
                ..NewDevice::default()
            };
            match self
                .platform
                .register_device(&gateway.project_id, new)
                .await
            {
                Ok(child) => successful.push(child_info(&self.platform, &child)),
                Err(error) => failed.push(fail(error_code(&error), error.to_string())),
            }
        }
        json!({ "successful_devices": successful, "failed_devices": failed })
    }

    /// `delete_sub_device_request`: deletes children of this gateway (up to 50).
    pub(crate) async fn delete_children(&mut self, paras: &Value) -> Value {
        let list = match entries(paras, "devices", MAX_CHILDREN_PER_REQUEST) {
            Ok(list) => list,
            Err(refusal) => return refusal,
        };
        let ids: Vec<String> = list
            .iter()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect();
        let Some(children) = self.children_of_mine(ids).await else {
            return store_failure(list);
        };
        let project_id = self.device.project_id.clone();
        let (mut successful, mut failed) = (Vec::new(), Vec::new());
        for entry in list {
            let fail = |code: &str, why: String| json!({ "device_id": entry, "error_code": code, "error_msg": why });
            let Some(child) = entry.as_str().and_then(|id| children.get(id)) else {
                failed.push(fail(NOT_A_CHILD, "not a child of this gateway".into()));
                continue;
            };
            match self
                .platform
                .remove_device(&project_id, &child.device_id)
                .await
            {
                Ok(removed) => {
                    // Kept for the gateway's next sync; the answer tells it now.
                    self.platform.child_deleted(&removed, false).await;
                    successful.push(json!(child.device_id));
                }
                Err(error) => failed.push(fail(error_code(&error), error.to_string())),
            }
        }
        json!({ "successful_devices": successful, "failed_devices": failed })
    }
}

impl Platform {
    /// Whether `device_id` is a child of `gateway_id`.
    pub(crate) async fn is_child_of(&self, device_id: &str, gateway_id: &str) -> bool {
        matches!(
            self.store.device(device_id.to_owned()).await,
            Ok(Some(d)) if d.gateway_id == gateway_id && d.device_id != gateway_id
        )
    }

    /// A child's status as its gateway reports it; an unchanged one is left as it is (no event).
    async fn set_child_status(
        &self,
        child: &Device,
        status: DeviceStatus,
        now: i64,
    ) -> Result<(), EngineError> {
        if child.status == status {
            return Ok(());
        }
        self.store
            .set_status(child.device_id.clone(), status, now)
            .await?;
        self.bus.publish(PlatformEvent::DeviceStatusChanged {
            device: child.reference(),
            status,
            cause: StatusCause::GatewayReported,
            at: now,
        });
        Ok(())
    }
}
