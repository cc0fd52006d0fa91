//! The store handle: a group-committing writer thread and a read connection.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::{StoreError, schema};

/// How hard a commit works to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit: survives power loss (`synchronous = FULL`).
    Full,
    /// Survives a process crash (`kill -9`) but not power loss (`synchronous = NORMAL` in WAL mode).
    Normal,
}

/// Called with the outcome of the transaction a job ran in.
type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A unit of write work: runs inside its own savepoint, says whether it succeeded.
type Job = Box<dyn FnOnce(&Connection) -> (bool, Finish) + Send>;

enum Command {
    Run(Job),
    Stop,
}

/// Largest number of jobs folded into one transaction.
const MAX_BATCH: usize = 2048;
/// Queue depth in front of the writer; producers wait (backpressure) when it is full.
const QUEUE_DEPTH: usize = 8192;

/// The durable store.
pub struct Store {
    jobs: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and starts the writer thread.
    pub fn open(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        let mut write_conn = open_connection(path, durability)?;
        schema::migrate(&mut write_conn)?;
        let reader = open_connection(path, durability)?;
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer = std::thread::Builder::new()
            .name("ioda-store-writer".into())
            .spawn(move || write_loop(write_conn, queue))?;
        Ok(Store {
            jobs,
            reader: Arc::new(Mutex::new(reader)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues `f`; the returned receiver yields its result once its transaction has committed.
    /// Waits only while the writer's queue is full.
    pub(crate) async fn submit<T, F>(
        &self,
        f: F,
    ) -> Result<oneshot::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
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
        self.jobs
            .send(Command::Run(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Runs `f` in the writer and returns its result after commit.
    pub(crate) async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.submit(f)
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
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&conn)
        })
        .await
        .map_err(|_| StoreError::Closed)?
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

    /// Commits everything queued so far and stops the writer. Blocks until it has finished.
    pub async fn close(&self) {
        let _ = self.jobs.send(Command::Stop).await;
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

fn write_loop(mut conn: Connection, mut queue: mpsc::Receiver<Command>) {
    let mut batch = Vec::with_capacity(64);
    while let Some(first) = queue.blocking_recv() {
        let mut stop = false;
        for command in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            match command {
                Command::Run(job) => batch.push(job),
                Command::Stop => {
                    stop = true;
                    break;
                }
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
        }
        run_batch(&mut conn, &mut batch);
        if stop {
            break;
        }
    }
    if let Err(error) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
        tracing::warn!(%error, "final checkpoint failed");
    }
}

fn run_batch(conn: &mut Connection, batch: &mut Vec<Job>) {
    if batch.is_empty() {
        return;
    }
    let mut finishes = Vec::with_capacity(batch.len());
    let began = conn.execute_batch("BEGIN IMMEDIATE");
    if let Err(error) = began {
        // Dropping the jobs drops their reply channels: every caller sees the failure.
        tracing::error!(%error, "store could not begin a transaction");
        batch.clear();
        return;
    }
    for job in batch.drain(..) {
        let _ = conn.execute_batch("SAVEPOINT job");
        let (ok, finish) = job(conn);
        let undo = if ok {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        let _ = conn.execute_batch(undo);
        finishes.push(finish);
    }
    let outcome = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
    if outcome.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
        tracing::error!(error = ?outcome, "store commit failed");
    }
    for finish in finishes {
        finish(outcome.clone());
    }
}
