//! One group commit: the jobs folded into a transaction, and how one job's failure stays its own.
//!
//! A job that fails must not take its batch-mates down, so each used to run in its own savepoint.
//! That costs: SQLite copies every page a savepoint first touches into a sub-journal (about a
//! quarter of a report's write time, BENCHMARKS.md). The device-data jobs (reports, messages,
//! queue removals, trace-only jobs) do not fail but for I/O errors, and they can run again, so they
//! run first and without savepoints; only if one of them fails does the transaction start over
//! with each in a savepoint of its own. Jobs that run once (most API writes, which fail on
//! conflicts) keep their savepoint.

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::StoreError;
use crate::shadow_defer::DeferredShadows;
use crate::shadow_merge::ShadowMerges;
use crate::stats::JOB_COMMITTED;
use crate::trace::{self, SharedPendingTrace, TraceEntry};

/// Called with the outcome of the transaction a job ran in.
pub(crate) type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Work that runs once, inside its own savepoint; says whether it succeeded.
pub(crate) type OnceJob = Box<dyn FnOnce(&Connection) -> (bool, Finish) + Send>;

/// Work that may run again if its transaction starts over; keeps the outcome of its last run.
pub(crate) trait RepeatableJob: Send {
    /// Runs the job. With `batch_merges`, a report notes its shadow merges there for the batch to
    /// write once per device (`ShadowMerges`); without, it writes them itself.
    fn run(&mut self, conn: &Connection, batch_merges: Option<&mut ShadowMerges>) -> bool;
    fn finish(self: Box<Self>, commit: Result<(), String>);
}

pub(crate) enum Job {
    Once(OnceJob),
    Repeatable(Box<dyn RepeatableJob>),
}

/// The jobs of one transaction, with the trace entries each brings.
pub(crate) type Batch = Vec<(Job, Vec<TraceEntry>)>;

/// A repeatable job from a closure and the channel its result goes to.
pub(crate) struct Repeat<T, F> {
    f: F,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Repeat<T, F> {
    pub(crate) fn new(f: F, reply: oneshot::Sender<Result<T, StoreError>>) -> Repeat<T, F> {
        Repeat {
            f,
            result: None,
            reply,
        }
    }
}

impl<T, F> RepeatableJob for Repeat<T, F>
where
    T: Send,
    F: FnMut(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection, _: Option<&mut ShadowMerges>) -> bool {
        let result = (self.f)(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), String>) {
        let outcome = match (commit, self.result) {
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::CommitFailed("the job never ran".into())),
            (Err(e), _) => Err(StoreError::CommitFailed(e)),
        };
        let _ = self.reply.send(outcome);
    }
}

type Repeatables = Vec<(Box<dyn RepeatableJob>, Vec<TraceEntry>)>;
type Onces = Vec<(OnceJob, Vec<TraceEntry>)>;

/// When a batch writes the shadow merges waiting in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShadowFlush {
    /// When `FLUSH_EVERY` has passed, or a once-job needs the shadows as the reports left them.
    WhenDue,
    /// Whatever waits (the writer stops).
    All,
}

