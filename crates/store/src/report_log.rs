//! The stored property reports as the log that report forwarding reads.
//!
//! Forwarding a report used to write a queue row with it and delete the row once delivered: half of
//! the writer's row writes per report. The report's history rows are durable already, so a
//! forwarding action of property reports keeps only a cursor (`forward_cursors`): every report
//! numbered up to it is settled. What is newer is handed to the action in memory right after the
//! commit, in commit order (`AfterCommit`), and is read back from the history after a restart or
//! when the action's memory is full.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::batch::RepeatableJob;
use crate::routing::{ForwardIds, NewForward, insert_forwards};
use crate::shadow::{ReportRecord, write_report};
use crate::shadow_merge::ShadowMerges;
use crate::trace::TraceEntry;
use crate::{Store, StoreError};

/// Called on the writer thread once a report has committed, with the id of its first history row,
/// before any later report's: so a forwarding action sees reports in commit order.
pub type AfterCommit = Box<dyn FnOnce(i64) + Send>;

/// Numbers property history rows. Ids are handed out by the writer, so they grow in commit order;
/// `committed` is the last row of the newest committed report.
#[derive(Debug, Clone)]
pub(crate) struct HistoryIds(Arc<HistoryCounters>);

#[derive(Debug)]
struct HistoryCounters {
    next: AtomicI64,
    committed: AtomicI64,
}

impl HistoryIds {
    /// Starts after every id ever handed out that anything may still name: the newest row, and
    /// the ids shadows, forwarding cursors and the shadows' mark hold (the newest rows may have
    /// gone with a deleted device; an id used again would sit behind a cursor, extend another
    /// device's chain, or be taken for applied to its shadow when replayed: `shadow_defer`).
    pub(crate) fn after_newest(c: &Connection) -> Result<HistoryIds, StoreError> {
        let newest: i64 = c.query_row(
            "SELECT MAX((SELECT COALESCE(MAX(id), 0) FROM property_history), \
                        (SELECT COALESCE(MAX(last_history_id), 0) FROM shadows), \
                        (SELECT COALESCE(MAX(after_id), 0) FROM forward_cursors), \
                        (SELECT COALESCE(MAX(applied_through), 0) FROM shadow_mark))",
            [],
            |r| r.get(0),
        )?;
        Ok(HistoryIds(Arc::new(HistoryCounters {
            next: AtomicI64::new(newest),
            committed: AtomicI64::new(newest),
        })))
    }

    pub(crate) fn next(&self) -> i64 {
        self.0.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The newest id handed out (its report may not have committed yet).
    pub(crate) fn last_handed_out(&self) -> i64 {
        self.0.next.load(Ordering::Relaxed)
    }

    fn committed(&self) -> i64 {
        self.0.committed.load(Ordering::Acquire)
    }

    fn set_committed(&self, last: i64) {
        self.0.committed.fetch_max(last, Ordering::Release);
    }
}

/// A report's write: shadow, history and the queue rows of table-backed actions. Repeatable: if
/// its transaction starts over it runs again with new ids.
struct ReportJob {
    /// Shared with the caller, who keeps it until told of the commit: the report is then freed
    /// on the thread that built it, not on the writer (a free across threads costs the
    /// allocator more, and the writer's time is every report's latency: 5 % of its samples).
    report: Arc<ReportRecord>,
    forwards: Vec<NewForward>,
    forward_ids: ForwardIds,
    history_ids: HistoryIds,
    /// The first and last history row of the last run (none when no service applied).
    ran: Option<Result<Option<(i64, i64)>, StoreError>>,
    after_commit: Option<AfterCommit>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

impl RepeatableJob for ReportJob {
    fn run(&mut self, conn: &Connection, batch_merges: Option<&mut ShadowMerges>) -> bool {
        let mut own = ShadowMerges::default();
        let result = match batch_merges {
            Some(merges) => write_report(conn, &self.report, &self.history_ids, merges),
            None => write_report(conn, &self.report, &self.history_ids, &mut own)
                .and_then(|rows| own.flush(conn).map(|()| rows)),
        };
        let result = result.and_then(|rows| {
            insert_forwards(
                conn,
                &self.forward_ids,
                &self.forwards,
                self.report.received_at,
            )?;
            Ok(rows)
        });
        let ok = result.is_ok();
        self.ran = Some(result);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), String>) {
        let ReportJob {
            report,
            ran,
            after_commit,
            reply,
            history_ids,
            ..
        } = *self;
        // Before the reply: the caller's copy is then the last.
        drop(report);
        let outcome = match (commit, ran) {
            (Ok(()), Some(Ok(rows))) => {
                if let Some((first, last)) = rows {
                    if let Some(after_commit) = after_commit {
                        after_commit(first);
                    }
                    history_ids.set_committed(last);
                }
                Ok(())
            }
            (Ok(()), Some(Err(e))) => Err(e),
            (Ok(()), None) => Err(StoreError::CommitFailed("the job never ran".into())),
            (Err(e), _) => Err(StoreError::CommitFailed(e)),
        };
        let _ = reply.send(outcome);
    }
}

/// One stored row of a property report, as forwarding reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedService {
    pub id: i64,
    pub device_id: String,
    pub request_id: String,
    pub service_id: String,
    /// The applied properties as stored (a JSON object).
    pub properties: String,
    pub event_time: i64,
    pub received_at: i64,
}

