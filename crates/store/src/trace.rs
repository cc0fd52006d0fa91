//! The per-device trace: a bounded log of what happened to a device's traffic (refused properties,
//! denied topics, rate limiting, protocol errors) so an operator can see why data went missing.

use std::sync::{Arc, Mutex};

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

/// Trace entries of work that has committed but that are not in `device_trace` yet. The writer
/// adds a job's entries once its transaction commits and writes them out together now and then
/// (`flush`), so a busy device's trace costs one page write per flush rather than one per report
/// (page writes were the largest cost of a commit). Reads merge them in, so nothing is hidden; a
/// crash loses at most the entries of the last quarter second, never the data they describe.
#[derive(Debug, Default)]
pub(crate) struct PendingTrace {
    entries: Vec<Arc<TraceEntry>>,
    next_id: i64,
}

/// Entries kept waiting at most; beyond it the oldest go (a store that cannot write at all).
const MAX_PENDING: usize = 100_000;
/// Entries one flush writes at most, and the number that makes the writer flush without waiting
/// for the next tick: small enough that a flush adds about a millisecond to its commit.
pub(crate) const FLUSH_CHUNK: usize = 256;

impl PendingTrace {
    /// Starts numbering after the newest stored entry.
    pub(crate) fn after(c: &Connection) -> Result<PendingTrace, StoreError> {
        let last: i64 = c.query_row("SELECT COALESCE(MAX(id), 0) FROM device_trace", [], |r| {
            r.get(0)
        })?;
        Ok(PendingTrace {
            entries: Vec::new(),
            next_id: last + 1,
        })
    }

    /// Numbers the entries of a committed job and makes them visible.
    pub(crate) fn add(&mut self, entries: Vec<TraceEntry>) {
        for mut entry in entries {
            entry.id = self.next_id;
            self.next_id += 1;
            self.entries.push(Arc::new(entry));
        }
        if self.entries.len() > MAX_PENDING {
            let excess = self.entries.len() - MAX_PENDING;
            self.entries.drain(..excess);
            tracing::warn!(
                dropped = excess,
                "trace entries could not be written and were dropped"
            );
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The oldest entries, which a flush writes (they stay visible here until it has committed).
    pub(crate) fn oldest(&self) -> Vec<Arc<TraceEntry>> {
        self.entries[..self.entries.len().min(FLUSH_CHUNK)].to_vec()
    }

    /// Forgets the entries a committed flush wrote (ids grow, so they are those up to `last_id`).
    pub(crate) fn forget_through(&mut self, last_id: i64) {
        self.entries.retain(|e| e.id > last_id);
    }

    /// Forgets a deleted device's entries.
    pub(crate) fn forget_device(&mut self, device_id: &str) {
        self.entries.retain(|e| e.device_id != device_id);
    }

    /// A device's waiting entries, newest first.
    fn of_device(&self, device_id: &str) -> Vec<TraceEntry> {
        self.entries
            .iter()
            .rev()
            .filter(|e| e.device_id == device_id)
            .map(|e| TraceEntry::clone(e))
            .collect()
    }
}

pub(crate) type SharedPendingTrace = Arc<Mutex<PendingTrace>>;

pub(crate) fn lock(pending: &SharedPendingTrace) -> std::sync::MutexGuard<'_, PendingTrace> {
    pending.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes waiting entries (inside the caller's transaction), keeping each device's trace bounded.
pub(crate) fn write_entries(c: &Connection, entries: &[Arc<TraceEntry>]) -> Result<(), StoreError> {
    let mut insert = c.prepare_cached(
        "INSERT INTO device_trace (id, device_id, at, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for entry in entries {
        insert.execute(params![
            entry.id,
            entry.device_id,
            entry.at,
            entry.kind,
            entry.detail.to_string()
        ])?;
        // Prune now and then rather than on every insert; the bound is KEEP_PER_DEVICE plus a little.
        if entry.id % 64 == 0 {
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
        self.write_traced(|_| Ok(()), entries).await
    }

    /// Queues trace entries without waiting for their commit (for paths that must not slow down).
    pub async fn append_trace(&self, entries: Vec<TraceEntry>) -> Result<(), StoreError> {
        let _commit = self.submit_traced(|_| Ok(()), entries).await?;
        Ok(())
    }

    /// The newest `limit` trace entries of a device (at most the `KEEP_PER_DEVICE` it keeps),
    /// newest first.
    pub async fn trace(
        &self,
        device_id: String,
        limit: i64,
    ) -> Result<Vec<TraceEntry>, StoreError> {
        let limit = limit.clamp(0, KEEP_PER_DEVICE);
        // Waiting entries first: one flushed meanwhile is then found in the table instead.
        let mut entries = lock(self.pending_trace()).of_device(&device_id);
        let stored = self.read(move |c| {
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
        .await?;
        let newest_stored = stored.first().map_or(i64::MIN, |e| e.id);
        entries.retain(|e| e.id > newest_stored);
        entries.extend(stored);
        entries.truncate(limit as usize);
        Ok(entries)
    }
}
