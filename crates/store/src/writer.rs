//! The store handle: a group-committing writer thread and a read connection.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::batch::{Batch, Finish, Job, OnceJob, Repeat, RepeatableJob, ShadowFlush, run_batch};
use crate::report_log::HistoryIds;
use crate::routing::ForwardIds;
use crate::shadow_defer::DeferredShadows;
use crate::trace::{SharedPendingTrace, TraceEntry};
use crate::trace_log::TraceLog;
use crate::{StoreError, schema};

/// How hard a commit works to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit: survives power loss (`synchronous = FULL`).
    Full,
    /// Survives a process crash (`kill -9`) but not power loss (`synchronous = NORMAL` in WAL mode).
    Normal,
}

enum Command {
    /// A job, the trace entries that become visible if it commits, and when it was queued.
    Run(Job, Vec<TraceEntry>, std::time::Instant),
    /// Starts the log over (sent by the checkpointer once the log has grown too long).
    RestartLog,
    /// Writes the shadow merges waiting in memory if they are due (sent by the checkpointer while
    /// merges wait, so that they are written when no more jobs come).
    FlushShadows,
    Stop,
}

/// How long a connection waits for a lock another holds.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest number of jobs folded into one transaction.
const MAX_BATCH: usize = 2048;
/// Queue depth in front of the writer; producers wait (backpressure) when it is full.
const QUEUE_DEPTH: usize = 8192;

/// Pages the writer keeps in memory (negative: KiB), so hot index pages are not read back.
const WRITER_CACHE_KIB: i64 = 32 * 1024;

/// The durable store.
pub struct Store {
    jobs: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    /// Forwarding workers' reads of their queues: short, frequent, and never behind an API read.
    queue_reader: Mutex<Connection>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
    pending_trace: SharedPendingTrace,
    trace_log: TraceLog,
    forward_ids: ForwardIds,
    history_ids: HistoryIds,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn open_connection(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The group commit runs each job in a savepoint; keep their sub-journals in memory, not in a
    // temporary file (they are small and die with the transaction).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and starts the writer thread.
    pub fn open(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        let boot = crate::trace_file::machine_boot_id();
        Store::open_tuned(path, durability, Checkpoints::default(), boot.as_deref())
    }

    /// `open` with chosen checkpoint timings (tests use short ones).
    pub(crate) fn open_tuned(
        path: &Path,
        durability: Durability,
        checkpoints: Checkpoints,
        boot: Option<&str>,
    ) -> Result<Store, StoreError> {
        let mut write_conn = open_connection(path, durability)?;
        schema::migrate(&mut write_conn)?;
        // Checkpoints run beside the writer, not inside its commits, so no commit waits for one.
        write_conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // A log that a burst grew is cut back to this when it starts over.
        write_conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
        write_conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        // Room for every statement the writer runs, shadow merges of each length included.
        write_conn.set_prepared_statement_cache_capacity(64);
        let (trace_log, pending_trace) = TraceLog::open(&write_conn, path, boot)?;
        let forward_ids = ForwardIds::after_newest(&write_conn)?;
        let history_ids = HistoryIds::after_newest(&write_conn)?;
        let reader = open_connection(path, durability)?;
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let shadows_waiting = Arc::new(AtomicBool::new(false));
        let checkpointer = start_checkpointer(
            open_connection(path, durability)?,
            (jobs.downgrade(), shadows_waiting.clone()),
            checkpoints,
        )?;
        let writer = {
            let pending_trace = pending_trace.clone();
            let shadows = DeferredShadows::new(history_ids.clone(), shadows_waiting);
            std::thread::Builder::new()
                .name("ioda-store-writer".into())
                .spawn(move || write_loop(write_conn, queue, pending_trace, shadows))?
        };
        Ok(Store {
            jobs,
            reader: Arc::new(Mutex::new(reader)),
            queue_reader: Mutex::new(open_connection(path, durability)?),
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some(checkpointer)),
            pending_trace,
            trace_log,
            forward_ids,
            history_ids,
        })
    }

    /// Trace entries committed but not yet written to their table.
    pub(crate) fn pending_trace(&self) -> &SharedPendingTrace {
        &self.pending_trace
    }

    /// Numbers for queued forwarding messages.
    pub(crate) fn forward_ids(&self) -> &ForwardIds {
        &self.forward_ids
    }

    /// Numbers for property history rows.
    pub(crate) fn history_ids(&self) -> &HistoryIds {
        &self.history_ids
    }

    /// The trace file.
    pub(crate) fn trace_log(&self) -> &TraceLog {
        &self.trace_log
    }

