//! The trace log's own database file and the thread that writes it.
//!
//! Trace entries describe data; they are not data. Written in the main database, one row each,
//! they cost the device-data writer half its time (each flush dirtied a leaf of the per-device
//! index for nearly every device and held up the reports committing with it). Here they have a
//! file of their own, written by their own thread a few times a second, so they never delay a
//! report's commit; and each flush stores one row per device (a block of that device's entries),
//! so a busy device costs one row and one index entry per flush, not one per entry.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use crate::trace::{self, KEEP_PER_DEVICE, PendingTrace, SharedPendingTrace, TraceEntry};
use crate::trace_detail::push_string;
use crate::trace_file;
use crate::{FastMap, StoreError};

/// How often waiting entries are written out (a crash loses at most this much trace).
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Entries one transaction writes at most, so a reader never waits long for the file.
const ENTRIES_PER_TRANSACTION: usize = 8192;
/// A device's old blocks are looked for once it has written this many entries since it was last
/// pruned (so a device keeps between `KEEP_PER_DEVICE` and this many more, plus one block).
/// Pruning at every flush read all of a busy device's blocks four times a second: a third of
/// the trace thread's time.
const PRUNE_EVERY: i64 = KEEP_PER_DEVICE / 4;
/// Devices whose entries since their last pruning are counted at most; beyond it the count starts
/// over (each device is then pruned at its next write).
const MAX_COUNTED_DEVICES: usize = 1 << 20;

/// Entries each device has written since its blocks were last pruned. A device not counted is
/// pruned at its next write (so a restart leaves nobody unpruned for long).
#[derive(Default)]
struct Unpruned(FastMap<String, i64>);

impl Unpruned {
    /// Counts a block of `entries` for the device; says whether its old blocks are due for pruning.
    fn due(&mut self, device_id: &str, entries: i64) -> bool {
        if self.0.len() >= MAX_COUNTED_DEVICES {
            self.0.clear();
        }
        match self.0.get_mut(device_id) {
            Some(count) if *count + entries < PRUNE_EVERY => {
                *count += entries;
                false
            }
            Some(count) => {
                *count = 0;
                true
            }
            None => {
                self.0.insert(device_id.to_owned(), 0);
                true
            }
        }
    }
}

/// The trace file that belongs to the database at `path`: `ioda.db` keeps its trace in
/// `ioda-trace.db` beside it.
pub(crate) fn trace_path(path: &Path) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "ioda".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-trace.db"))
}

/// The trace file: its reader, and the thread writing waiting entries into it.
pub(crate) struct TraceLog {
    reader: Arc<Mutex<Connection>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl TraceLog {
    /// Opens the trace file of the database `main` (at `path`), moves over any entries an older
    /// version kept in the main database, and starts the thread. Returns the waiting entries,
    /// numbered after the newest stored one.
    pub(crate) fn open(
        main: &Connection,
        path: &Path,
        boot: Option<&str>,
    ) -> Result<(TraceLog, SharedPendingTrace), StoreError> {
        let file = trace_path(path);
        let writer = trace_file::open_for_writing(&file, boot)?;
        adopt_old_entries(main, &file)?;
        let pending: SharedPendingTrace = Arc::new(Mutex::new(PendingTrace::after(&writer)?));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let pending = pending.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ioda-store-trace".into())
                .spawn(move || write_loop(writer, pending, stop))?
        };
        let log = TraceLog {
            reader: Arc::new(Mutex::new(trace_file::open_connection(&file)?)),
            stop,
            thread: Mutex::new(Some(thread)),
        };
        Ok((log, pending))
    }

    /// Runs `f` on the trace file's read connection, off the async threads.
    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        crate::writer::read_blocking(self.reader.clone(), f).await
    }

    /// Writes out everything waiting and stops the thread (after the main writer has stopped, so
    /// its last entries are among them).
    pub(crate) async fn close(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            handle.thread().unpark();
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Copies the entries an older version kept in the main database into the trace file, then
/// drops them there (once; later opens find no such table).
fn adopt_old_entries(main: &Connection, file: &Path) -> Result<(), StoreError> {
    let old: i64 = main.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'device_trace'",
        [],
        |r| r.get(0),
    )?;
    if old == 0 {
        return Ok(());
    }
    main.execute(
        "ATTACH DATABASE ?1 AS trace_log",
        [file.to_string_lossy().as_ref()],
    )?;
    let moved = main.execute_batch(
        "BEGIN IMMEDIATE; \
         INSERT OR IGNORE INTO trace_log.trace_blocks (id, device_id, entries, body) \
         SELECT id, device_id, 1, json_array(json_object('id', id, 'at', at, 'kind', kind, 'detail', json(detail))) \
         FROM main.device_trace; \
         DROP TABLE main.device_trace; \
         COMMIT;",
    );
    if moved.is_err() {
        let _ = main.execute_batch("ROLLBACK");
    }
    main.execute_batch("DETACH DATABASE trace_log")?;
    Ok(moved?)
}

