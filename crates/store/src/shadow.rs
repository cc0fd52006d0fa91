//! Device shadows and uplink history: the hot write path of property reports.

use ioda_types::event::ReportedService;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::report_log::HistoryIds;
use crate::routing::{NewForward, insert_forwards};
use crate::shadow_merge::ShadowMerges;
use crate::trace::TraceEntry;
use crate::{Store, StoreError};

/// A property report that passed validation: what to merge into the shadow and keep as history.
#[derive(Debug, Clone)]
pub struct ReportRecord {
    pub device_id: String,
    pub request_id: String,
    pub received_at: i64,
    /// The applied properties of each service, with their JSON text.
    pub services: Vec<ReportedService>,
}

/// A raw message a device reported.
#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub device_id: String,
    pub topic: String,
    pub payload: Vec<u8>,
    pub request_id: String,
    pub received_at: i64,
}

/// One service of a device shadow.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowRow {
    pub service_id: String,
    pub desired: Option<Map<String, Value>>,
    pub desired_at: Option<i64>,
    pub reported: Option<Map<String, Value>>,
    pub reported_at: Option<i64>,
    pub version: i64,
}

/// One stored property report of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub id: i64,
    pub service_id: String,
    pub properties: Map<String, Value>,
    pub event_time: i64,
    pub received_at: i64,
    pub request_id: String,
}

/// Writes a report's history rows and notes its shadow merges in `merges` (which the caller
/// writes out); returns its first and last history row (none when no service applied).
pub(crate) fn write_report(
    c: &Connection,
    report: &ReportRecord,
    ids: &HistoryIds,
    merges: &mut ShadowMerges,
) -> Result<Option<(i64, i64)>, StoreError> {
    // Each history row points at the service's previous one: a report earlier in this batch, or
    // else the row the shadow names.
    let mut history = c.prepare_cached(
        "INSERT INTO property_history (id, device_id, service_id, properties, event_time, received_at, request_id, prev_id) \
         VALUES (?7, ?1, ?2, ?3, ?4, ?5, ?6, \
         COALESCE(?8, (SELECT last_history_id FROM shadows WHERE device_id = ?1 AND service_id = ?2)))",
    )?;
    let mut rows: Option<(i64, i64)> = None;
    for service in &report.services {
        let ReportedService {
            service_id,
            properties,
            properties_json,
            event_time,
        } = service;
        // The text must be the properties' own (`ReportedService::new` writes it).
        debug_assert_eq!(
            serde_json::to_string(properties).ok().as_deref(),
            Some(properties_json.as_str())
        );
        let id = ids.next();
        // Noted first, for the row it follows; if the insert fails, so does the job, and the
        // batch's notes are rebuilt from the history (`shadow_defer`).
        let previous = merges.note(
            &report.device_id,
            service_id,
            (properties, properties_json),
            *event_time,
            id,
        )?;
        history.execute(params![
            report.device_id,
            service_id,
            properties_json,
            event_time,
            report.received_at,
            report.request_id,
            id,
            previous
        ])?;
        rows = Some((rows.map_or(id, |(first, _)| first), id));
    }
    Ok(rows)
}

fn parse_map(text: Option<String>) -> Result<Option<Map<String, Value>>, StoreError> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(StoreError::from)
}

