//! The per-device trace: a bounded log of what happened to a device's traffic (refused properties,
//! denied topics, rate limiting, protocol errors) so an operator can see why data went missing.

use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::{Store, StoreError, TraceDetail};

/// Entries kept per device; older ones are pruned.
pub(crate) const KEEP_PER_DEVICE: i64 = 1000;

/// One trace entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceEntry {
    pub id: i64,
    pub device_id: String,
    pub at: i64,
    /// A short machine-readable kind, such as `property_rejected` or `publish_denied` (borrowed
    /// where it is made: a traced report makes entries, and the kinds are the code's own words).
    pub kind: std::borrow::Cow<'static, str>,
    pub detail: TraceDetail,
}

/// Trace entries of work that has committed but that are not in `device_trace` yet. The writer
/// adds a job's entries once its transaction commits; the trace log's thread writes them out
/// together now and then (see `trace_log`). Reads merge them in, so nothing is hidden; a crash
/// loses at most the entries of the last quarter second, never the data they describe.
#[derive(Debug, Default)]
pub(crate) struct PendingTrace {
    entries: Vec<Arc<TraceEntry>>,
    next_id: i64,
    /// Deleted devices whose stored entries, up to the id given, are still to be removed.
    forgotten: Vec<(String, i64)>,
}

/// Entries kept waiting at most; beyond it the oldest go (a trace file that cannot be written).
const MAX_PENDING: usize = 200_000;
/// Waiting entries beyond which a new entry's detail is shrunk to fit. Details keep the room they
/// were written into (shrinking moved each one), which costs nothing while entries wait a quarter
/// second; a backlog this long (a flush takes a quarter second's entries: 32 000 flat out) means
/// the trace file is not being written, and then up to `MAX_PENDING` of them may wait.
const SHRINK_ABOVE: usize = 65_536;

impl PendingTrace {
    /// Starts numbering after the newest stored entry.
    pub(crate) fn after(c: &Connection) -> Result<PendingTrace, StoreError> {
        let last: i64 = c.query_row("SELECT COALESCE(MAX(id), 0) FROM trace_blocks", [], |r| {
            r.get(0)
        })?;
        Ok(PendingTrace {
            entries: Vec::new(),
            next_id: last + 1,
            forgotten: Vec::new(),
        })
    }