/// Runs a batch in one transaction and tells every job how it ended; entries of the jobs that
/// committed become visible trace. `queued_at` says when each job was handed to the writer.
pub(crate) fn run_batch(
    conn: &mut Connection,
    (batch, queued_at): (&mut Batch, &[std::time::Instant]),
    pending: &SharedPendingTrace,
    shadows: &mut DeferredShadows,
    flush: ShadowFlush,
) {
    let flush_now = flush == ShadowFlush::All || shadows.due();
    let nothing_to_write = !flush_now || shadows.is_empty();
    if batch.is_empty() && nothing_to_write {
        return;
    }
    let began_at = std::time::Instant::now();
    let (mut repeatables, onces) = split(batch);
    let ran = conn
        .execute_batch("BEGIN IMMEDIATE")
        .map_err(StoreError::from)
        .and_then(|()| shadows.rebuild_if_stale(conn))
        .and_then(|()| run_repeatables(conn, &mut repeatables, shadows));
    let succeeded = match ran {
        Ok(succeeded) => succeeded,
        Err(error) => {
            // Dropping the once-jobs drops their reply channels: those callers see the failure.
            tracing::error!(%error, "store could not begin a transaction (or rebuild its shadow merges)");
            let _ = conn.execute_batch("ROLLBACK");
            shadows.forget();
            for (job, _) in repeatables {
                job.finish(Err(error.to_string()));
            }
            return;
        }
    };
    // A once-job may read or change a shadow, or walk a device's history from it: none runs
    // against shadow rows that lack merges (dropped, its caller sees the store fail).
    let flush_needed = flush_now || !onces.is_empty();
    let shadows_written = !flush_needed || shadows.flush(conn);
    let onces = if shadows_written { onces } else { Vec::new() };
    let mut committed_trace = Vec::new();
    let mut finishes: Vec<Finish> = Vec::with_capacity(onces.len());
    for (job, trace) in onces {
        let mut finish = None;
        if in_savepoint(conn, |c| {
            let (ok, f) = job(c);
            finish = Some(f);
            ok
        }) {
            committed_trace.extend(trace);
        }
        finishes.extend(finish);
    }
    for ((_, trace), ok) in repeatables.iter_mut().zip(&succeeded) {
        if *ok {
            committed_trace.append(trace);
        }
    }
    let took_jobs = began_at.elapsed();
    let outcome = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
    tracing::debug!(jobs = finishes.len() + repeatables.len(), ran = ?took_jobs, took = ?began_at.elapsed(), "group commit");
    if outcome.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
        shadows.forget();
        tracing::error!(error = ?outcome, "store commit failed");
    } else {
        shadows.publish_waiting();
        trace::lock(pending).add(committed_trace);
        // Counted before the callers are told, so whoever sees a commit also sees it counted.
        let committed = std::time::Instant::now();
        for at in queued_at {
            JOB_COMMITTED.observe(committed.saturating_duration_since(*at), 1);
        }
    }
    for (job, _) in repeatables {
        job.finish(outcome.clone());
    }
    for finish in finishes {
        finish(outcome.clone());
    }
}

fn split(batch: &mut Batch) -> (Repeatables, Onces) {
    let mut repeatables = Vec::new();
    let mut onces = Vec::new();
    for (job, trace) in batch.drain(..) {
        match job {
            Job::Once(job) => onces.push((job, trace)),
            Job::Repeatable(job) => repeatables.push((job, trace)),
        }
    }
    (repeatables, onces)
}

/// Runs the repeatable jobs without savepoints, their shadow merges noted in `shadows` (written
/// later, see `shadow_defer`); if one fails, starts the transaction over, writes what waited from
/// earlier commits (the first pass's notes went with its rollback, so the memory is rebuilt from
/// the history) and runs each job in a savepoint of its own, writing its own merges, so a failure
/// is its job's alone. Says which succeeded.
fn run_repeatables(
    conn: &Connection,
    jobs: &mut Repeatables,
    shadows: &mut DeferredShadows,
) -> Result<Vec<bool>, StoreError> {
    if jobs
        .iter_mut()
        .all(|(job, _)| job.run(conn, Some(shadows.merges())))
    {
        return Ok(vec![true; jobs.len()]);
    }
    conn.execute_batch("ROLLBACK; BEGIN IMMEDIATE")?;
    shadows.replay(conn)?;
    shadows.try_flush(conn)?;
    Ok(jobs
        .iter_mut()
        .map(|(job, _)| in_savepoint(conn, |c| job.run(c, None)))
        .collect())
}