    /// Queues `f`; the returned receiver yields its result once its transaction has committed.
    /// Waits only while the writer's queue is full. The trace entries are recorded if and only if
    /// `f` commits.
    pub(crate) async fn submit_traced<T, F>(
        &self,
        f: F,
        trace: Vec<TraceEntry>,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: OnceJob = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let finish: Finish = Box::new(move |commit| {
                let outcome = match commit {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::CommitFailed(e)),
                };
                let _ = tx.send(outcome);
            });
            (ok, finish)
        });
        self.queue(Job::Once(job), trace).await?;
        Ok(rx)
    }

    /// Like `submit_traced`, for work that may run more than once: device-data writes that fail
    /// only with the disk. They run without a savepoint of their own (see `batch`).
    pub(crate) async fn submit_repeatable<T, F>(
        &self,
        f: F,
        trace: Vec<TraceEntry>,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.queue_repeatable(Box::new(Repeat::new(f, tx)), trace)
            .await?;
        Ok(rx)
    }

    /// Queues a repeatable job of a kind of its own.
    pub(crate) async fn queue_repeatable(
        &self,
        job: Box<dyn RepeatableJob>,
        trace: Vec<TraceEntry>,
    ) -> Result<(), StoreError> {
        self.queue(Job::Repeatable(job), trace).await
    }

    /// Puts a job in the writer's queue, waiting only while the queue is full.
    async fn queue(&self, job: Job, trace: Vec<TraceEntry>) -> Result<(), StoreError> {
        self.jobs
            .send(Command::Run(job, trace, std::time::Instant::now()))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Runs `f` in the writer and returns its result after commit.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_traced(f, Vec::new()).await
    }

    /// Like `write`, with trace entries that are recorded if and only if `f` commits.
    pub(crate) async fn write_traced<T, F>(
        &self,
        f: F,
        trace: Vec<TraceEntry>,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit_traced(f, trace)
            .await?
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on the read connection, off the async threads.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        read_blocking(self.reader.clone(), f).await
    }

    /// Runs `f` on the read connection on the calling thread. Only for short indexed reads from
    /// a synchronous callback that cannot await (the DTLS pre-shared-key lookup).
    pub(crate) fn read_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&conn)
    }

    /// Runs `f` on the forwarding queues' read connection on the calling thread: for the short
    /// indexed reads of a worker reading on from its last message, which cost less than the hop to
    /// a blocking thread.
    pub(crate) fn read_queue_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.queue_reader.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Commits everything queued so far and stops the writer. Blocks until it has finished.
    pub async fn close(&self) {
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((stop, handle)) = checkpointer {
            stop.store(true, Ordering::Relaxed);
            handle.thread().unpark();
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        let _ = self.jobs.send(Command::Stop).await;
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        self.trace_log.close().await;
    }
}

/// Runs `f` on `conn` on a blocking thread, off the async threads.
pub(crate) async fn read_blocking<T, F>(conn: Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&conn.lock().unwrap_or_else(|p| p.into_inner())))
        .await
        .map_err(|_| StoreError::Closed)?
}

/// Runs passive checkpoints until told to stop. A passive checkpoint never blocks the writer;
/// what it cannot copy yet (pages a reader still needs) it copies next time.
fn start_checkpointer(
    conn: Connection,
    (jobs, shadows_waiting): (mpsc::WeakSender<Command>, Arc<AtomicBool>),
    checkpoints: Checkpoints,
) -> Result<(Arc<AtomicBool>, JoinHandle<()>), StoreError> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let handle = std::thread::Builder::new()
        .name("ioda-store-checkpoint".into())
        .spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::park_timeout(checkpoints.every);
                // A weak handle: a store dropped without `close` ends its writer, and this with it.
                let Some(jobs) = jobs.upgrade() else {
                    return;
                };
                if shadows_waiting.load(Ordering::Relaxed) {
                    let _ = jobs.try_send(Command::FlushShadows);
                }
                // Passive checkpoints alone never let a busy log start over (the writer appends
                // while they copy), and a restart from here would have to win the write lock from
                // a writer that takes it back at once; so the writer restarts the log itself,
                // between two commits, copying the little left to copy.
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
                    Ok(frames) if frames > checkpoints.restart_after_frames => {
                        let _ = jobs.try_send(Command::RestartLog);
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "checkpoint failed"),
                }
            }
        })?;
    Ok((stop, handle))
}

/// When checkpoints run and when the log starts over.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checkpoints {
    /// How often the checkpointer moves committed pages from the log into the database file.
    pub every: std::time::Duration,
    /// Log frames (pages) beyond which the writer starts the log over.
    pub restart_after_frames: i64,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Checkpoints {
            // Each checkpoint ends in a sync of the database file, and a commit's own sync waits
            // behind it: small, frequent ones hold a commit up less than large ones (at 30 000
            // reports/s, 50 ms rather than 250 ms: ack p99 −0.5 ms; 1 s and 4 s were worse).
            every: std::time::Duration::from_millis(50),
            // 64 MiB of 4 KiB pages.
            restart_after_frames: 16384,
        }
    }
}

