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
use crate::registry::{DesiredPush, Link, ShadowCache};
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

/// How often a shadow load reads the store again when a report committed meanwhile, before it
/// keeps what it read (a device reporting faster than the store answers; its next report mends).
const SHADOW_LOAD_ATTEMPTS: u32 = 4;

/// When a desired-state push goes out although the connection has pushed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// On connect and after a report: unless a push went unanswered less than
    /// `PUSH_PROTECTION_MS` ago.
    UnlessUnanswered,
    /// After a desired-state change: unless the last push already carried these very versions
    /// (the connection loaded the change first, when it delivered its queued downlinks).
    NewDesired,
}

impl Push {
    fn holds_back(self, last: &DesiredPush, versions: &[(String, i64)], now: i64) -> bool {
        match self {
            Push::UnlessUnanswered => !last.answered && now - last.at < PUSH_PROTECTION_MS,
            Push::NewDesired => last.versions == versions,
        }
    }
}

/// Whether a shadow load replaces the connection's cached shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Load {
    /// After a desired-state change: what is cached is out of date.
    Replace,
    /// When queued downlinks are delivered: a shadow loaded meanwhile is as new.
    IfMissing,
}

fn shadow_cache(rows: Vec<ShadowRow>) -> HashMap<String, ShadowCache> {
    rows.into_iter()
        .map(|r| {
            let cache = ShadowCache {
                desired: r.desired.unwrap_or_default(),
                reported: r.reported.unwrap_or_default(),
                version: r.version,
            };
            (r.service_id, cache)
        })
        .collect()
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
            self.load_shadow_cache(device_id, &link, Load::Replace)
                .await;
            self.push_desired(device_id, &link, Push::NewDesired).await;
        }
        Ok(self.store.shadow(device_id.to_owned()).await?)
    }

    /// Loads the device's shadow into its connection, for comparing reports with desired state;
    /// whether it was installed. `Load::IfMissing` leaves a shadow already loaded alone.
    ///
    /// A report that commits while the store is read may be missing from what was read, and its
    /// comparison (`after_report`) may have run against the old cache or none: then it reads
    /// again, so the cache never holds reported values older than the device's last report.
    pub(crate) async fn load_shadow_cache(&self, device_id: &str, link: &Link, load: Load) -> bool {
        for attempt in 1..=SHADOW_LOAD_ATTEMPTS {
            let generation = {
                let state = link.state();
                if load == Load::IfMissing && state.shadow.is_some() {
                    return false;
                }
                state.shadow_generation
            };
            let Ok(rows) = self.store.shadow(device_id.to_owned()).await else {
                return false;
            };
            let mut state = link.state();
            if load == Load::IfMissing && state.shadow.is_some() {
                return false;
            }
            if state.shadow_generation != generation && attempt < SHADOW_LOAD_ATTEMPTS {
                continue;
            }
            let mut fresh = shadow_cache(rows);
            // A service a later load (or report) put in meanwhile is at least as new: kept.
            if let Some(cached) = state.shadow.take() {
                for (service_id, entry) in cached {
                    if fresh
                        .get(&service_id)
                        .is_none_or(|read| entry.version >= read.version)
                    {
                        fresh.insert(service_id, entry);
                    }
                }
            }
            state.shadow = Some(fresh);
            state.shadow_generation += 1;
            return true;
        }
        false
    }

    /// Notes that a report of this connection committed; whether desired state waits to be
    /// compared with it (`after_report`).
    pub(crate) fn report_committed(&self, link: &Link) -> bool {
        let mut state = link.state();
        state.shadow_generation += 1;
        state
            .shadow
            .as_ref()
            .is_some_and(|cache| cache.values().any(|c| !c.desired.is_empty()))
    }

    /// Sends the desired properties that differ from the reported ones as a properties/set,
    /// unless `when` says the last push stands.
    pub(crate) async fn push_desired(&self, device_id: &str, link: &Link, when: Push) {
        let now = self.now();
        let (request_id, services) = {
            let mut state = link.state();
            let Some(cache) = &state.shadow else {
                return;
            };
            let mut unmet: Vec<(&String, i64, Map<String, Value>)> = cache
                .iter()
                .map(|(service_id, c)| (service_id, c.version, difference(c)))
                .filter(|(_, _, diff)| !diff.is_empty())
                .collect();
            if unmet.is_empty() {
                return;
            }
            unmet.sort_by(|a, b| a.0.cmp(b.0));
            let versions: Vec<(String, i64)> = unmet
                .iter()
                .map(|(service_id, version, _)| ((*service_id).clone(), *version))
                .collect();
            if state
                .desired_push
                .as_ref()
                .is_some_and(|last| when.holds_back(last, &versions, now))
            {
                return;
            }
            let services: Vec<Value> = unmet
                .into_iter()
                .map(
                    |(service_id, _, diff)| json!({ "service_id": service_id, "properties": diff }),
                )
                .collect();
            let request_id = new_request_id(now);
            state.desired_push = Some(DesiredPush {
                request_id: request_id.clone(),
                at: now,
                versions,
                answered: false,
            });
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
            self.push_desired(device_id, link, Push::UnlessUnanswered)
                .await;
        }
    }

    /// Whether a properties/set response answers the last desired-state push (which it then
    /// marks answered).
    pub(crate) fn desired_push_answered(&self, link: &Link, request_id: &str) -> bool {
        let mut state = link.state();
        match state.desired_push.as_mut() {
            Some(last) if !last.answered && last.request_id == request_id => {
                last.answered = true;
                true
            }
            _ => false,
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

#[cfg(test)]
mod tests {
    use super::{DesiredPush, PUSH_PROTECTION_MS, Push};

    #[test]
    fn when_an_earlier_push_holds_the_next_back() {
        let last = |answered: bool, at: i64| DesiredPush {
            request_id: "r".into(),
            at,
            versions: vec![("Temperature".into(), 2)],
            answered,
        };
        let same = vec![("Temperature".to_owned(), 2)];
        let newer = vec![("Temperature".to_owned(), 3)];
        let more = vec![("Humidity".to_owned(), 1), ("Temperature".to_owned(), 2)];
        let now = 10 * PUSH_PROTECTION_MS;
        let recent = now - 1;
        let old = now - PUSH_PROTECTION_MS;
        // (rule, last push answered, sent at, versions now) -> held back
        let table = [
            (Push::UnlessUnanswered, false, recent, &same, true),
            (Push::UnlessUnanswered, false, recent, &newer, true),
            (Push::UnlessUnanswered, false, old, &same, false),
            (Push::UnlessUnanswered, true, recent, &same, false),
            (Push::NewDesired, false, recent, &same, true),
            (Push::NewDesired, true, old, &same, true),
            (Push::NewDesired, false, recent, &newer, false),
            (Push::NewDesired, false, recent, &more, false),
        ];
        for (rule, answered, at, versions, held) in table {
            assert_eq!(
                rule.holds_back(&last(answered, at), versions, now),
                held,
                "{rule:?} answered={answered} at={at} {versions:?}"
            );
        }
    }
}