/// Writes waiting entries every `FLUSH_EVERY` (all of them, in transactions of at most
/// `ENTRIES_PER_TRANSACTION`), until told to stop or until
/// nobody else holds the waiting entries (a store dropped without `close`, whose writer has ended).
fn write_loop(mut conn: Connection, pending: SharedPendingTrace, stop: Arc<AtomicBool>) {
    let mut unpruned = Unpruned::default();
    loop {
        std::thread::park_timeout(FLUSH_EVERY);
        let last_round = stop.load(Ordering::Relaxed) || Arc::strong_count(&pending) == 1;
        forget_deleted_devices(&conn, &pending);
        while write_waiting(&mut conn, &pending, &mut unpruned) {}
        if last_round {
            break;
        }
    }
    trace_file::close_synced(&conn);
}

/// Deletes the stored entries of devices deleted since the last round (only those numbered before
/// the deletion: later ones belong to a device created again under the same id).
fn forget_deleted_devices(conn: &Connection, pending: &SharedPendingTrace) {
    let devices = trace::lock(pending).forgotten();
    let mut removed = 0;
    for (device_id, through) in &devices {
        let deleted = conn.execute(
            "DELETE FROM trace_blocks WHERE device_id = ?1 AND id <= ?2",
            rusqlite::params![device_id, through],
        );
        if let Err(error) = deleted {
            // Still hidden from reads; tried again next round.
            tracing::warn!(%error, device_id, "a deleted device's trace could not be removed");
            break;
        }
        removed += 1;
    }
    trace::lock(pending).removed(removed);
}

/// Writes up to `ENTRIES_PER_TRANSACTION` waiting entries; says whether more are waiting.
fn write_waiting(
    conn: &mut Connection,
    pending: &SharedPendingTrace,
    unpruned: &mut Unpruned,
) -> bool {
    let entries = trace::lock(pending).oldest(ENTRIES_PER_TRANSACTION);
    let Some(last_id) = entries.last().map(|e| e.id) else {
        return false;
    };
    let written = conn.transaction().map_err(StoreError::from).and_then(|tx| {
        write_blocks(&tx, &entries, unpruned)?;
        tx.commit().map_err(StoreError::from)
    });
    match written {
        Ok(()) => {
            let mut pending = trace::lock(pending);
            pending.forget_through(last_id);
            pending.len() > 0
        }
        Err(error) => {
            // They stay waiting (and visible) for the next round.
            tracing::warn!(%error, "trace entries could not be written; they wait for the next round");
            false
        }
    }
}