/// While commits follow each other this closely, the writer is under steady load...
const BUSY_WITHIN: std::time::Duration = std::time::Duration::from_millis(2);
/// ...and a batch smaller than this waits a moment for company before committing:
const GATHER_BELOW: usize = 16;
/// a commit's page writes cost about the same for one job as for several (the pages jobs share,
/// the queue's tail), so a short wait under load buys fewer, fuller commits for a fraction of a
/// millisecond (PostgreSQL's `commit_delay`).
const GATHER_FOR: std::time::Duration = std::time::Duration::from_micros(GATHER_US);
const GATHER_US: u64 = 200;

/// What the writer was told besides its jobs.
#[derive(Default)]
struct Signals {
    restart_log: bool,
    stop: bool,
}

impl Signals {
    fn shadow_flush(&self) -> ShadowFlush {
        if self.stop {
            ShadowFlush::All
        } else {
            ShadowFlush::WhenDue
        }
    }
}

/// Moves queued commands into the batch without waiting (up to `MAX_BATCH` jobs), noting when
/// each was queued.
fn take_queued(
    queue: &mut mpsc::Receiver<Command>,
    (batch, queued_at): (&mut Batch, &mut Vec<std::time::Instant>),
    signals: &mut Signals,
    first: Option<Command>,
) {
    for command in first
        .into_iter()
        .chain(std::iter::from_fn(|| queue.try_recv().ok()))
    {
        match command {
            Command::Run(job, trace, at) => {
                batch.push((job, trace));
                queued_at.push(at);
            }
            Command::RestartLog => signals.restart_log = true,
            // Every batch flushes what is due; this only makes sure a batch runs.
            Command::FlushShadows => {}
            Command::Stop => {
                signals.stop = true;
                return;
            }
        }
        if batch.len() >= MAX_BATCH {
            return;
        }
    }
}

fn write_loop(
    mut conn: Connection,
    mut queue: mpsc::Receiver<Command>,
    pending: SharedPendingTrace,
    mut shadows: DeferredShadows,
) {
    let mut batch: Batch = Vec::with_capacity(64);
    let mut queued_at = Vec::with_capacity(64);
    let mut last_commit = std::time::Instant::now();
    let mut restart_wanted = false;
    while let Some(first) = queue.blocking_recv() {
        let mut signals = Signals::default();
        take_queued(
            &mut queue,
            (&mut batch, &mut queued_at),
            &mut signals,
            Some(first),
        );
        if !signals.stop && batch.len() < GATHER_BELOW && last_commit.elapsed() < BUSY_WITHIN {
            std::thread::sleep(GATHER_FOR);
            take_queued(&mut queue, (&mut batch, &mut queued_at), &mut signals, None);
        }
        run_batch(
            &mut conn,
            (&mut batch, &queued_at),
            &pending,
            &mut shadows,
            signals.shadow_flush(),
        );
        queued_at.clear();
        restart_wanted |= signals.restart_log;
        if restart_wanted {
            restart_wanted = !restart_log(&conn);
        }
        last_commit = std::time::Instant::now();
        if signals.stop {
            break;
        }
    }
    if let Err(error) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
        tracing::warn!(%error, "final checkpoint failed");
    }
}

/// Copies what the checkpointer has not yet, then lets the next commit write from the log's start
/// (and cuts the file back to `journal_size_limit`). Never waits for readers: the busy handler
/// sleeps 1, 2, 5 ms... while every commit queues behind it; while a reader is still on the log
/// this gives up at once and says so, and the writer tries again after its next commit.
fn restart_log(conn: &Connection) -> bool {
    let started = std::time::Instant::now();
    let _ = conn.busy_timeout(std::time::Duration::ZERO);
    let restarted = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
    let _ = conn.busy_timeout(BUSY_TIMEOUT);
    match restarted {
        Ok(0) => {
            tracing::debug!(took = ?started.elapsed(), "the log started over");
            true
        }
        Ok(_) => {
            tracing::debug!(took = ?started.elapsed(), "the log could not start over yet");
            false
        }
        Err(error) => {
            tracing::warn!(%error, "the log could not start over");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{Checkpoints, Durability, Store};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_written_to_without_pause_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints {
            every: std::time::Duration::from_millis(5),
            restart_after_frames: 200,
        };
        let store = std::sync::Arc::new(
            Store::open_tuned(
                &dir.path().join("t.db"),
                Durability::Normal,
                checkpoints,
                None,
            )
            .unwrap(),
        );
        // Eight writers committing 4 KB rows back to back: the writer never pauses.
        let mut writers = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                for _ in 0..400 {
                    store
                        .write(|c| {
                            c.execute(
                                "INSERT INTO message_history (device_id, topic, payload, received_at, request_id) \
                                 VALUES ('d', 't', zeroblob(4000), 0, 'r')",
                                [],
                            )?;
                            Ok(())
                        })
                        .await
                        .unwrap();
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        let log = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        let written: u64 = 8 * 400 * 4096;
        // Passive checkpoints alone leave the log holding everything written since the start.
        assert!(log < written / 4, "log {log} bytes after {written} written");
        store.close().await;
    }
}