/// Runs `f` in a savepoint, undoing what it did if it says it failed.
fn in_savepoint(conn: &Connection, f: impl FnOnce(&Connection) -> bool) -> bool {
    let _ = conn.execute_batch("SAVEPOINT job");
    let ok = f(conn);
    let undo = if ok {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    let _ = conn.execute_batch(undo);
    ok
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::{Durability, Store, StoreError};

    /// Keeps the writer busy for 200 ms, so that what is submitted meanwhile commits in one batch.
    async fn hold_writer(store: &Store) -> tokio::sync::oneshot::Receiver<Result<(), StoreError>> {
        store
            .submit_traced(
                |_| {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    Ok(())
                },
                vec![],
            )
            .await
            .unwrap()
    }

    fn insert(c: &rusqlite::Connection, request_id: &str) -> Result<(), StoreError> {
        c.execute(
            "INSERT INTO message_history (device_id, topic, payload, received_at, request_id) \
             VALUES ('d', 't', x'00', 0, ?1)",
            [request_id],
        )?;
        Ok(())
    }

    #[tokio::test]
    async fn a_failing_repeatable_job_sinks_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        // Hold the writer so that everything below lands in one batch.
        let hold = hold_writer(&store).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let first = store
            .submit_repeatable(
                move |c| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    insert(c, "first")
                },
                vec![],
            )
            .await
            .unwrap();
        let failing = store
            .submit_repeatable(
                |c| {
                    insert(c, "failing")?;
                    Err::<(), _>(StoreError::NotFound)
                },
                vec![],
            )
            .await
            .unwrap();
        let once = store
            .submit_traced(|c| insert(c, "once"), vec![])
            .await
            .unwrap();
        let last = store
            .submit_repeatable(|c| insert(c, "last"), vec![])
            .await
            .unwrap();
        hold.await.unwrap().unwrap();
        assert!(first.await.unwrap().is_ok());
        assert!(matches!(failing.await.unwrap(), Err(StoreError::NotFound)));
        assert!(once.await.unwrap().is_ok());
        assert!(last.await.unwrap().is_ok());
        assert_eq!(
            runs.load(Ordering::Relaxed),
            2,
            "the batch started over after the failure, running the first job again"
        );
        let stored: Vec<String> = store
            .read(|c| {
                let mut stmt =
                    c.prepare("SELECT request_id FROM message_history ORDER BY request_id")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(
            stored,
            vec!["first", "last", "once"],
            "each written once, the failed one not at all"
        );
        store.close().await;
    }

    fn report(t: i64, properties: serde_json::Value) -> crate::ReportRecord {
        crate::ReportRecord {
            device_id: "d".into(),
            request_id: format!("r{t}"),
            received_at: t,
            services: vec![ioda_types::event::ReportedService::new(
                "S".into(),
                properties.as_object().unwrap().clone(),
                t,
            )],
        }
    }

    #[tokio::test]
    async fn a_batch_run_job_by_job_keeps_the_waiting_shadow_merges_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), Durability::Normal).unwrap();
        store
            .write(|c| {
                c.execute(
                    "INSERT INTO devices (project_id, app_id, device_id, node_id, product_id, gateway_id, \
                     auth_type, secure_access, auth_timeout, status, created_at) \
                     VALUES ('p', 'a', 'd', 'n', 'prod', 'd', 'SECRET', 0, 0, 'INACTIVE', 0)",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        // Committed, its merge still in the writer's memory.
        let first = store.submit_report(
            report(1, serde_json::json!({"a": 1, "o": {"x": 1}})),
            vec![],
            vec![],
            None,
        );
        first.await.unwrap().await.unwrap().unwrap();
        let hold = hold_writer(&store).await;
        let second = store
            .submit_report(
                report(2, serde_json::json!({"o": {"y": 2}})),
                vec![],
                vec![],
                None,
            )
            .await
            .unwrap();
        let failing = store
            .submit_repeatable(|_| Err::<(), _>(StoreError::NotFound), vec![])
            .await
            .unwrap();
        let third = store
            .submit_report(
                report(3, serde_json::json!({"a": null, "o": {"x": null}})),
                vec![],
                vec![],
                None,
            )
            .await
            .unwrap();
        hold.await.unwrap().unwrap();
        assert!(second.await.unwrap().is_ok());
        assert!(failing.await.unwrap().is_err());
        assert!(third.await.unwrap().is_ok());
        let shadow = store.shadow("d".into()).await.unwrap();
        assert_eq!(
            (
                serde_json::Value::Object(shadow[0].reported.clone().unwrap()),
                shadow[0].version
            ),
            (serde_json::json!({"o": {"y": 2}}), 3)
        );
        let history = store.property_history("d".into(), 10).await.unwrap();
        assert_eq!(
            history.iter().map(|h| h.event_time).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        store.close().await;
    }
}