/// Writes entries as one block per device (inside the caller's transaction), then keeps each of
/// those devices' trace bounded.
fn write_blocks(
    c: &Connection,
    entries: &[Arc<TraceEntry>],
    unpruned: &mut Unpruned,
) -> Result<(), StoreError> {
    let mut blocks: Vec<(&str, Vec<&TraceEntry>)> = Vec::new();
    let mut index: FastMap<&str, usize> = FastMap::default();
    for entry in entries {
        let slot = *index.entry(&entry.device_id).or_insert_with(|| {
            blocks.push((&entry.device_id, Vec::new()));
            blocks.len() - 1
        });
        blocks[slot].1.push(entry);
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO trace_blocks (id, device_id, entries, body) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for (device_id, entries) in &blocks {
        let newest = entries.last().map_or(0, |e| e.id);
        insert.execute(rusqlite::params![
            newest,
            device_id,
            entries.len() as i64,
            // Compressed: a block's entries repeat their keys, rule and action ids; stored plain,
            // they were a third of the server's disk writes (BENCHMARKS.md).
            lz4_flex::block::compress_prepend_size(block_body(entries).as_bytes())
        ])?;
        if unpruned.due(device_id, entries.len() as i64) {
            prune(c, device_id)?;
        }
    }
    Ok(())
}

fn block_body(entries: &[&TraceEntry]) -> String {
    let mut body = String::with_capacity(entries.len() * 160);
    body.push('[');
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        // Written by hand: the detail is JSON text already.
        let _ = write!(body, r#"{{"id":{},"at":{},"kind":"#, e.id, e.at);
        push_string(&mut body, &e.kind);
        body.push_str(r#","detail":"#);
        body.push_str(e.detail.as_json());
        body.push('}');
    }
    body.push(']');
    body
}

/// Deletes a device's blocks older than the newest `KEEP_PER_DEVICE` entries need.
fn prune(c: &Connection, device_id: &str) -> Result<(), StoreError> {
    let mut newest_first = c.prepare_cached(
        "SELECT id, entries FROM trace_blocks WHERE device_id = ?1 ORDER BY id DESC",
    )?;
    let mut rows = newest_first.query([device_id])?;
    let mut kept = 0;
    let mut oldest_needed = None;
    while let Some(row) = rows.next()? {
        if oldest_needed.is_some() {
            // Something older than what is kept exists: delete it.
            drop(rows);
            c.prepare_cached("DELETE FROM trace_blocks WHERE device_id = ?1 AND id < ?2")?
                .execute(rusqlite::params![device_id, oldest_needed])?;
            return Ok(());
        }
        kept += row.get::<_, i64>(1)?;
        if kept >= KEEP_PER_DEVICE {
            oldest_needed = Some(row.get::<_, i64>(0)?);
        }
    }
    Ok(())
}

/// A device's newest `limit` stored entries, newest first.
pub(crate) fn stored_entries(
    c: &Connection,
    device_id: &str,
    limit: i64,
) -> Result<Vec<TraceEntry>, StoreError> {
    let mut newest_first =
        c.prepare_cached("SELECT body FROM trace_blocks WHERE device_id = ?1 ORDER BY id DESC")?;
    let mut rows = newest_first.query([device_id])?;
    let mut out = Vec::new();
    while out.len() < limit as usize
        && let Some(row) = rows.next()?
    {
        let block = match read_block(row.get_ref(0)?) {
            Ok(block) => block,
            Err(why) => {
                // One damaged block must not hide the rest of the device's trace.
                tracing::warn!(
                    device_id,
                    why,
                    "a stored trace block is damaged and was skipped"
                );
                continue;
            }
        };
        for mut entry in block.into_iter().rev() {
            let field = |name: &str| entry.get(name).and_then(serde_json::Value::as_i64);
            let (Some(id), Some(at)) = (field("id"), field("at")) else {
                continue;
            };
            let kind = entry
                .get("kind")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
                .into();
            out.push(TraceEntry {
                id,
                device_id: device_id.to_owned(),
                at,
                kind,
                detail: entry
                    .get_mut("detail")
                    .map(serde_json::Value::take)
                    .unwrap_or_default()
                    .into(),
            });
        }
    }
    out.truncate(limit as usize);
    Ok(out)
}

/// A block's body holds at most this much text (`ENTRIES_PER_TRANSACTION` entries of a few KB):
/// a damaged length must not ask for more memory than that.
const MAX_BLOCK_TEXT: usize = 64 << 20;

/// The entries of a stored block, oldest first.
fn read_block(body: rusqlite::types::ValueRef<'_>) -> Result<Vec<serde_json::Value>, String> {
    use rusqlite::types::ValueRef;
    let text = match body {
        ValueRef::Text(text) => std::borrow::Cow::Borrowed(text),
        ValueRef::Blob(blob) => {
            let (length, compressed) = blob
                .split_first_chunk::<4>()
                .ok_or("shorter than its length")?;
            let length = u32::from_le_bytes(*length) as usize;
            if length > MAX_BLOCK_TEXT {
                return Err(format!("says it holds {length} bytes"));
            }
            let text = lz4_flex::block::decompress(compressed, length)
                .map_err(|e| format!("cannot be decompressed: {e}"))?;
            std::borrow::Cow::Owned(text)
        }
        other => return Err(format!("is a {}", other.data_type())),
    };
    serde_json::from_slice(&text).map_err(|e| format!("is not a JSON array of entries: {e}"))
}