fn logged_after(c: &Connection, after: i64, limit: i64) -> Result<Vec<LoggedService>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT id, device_id, request_id, service_id, properties, event_time, received_at \
         FROM property_history WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit], |r| {
        Ok(LoggedService {
            id: r.get(0)?,
            device_id: r.get(1)?,
            request_id: r.get(2)?,
            service_id: r.get(3)?,
            properties: r.get(4)?,
            event_time: r.get(5)?,
            received_at: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn save_cursor(c: &Connection, action_id: &str, after: i64) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO forward_cursors (action_id, after_id) VALUES (?1, ?2) \
         ON CONFLICT (action_id) DO UPDATE SET after_id = excluded.after_id",
    )?
    .execute(params![action_id, after])?;
    Ok(())
}

impl Store {
    /// Queues a report (and any trace entries about it); the receiver resolves when it is durable.
    /// With it, in the same transaction, go its trace entries and the queue rows of table-backed
    /// forwarding; `after_commit` hands it to history-backed forwarding once committed. So a report
    /// is never stored without its forwarding, or forwarded unstored. A caller that keeps a copy
    /// of the report until the receiver resolves has it freed on its own thread.
    pub async fn submit_report(
        &self,
        report: impl Into<Arc<ReportRecord>>,
        trace: Vec<TraceEntry>,
        forwards: Vec<NewForward>,
        after_commit: Option<AfterCommit>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (reply, receiver) = oneshot::channel();
        let job = ReportJob {
            report: report.into(),
            forwards,
            forward_ids: self.forward_ids().clone(),
            history_ids: self.history_ids().clone(),
            ran: None,
            after_commit,
            reply,
        };
        self.queue_repeatable(Box::new(job), trace).await?;
        Ok(receiver)
    }

    /// The last history row of the newest committed report: every report up to it has been handed
    /// to `AfterCommit` already.
    pub fn history_committed(&self) -> i64 {
        self.history_ids().committed()
    }

    /// Stored report rows numbered after `after`, oldest first.
    pub async fn logged_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedService>, StoreError> {
        self.read(move |c| logged_after(c, after, limit)).await
    }

    /// How many stored report rows are numbered after `after`.
    pub async fn logged_count_after(&self, after: i64) -> Result<i64, StoreError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM property_history WHERE id > ?1",
                [after],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// An action's cursor in the report log, if it has one.
    pub async fn forward_cursor(&self, action_id: String) -> Result<Option<i64>, StoreError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT after_id FROM forward_cursors WHERE action_id = ?1",
                [action_id],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }

    /// Moves an action's cursor (with trace entries) without waiting for the commit.
    pub async fn submit_cursor(
        &self,
        action_id: String,
        after: i64,
        trace: Vec<TraceEntry>,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        self.submit_repeatable(move |c| save_cursor(c, &action_id, after), trace)
            .await
    }
}