impl Store {
    /// Queues a raw message report; the receiver resolves when it is durable.
    pub async fn submit_message(
        &self,
        message: MessageRecord,
        trace: Vec<TraceEntry>,
        forwards: Vec<NewForward>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let ids = self.forward_ids().clone();
        self.submit_repeatable(move |c| {
            insert_forwards(c, &ids, &forwards, message.received_at)?;
            c.prepare_cached(
                "INSERT INTO message_history (device_id, topic, payload, received_at, request_id) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![message.device_id, message.topic, message.payload, message.received_at, message.request_id])?;
            Ok(())
        }, trace)
        .await
    }

    /// The shadow of a device, one row per service, ordered by service id. Read by the writer,
    /// after it has written the merges waiting in memory (`shadow_defer`).
    pub async fn shadow(&self, device_id: String) -> Result<Vec<ShadowRow>, StoreError> {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT service_id, desired, desired_at, json(reported), reported_at, version FROM shadows \
                 WHERE device_id = ?1 ORDER BY service_id",
            )?;
            let rows = stmt.query_map([device_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (service_id, desired, desired_at, reported, reported_at, version) = row?;
                out.push(ShadowRow {
                    service_id,
                    desired: parse_map(desired)?,
                    desired_at,
                    reported: parse_map(reported)?,
                    reported_at,
                    version,
                });
            }
            Ok(out)
        })
        .await
    }

    /// The newest `limit` property reports of a device, newest first. Read by the writer: the
    /// walk starts from the shadow rows, as written once the merges waiting in memory are.
    pub async fn property_history(
        &self,
        device_id: String,
        limit: i64,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        self.write(move |c| {
            // Up to `limit` steps back along each service's chain, then the newest of them all.
            let mut stmt = c.prepare_cached(
                "WITH RECURSIVE chain(id, step) AS ( \
                   SELECT last_history_id, 1 FROM shadows WHERE device_id = ?1 AND last_history_id IS NOT NULL \
                   UNION ALL \
                   SELECT h.prev_id, chain.step + 1 FROM chain JOIN property_history h ON h.id = chain.id \
                   WHERE h.prev_id IS NOT NULL AND chain.step < ?2) \
                 SELECT h.id, h.service_id, h.properties, h.event_time, h.received_at, h.request_id \
                 FROM chain JOIN property_history h ON h.id = chain.id ORDER BY h.id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![device_id, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, service_id, properties, event_time, received_at, request_id) = row?;
                out.push(HistoryRow { id, service_id, properties: serde_json::from_str(&properties)?, event_time, received_at, request_id });
            }
            Ok(out)
        })
        .await
    }

    /// Deletes stored reports and messages received before `cutoff`, at most `limit` of each per
    /// call (the scheduler calls again), returning how many went.
    pub async fn trim_history(&self, cutoff: i64, limit: i64) -> Result<usize, StoreError> {
        self.write(move |c| {
            let mut removed = 0;
            for table in ["property_history", "message_history"] {
                // Rows arrive in time order: when the oldest is young enough, there is nothing to do.
                let oldest: Option<i64> =
                    c.query_row(&format!("SELECT received_at FROM {table} ORDER BY id LIMIT 1"), [], |r| r.get(0)).optional()?;
                if oldest.is_none_or(|t| t >= cutoff) {
                    continue;
                }
                removed += c.execute(
                    &format!("DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE received_at < ?1 ORDER BY id LIMIT ?2)"),
                    params![cutoff, limit],
                )?;
            }
            Ok(removed)
        })
        .await
    }

    /// How many raw messages a device has reported (for tests and diagnostics).
    pub async fn message_count(&self, device_id: String) -> Result<i64, StoreError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM message_history WHERE device_id = ?1",
                [device_id],
                |r| r.get(0),
            )?)
        })
        .await
    }
}

/// A desired-state change for one service.
#[derive(Debug, Clone)]
pub struct DesiredUpdate {
    pub service_id: String,
    /// Merged into the current desired state (a `null` value removes a key); empty clears it.
    pub desired: Map<String, Value>,
    /// Optimistic lock: when given, must equal the service's current shadow version.
    pub version: Option<i64>,
}

fn apply_desired(
    c: &Connection,
    device_id: &str,
    update: &DesiredUpdate,
    at: i64,
) -> Result<(), StoreError> {
    let current: Option<i64> = c
        .prepare_cached("SELECT version FROM shadows WHERE device_id = ?1 AND service_id = ?2")?
        .query_row([device_id, &update.service_id], |r| r.get(0))
        .optional()?;
    if let Some(expected) = update.version
        && expected != current.unwrap_or(0)
    {
        return Err(StoreError::Conflict(format!(
            "shadow version of {} is {}, not {expected}",
            update.service_id,
            current.unwrap_or(0)
        )));
    }
    let clear = update.desired.is_empty();
    let patch = serde_json::to_string(&update.desired)?;
    c.prepare_cached(
        "INSERT INTO shadows (device_id, service_id, desired, desired_at, version) VALUES (?1, ?2, json_patch('{}', ?3), ?4, 1) \
         ON CONFLICT (device_id, service_id) DO UPDATE SET \
         desired = CASE WHEN ?5 THEN NULL ELSE json_patch(COALESCE(desired, '{}'), ?3) END, \
         desired_at = ?4, version = version + 1",
    )?
    .execute(params![device_id, update.service_id, patch, at, clear])?;
    Ok(())
}

impl Store {
    /// Applies desired-state changes to several services atomically.
    pub async fn update_desired(
        &self,
        device_id: String,
        updates: Vec<DesiredUpdate>,
        at: i64,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            for update in &updates {
                apply_desired(c, &device_id, update, at)?;
            }
            Ok(())
        })
        .await
    }
}