    /// Numbers the entries of a committed job and makes them visible.
    pub(crate) fn add(&mut self, entries: Vec<TraceEntry>) {
        for mut entry in entries {
            entry.id = self.next_id;
            self.next_id += 1;
            if self.entries.len() >= SHRINK_ABOVE {
                entry.detail.shrink_to_fit();
            }
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

    /// The oldest `n` entries, which a flush writes (they stay visible here until it has committed).
    pub(crate) fn oldest(&self, n: usize) -> Vec<Arc<TraceEntry>> {
        self.entries[..self.entries.len().min(n)].to_vec()
    }

    /// Forgets the entries a committed flush wrote (ids grow, so they are those up to `last_id`).
    pub(crate) fn forget_through(&mut self, last_id: i64) {
        // Entries wait in the order they were numbered (added in order, only ever removed), so
        // those written are a prefix: found by a binary search, not a test of every entry while
        // the writer waits for this lock.
        let written = self.entries.partition_point(|e| e.id <= last_id);
        self.entries.drain(..written);
    }

    /// Forgets a deleted device's entries, waiting and stored.
    pub(crate) fn forget_device(&mut self, device_id: &str) {
        self.entries.retain(|e| e.device_id != device_id);
        self.forgotten
            .push((device_id.to_owned(), self.next_id.saturating_sub(1)));
    }

    /// The deleted devices whose stored entries (up to the id given) are to be removed now. They
    /// stay hidden from reads until `removed` says the removal has committed.
    pub(crate) fn forgotten(&self) -> Vec<(String, i64)> {
        self.forgotten.clone()
    }

    /// Drops the first `n` forgotten devices, whose stored entries are gone now.
    pub(crate) fn removed(&mut self, n: usize) {
        self.forgotten.drain(..n.min(self.forgotten.len()));
    }

    /// The newest id of a device's stored entries that a pending deletion hides.
    fn hidden_through(&self, device_id: &str) -> i64 {
        self.forgotten
            .iter()
            .filter(|(d, _)| d == device_id)
            .map(|(_, through)| *through)
            .max()
            .unwrap_or(i64::MIN)
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

impl Store {
    /// Writes trace entries with the next group commit and waits for it, so that once a refusal
    /// has been answered its trace entry is visible.
    pub async fn record_trace(&self, entries: Vec<TraceEntry>) -> Result<(), StoreError> {
        self.submit_repeatable(|_| Ok(()), entries)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Queues trace entries without waiting for their commit (for paths that must not slow down).
    pub async fn append_trace(&self, entries: Vec<TraceEntry>) -> Result<(), StoreError> {
        let _commit = self.submit_repeatable(|_| Ok(()), entries).await?;
        Ok(())
    }

    /// Starts (`Some(until)`) or stops (`None`) tracing a device's successful traffic; starting
    /// it for a device that does not exist is `NotFound`.
    pub async fn set_device_tracing(
        &self,
        device_id: String,
        until: Option<i64>,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            match until {
                // Only for a device that exists: one deleted meanwhile must not leave a trace
                // behind for a device registered later under its id.
                Some(until) => {
                    let stored = c.execute(
                        "INSERT INTO device_tracing (device_id, until) \
                         SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = ?1) \
                         ON CONFLICT (device_id) DO UPDATE SET until = excluded.until",
                        rusqlite::params![device_id, until],
                    )?;
                    if stored == 0 {
                        return Err(StoreError::NotFound);
                    }
                }
                None => {
                    c.execute(
                        "DELETE FROM device_tracing WHERE device_id = ?1",
                        [device_id],
                    )?;
                }
            }
            Ok(())
        })
        .await
    }

    /// The devices whose tracing ends after `now`, with when it ends (the ended ones are removed).
    pub async fn traced_devices(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.write(move |c| {
            c.execute("DELETE FROM device_tracing WHERE until <= ?1", [now])?;
            let mut statement = c.prepare("SELECT device_id, until FROM device_tracing")?;
            let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
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
        let (mut entries, hidden_through) = {
            let pending = lock(self.pending_trace());
            (
                pending.of_device(&device_id),
                pending.hidden_through(&device_id),
            )
        };
        let stored = self
            .trace_log()
            .read(move |c| crate::trace_log::stored_entries(c, &device_id, limit))
            .await?;
        let newest_stored = stored.first().map_or(i64::MIN, |e| e.id);
        entries.retain(|e| e.id > newest_stored);
        entries.extend(stored.into_iter().filter(|e| e.id > hidden_through));
        entries.truncate(limit as usize);
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::{PendingTrace, TraceEntry};
    use crate::TraceDetail;

    fn entry(device_id: &str) -> TraceEntry {
        TraceEntry {
            id: 0,
            device_id: device_id.to_owned(),
            at: 0,
            kind: "k".into(),
            detail: TraceDetail::object().finish(),
        }
    }

    fn waiting_ids(pending: &PendingTrace) -> Vec<i64> {
        pending.entries.iter().map(|e| e.id).collect()
    }

    #[test]
    fn a_long_backlog_keeps_its_details_shrunk() {
        let mut pending = PendingTrace::default();
        pending.add((0..=super::SHRINK_ABOVE).map(|_| entry("a")).collect());
        let spare = |e: &TraceEntry| e.detail.spare_room();
        assert!(
            spare(&pending.entries[0]) > 0,
            "a young entry keeps its room"
        );
        assert_eq!(pending.entries.last().map(|e| spare(e)), Some(0));
    }

    #[test]
    fn a_flush_forgets_exactly_the_entries_it_wrote() {
        // (devices of the waiting entries, a device deleted meanwhile, the flush's last id, ids left)
        let cases: &[(&[&str], Option<&str>, i64, &[i64])] = &[
            (&["a", "b", "a", "b"], None, 2, &[3, 4]),
            (&["a", "b", "a"], None, 0, &[1, 2, 3]),
            (&["a", "b", "a"], None, 3, &[]),
            (&["a", "b", "a", "b"], None, 9, &[]),
            // A deleted device's entries leave gaps; the rest keep their order.
            (&["a", "b", "a", "b", "a"], Some("a"), 2, &[4]),
            (&["a", "b", "a", "b", "a"], Some("b"), 3, &[5]),
        ];
        for (devices, deleted, last_id, left) in cases {
            let mut pending = PendingTrace {
                next_id: 1,
                ..PendingTrace::default()
            };
            pending.add(devices.iter().map(|d| entry(d)).collect());
            if let Some(device) = deleted {
                pending.forget_device(device);
            }
            pending.forget_through(*last_id);
            assert_eq!(
                waiting_ids(&pending),
                left.to_vec(),
                "{devices:?} {deleted:?} {last_id}"
            );
        }
    }
}
