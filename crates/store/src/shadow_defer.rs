//! Shadow rows written every `FLUSH_EVERY`, not in every commit.
//!
//! A property report's history row is its durable record; its shadow row is a summary of those
//! rows (the merge of every report, in order). Writing the summary in every group commit cost the
//! writer its largest share of work under load: the merge statements, and WAL pages of the shadow
//! table in nearly every commit (six of eleven at 43 500 reports/s, BENCHMARKS.md). So the writer
//! keeps the merges noted by its commits in memory (`ShadowMerges`, one entry per device and
//! service) and writes them out at most every `FLUSH_EVERY`, before any job that may read or
//! change a shadow (every once-job: API writes, deletes, trims, and the shadow and history reads,
//! which run on the writer for this reason), and when it stops.
//!
//! Nothing is lost with the memory. Every history row up to `shadow_mark.applied_through` is in
//! its shadow (a flush of all merges sets it); a newer row is in its shadow exactly when its id is
//! at most the shadow row's `last_history_id` (a flush writes that, and a service's rows are
//! merged in id order). So after a crash, or a commit that failed, the writer notes the rows that
//! are not yet applied again (`replay`), in id order, and the result is the same as if the
//! memory had never gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde_json::{Map, Value};

use crate::StoreError;
use crate::report_log::HistoryIds;
use crate::shadow_merge::ShadowMerges;

/// How long a report's merge may wait in memory before its shadow row is written.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The writer's shadow merges not yet written, across commits.
pub(crate) struct DeferredShadows {
    merges: ShadowMerges,
    flushed_at: Instant,
    /// The memory may not match the database (a transaction holding a flush or notes rolled
    /// back): rebuilt from the history before it is used again.
    stale: bool,
    /// Set while merges wait, so that the checkpointer asks for a flush once the writer is idle.
    waiting: Arc<AtomicBool>,
    ids: HistoryIds,
}

impl DeferredShadows {
    /// Starts with nothing in memory and `stale`, so the first transaction replays what a crash
    /// left unapplied.
    pub(crate) fn new(ids: HistoryIds, waiting: Arc<AtomicBool>) -> DeferredShadows {
        DeferredShadows {
            merges: ShadowMerges::default(),
            flushed_at: Instant::now(),
            stale: true,
            waiting,
            ids,
        }
    }

    /// Where a batch's reports note their merges.
    pub(crate) fn merges(&mut self) -> &mut ShadowMerges {
        &mut self.merges
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.merges.is_empty()
    }

    /// Whether the oldest flush is `FLUSH_EVERY` ago and something waits.
    pub(crate) fn due(&self) -> bool {
        !self.is_empty() && self.flushed_at.elapsed() >= FLUSH_EVERY
    }

    /// Rebuilds the memory from the history if it may be wrong; inside the caller's transaction.
    pub(crate) fn rebuild_if_stale(&mut self, c: &Connection) -> Result<(), StoreError> {
        if self.stale {
            self.replay(c)?;
        }
        Ok(())
    }

    /// Forgets the memory: the transaction it belonged to did not commit.
    pub(crate) fn forget(&mut self) {
        self.merges = ShadowMerges::default();
        self.stale = true;
    }

    /// Notes again, in id order, every committed history row its shadow does not hold yet.
    pub(crate) fn replay(&mut self, c: &Connection) -> Result<(), StoreError> {
        self.merges = ShadowMerges::default();
        let mut stmt = c.prepare_cached(
            "SELECT h.id, h.device_id, h.service_id, h.properties, h.event_time FROM property_history h \
             WHERE h.id > (SELECT applied_through FROM shadow_mark) \
               AND h.id > COALESCE((SELECT s.last_history_id FROM shadows s \
                                    WHERE s.device_id = h.device_id AND s.service_id = h.service_id), 0) \
               AND EXISTS (SELECT 1 FROM devices d WHERE d.device_id = h.device_id) \
             ORDER BY h.id",
        )?;
        let mut rows = stmt.query([])?;
        let mut replayed = 0u64;
        while let Some(row) = rows.next()? {
            let (id, device_id, service_id): (i64, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            let text: String = row.get(3)?;
            let properties: Map<String, Value> = serde_json::from_str(&text)?;
            let _previous = self.merges.note(
                &device_id,
                &service_id,
                (&properties, &text),
                row.get(4)?,
                id,
            )?;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(
                reports = replayed,
                "shadow merges not yet written, replayed from the history"
            );
        }
        self.stale = false;
        self.publish_waiting();
        Ok(())
    }

    /// Writes every waiting merge, as `try_flush`; a failure is logged (the reports themselves
    /// are stored; only their summary waits for the next flush). Says whether the shadow rows
    /// now hold every merge.
    pub(crate) fn flush(&mut self, c: &Connection) -> bool {
        match self.try_flush(c) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, "shadow rows could not be written; they will be rebuilt from the history");
                false
            }
        }
    }

    /// Writes every waiting merge and moves the mark past every history row handed out so far,
    /// inside the caller's transaction, in a savepoint: if it fails, the shadow rows stay as they
    /// were and the memory is rebuilt from the history before its next use.
    pub(crate) fn try_flush(&mut self, c: &Connection) -> Result<(), StoreError> {
        if self.is_empty() {
            return Ok(());
        }
        c.execute_batch("SAVEPOINT shadows")?;
        match self.write_all(c) {
            Ok(()) => {
                c.execute_batch("RELEASE shadows")?;
                self.flushed_at = Instant::now();
                self.publish_waiting();
                Ok(())
            }
            Err(error) => {
                let _ = c.execute_batch("ROLLBACK TO shadows; RELEASE shadows");
                self.forget();
                Err(error)
            }
        }
    }

    fn write_all(&mut self, c: &Connection) -> Result<(), StoreError> {
        self.merges.flush(c)?;
        c.prepare_cached("UPDATE shadow_mark SET applied_through = ?1")?
            .execute([self.ids.last_handed_out()])?;
        Ok(())
    }

    /// Tells the checkpointer whether merges wait (after a batch noted some).
    pub(crate) fn publish_waiting(&self) {
        self.waiting.store(!self.is_empty(), Ordering::Relaxed);
    }
}
