//! The per-device trace: a bounded log of what happened to a device's traffic (refused properties,
//! denied topics, rate limiting, protocol errors) so an operator can see why data went missing.

use rusqlite::{Connection, params};

use crate::{Store, StoreError};

/// Entries kept per device; older ones are pruned.
const KEEP_PER_DEVICE: i64 = 1000;

/// One trace entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceEntry {
    pub id: i64,
    pub device_id: String,
    pub at: i64,
    /// A short machine-readable kind, such as `property_rejected` or `publish_denied`.
    pub kind: String,
    pub detail: serde_json::Value,
}

pub(crate) fn insert_trace(c: &Connection, entries: &[TraceEntry]) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO device_trace (device_id, at, kind, detail) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for entry in entries {
        insert.execute(params![
            entry.device_id,
            entry.at,
            entry.kind,
            entry.detail.to_string()
        ])?;
        let id = c.last_insert_rowid();
        // Prune now and then rather than on every insert; the bound is KEEP_PER_DEVICE plus a little.
        if id % 64 == 0 {
            c.prepare_cached(
                "DELETE FROM device_trace WHERE device_id = ?1 AND id <= \
                 (SELECT id FROM device_trace WHERE device_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?
            .execute(params![entry.device_id, KEEP_PER_DEVICE])?;
        }
    }
    Ok(())
}

impl Store {
    /// Writes trace entries with the next group commit and waits for it, so that once a refusal
    /// has been answered its trace entry is visible.
    pub async fn record_trace(&self, entries: Vec<TraceEntry>) -> Result<(), StoreError> {
        self.write(move |c| insert_trace(c, &entries)).await
    }

    /// Queues trace entries without waiting for their commit (for paths that must not slow down).
    pub async fn append_trace(&self, entries: Vec<TraceEntry>) -> Result<(), StoreError> {
        let _commit = self.submit(move |c| insert_trace(c, &entries)).await?;
        Ok(())
    }

    /// The newest `limit` trace entries of a device, newest first.
    pub async fn trace(
        &self,
        device_id: String,
        limit: i64,
    ) -> Result<Vec<TraceEntry>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, device_id, at, kind, detail FROM device_trace WHERE device_id = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![device_id, limit], |r| {
                let detail: String = r.get(4)?;
                Ok(TraceEntry {
                    id: r.get(0)?,
                    device_id: r.get(1)?,
                    at: r.get(2)?,
                    kind: r.get(3)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}
