//! The desired half of the device shadow: applications set it, the platform pushes the difference
//! to the device (on change, on connect, on each report) until the device reports the same values.
//! Devices can also read their shadow.

use std::collections::HashMap;
use std::sync::Arc;

use ioda_store::{DesiredUpdate, ShadowRow};
use ioda_types::event::ReportedService;
use ioda_types::time;
use serde_json::{Map, Value, json};

use crate::downlink::new_request_id;
use crate::registry::{Link, ShadowCache};
use crate::topic::{properties_set_topic, shadow_response_topic};
use crate::{EngineError, Platform, invalid};

/// After a desired-state push the device did not answer, wait this long before pushing again.
pub const PUSH_PROTECTION_MS: i64 = 5 * 60 * 1000;

/// A desired-state change as an application gives it (`UpdateDesired`).
#[derive(Debug, Clone)]
pub struct DesiredRequest {
    pub service_id: String,
    pub desired: Value,
    pub version: Option<i64>,
}

/// The properties of `desired` whose reported value differs.
fn difference(cache: &ShadowCache) -> Map<String, Value> {
    cache
        .desired
        .iter()
        .filter(|(k, v)| cache.reported.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The shadow as IoTDA shows it, to the API and to devices.
pub fn shadow_json(rows: &[ShadowRow]) -> Vec<Value> {
    let side = |properties: &Option<Map<String, Value>>, at: Option<i64>| json!({ "properties": properties.clone().unwrap_or_default(), "event_time": at.map(time::format_compact) });
    rows.iter()
        .map(|r| {
            json!({
                "service_id": r.service_id,
                "desired": side(&r.desired, r.desired_at),
                "reported": side(&r.reported, r.reported_at),
                "version": r.version,
            })
        })
        .collect()
}

impl Platform {
    /// Changes desired state; validated against the model (writable properties, valid values).
    pub async fn update_desired(
        self: &Arc<Self>,
        project_id: &str,
        device_id: &str,
        requests: Vec<DesiredRequest>,
    ) -> Result<Vec<ShadowRow>, EngineError> {
        let device = self.device(project_id, device_id).await?;
        let product = self
            .product_of(&device)
            .ok_or(EngineError::NotFound("product"))?;
        let mut updates = Vec::with_capacity(requests.len());
        for request in requests {
            let Value::Object(desired) = request.desired else {
                return Err(invalid(format!(
                    "desired of '{}' must be an object",
                    request.service_id
                )));
            };
            if let Some(bad) = desired
                .keys()
                .find(|k| k.is_empty() || k.contains(['.', '$', '\0']))
            {
                return Err(invalid(format!(
                    "desired key '{bad}' must not be empty or contain '.', '$' or NUL"
                )));
            }
            // A null value removes the key; the rest must be valid writable properties.
            let values: Map<String, Value> = desired
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            crate::devices::check_desired(
                &product,
                vec![(request.service_id.clone(), Value::Object(values))],
            )?;
            updates.push(DesiredUpdate {
                service_id: request.service_id,
                desired,
                version: request.version,
            });
        }
        self.store
            .update_desired(device_id.to_owned(), updates, self.now())
            .await
            .map_err(|e| match e {
                ioda_store::StoreError::Conflict(msg) => EngineError::Conflict(msg),
                other => other.into(),
            })?;
        if let Some(link) = self.registry.link(device_id) {
            self.load_shadow_cache(device_id, &link).await;
            link.state().desired_push = None;
            self.push_desired(device_id, &link).await;
        }
        Ok(self.store.shadow(device_id.to_owned()).await?)
    }

    /// Loads the device's shadow into its connection, for comparing reports with desired state.
    pub(crate) async fn load_shadow_cache(&self, device_id: &str, link: &Link) {
        let Ok(rows) = self.store.shadow(device_id.to_owned()).await else {
            return;
        };
        let cache: HashMap<String, ShadowCache> = rows
            .into_iter()
            .map(|r| {
                (
                    r.service_id,
                    ShadowCache {
                        desired: r.desired.unwrap_or_default(),
                        reported: r.reported.unwrap_or_default(),
                    },
                )
            })
            .collect();
        link.state().shadow = Some(cache);
    }

    /// Sends the desired properties that differ from the reported ones as a properties/set,
    /// unless an unanswered push went out less than five minutes ago.
    pub(crate) async fn push_desired(&self, device_id: &str, link: &Link) {
        let now = self.now();
        let (request_id, services) = {
            let mut state = link.state();
            if state
                .desired_push
                .as_ref()
                .is_some_and(|(_, at)| now - at < PUSH_PROTECTION_MS)
            {
                return;
            }
            let Some(cache) = &state.shadow else {
                return;
            };
            let mut services: Vec<Value> = cache
                .iter()
                .map(|(service_id, c)| (service_id, difference(c)))
                .filter(|(_, diff)| !diff.is_empty())
                .map(|(service_id, diff)| json!({ "service_id": service_id, "properties": diff }))
                .collect();
            if services.is_empty() {
                return;
            }
            services.sort_by(|a, b| a["service_id"].as_str().cmp(&b["service_id"].as_str()));
            let request_id = new_request_id(now);
            state.desired_push = Some((request_id.clone(), now));
            (request_id, services)
        };
        let body = json!({ "object_device_id": device_id, "services": services });
        let topic = properties_set_topic(device_id, &request_id);
        let _ = self
            .push(device_id, topic, body.to_string().into_bytes(), false)
            .await;
    }

    /// After a report: remember the reported values and push desired state still unmet.
    pub(crate) async fn after_report(
        &self,
        device_id: &str,
        link: &Link,
        services: &[ReportedService],
    ) {
        let wants_push = {
            let mut state = link.state();
            let Some(cache) = state.shadow.as_mut() else {
                return;
            };
            for ReportedService {
                service_id,
                properties,
                ..
            } in services
            {
                let entry = cache.entry(service_id.clone()).or_default();
                entry
                    .reported
                    .extend(properties.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            cache.values().any(|c| !difference(c).is_empty())
        };
        if wants_push {
            self.push_desired(device_id, link).await;
        }
    }

    /// Whether a properties/set response answers the last desired-state push (which it then clears).
    pub(crate) fn desired_push_answered(&self, link: &Link, request_id: &str) -> bool {
        let mut state = link.state();
        if state
            .desired_push
            .as_ref()
            .is_some_and(|(id, _)| id == request_id)
        {
            state.desired_push = None;
            true
        } else {
            false
        }
    }

    /// Answers a device's shadow/get on `.../shadow/get/response/request_id=...`.
    pub(crate) async fn answer_shadow_get(
        &self,
        device_id: &str,
        request_id: &str,
        service_id: Option<&str>,
    ) -> Result<(), EngineError> {
        let rows = self.store.shadow(device_id.to_owned()).await?;
        let rows: Vec<ShadowRow> = rows
            .into_iter()
            .filter(|r| service_id.is_none_or(|s| s == r.service_id))
            .collect();
        let body = json!({ "object_device_id": device_id, "shadow": shadow_json(&rows) });
        let topic = shadow_response_topic(device_id, request_id);
        self.push(device_id, topic, body.to_string().into_bytes(), false)
            .await
            .map_err(|_| EngineError::DeviceOffline)?;
        Ok(())
    }
}
