//! Opening the trace file, and what keeps it sound although it is never synced while it runs.
//!
//! The trace file's writes reached the disk with every checkpoint (`synchronous = NORMAL`): a few
//! megabytes a second under load, synced in bursts that the device-data writer's own small
//! `fdatasync` then waited behind. At 30 000 reports/s that was the writer's slowest commits and
//! most of the half-load p99 (BENCHMARKS.md). So the trace file is written with
//! `synchronous = OFF`: the operating system holds its writes, a crash of the process loses
//! nothing, and only a crash of the machine itself can lose the trace's last moments or leave the
//! file damaged. To know when that happened, the file records the boot it has unsynced writes
//! under (`trace_meta.unsynced_since_boot`, written and removed with a sync); found under another
//! boot at the next open, the file is checked, and a damaged file is moved aside and started
//! over. Where the boot cannot be told (not Linux), the file keeps syncing at its checkpoints.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension};

use crate::StoreError;

/// The trace table, its index and the file's own notes.
///
/// A block is numbered by its newest entry; `body` is a JSON array of the entries, oldest first,
/// each `{"id", "at", "kind", "detail"}`: LZ4-compressed (a BLOB: its length as 4 bytes, little
/// endian, then the compressed text), or plain text as versions before compression wrote it.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS trace_blocks (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    entries INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trace_blocks_by_device ON trace_blocks(device_id, id, entries);
CREATE TABLE IF NOT EXISTS trace_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
";

const UNSYNCED_KEY: &str = "unsynced_since_boot";

/// The running kernel's boot id: it changes with every start of the machine.
pub(crate) fn machine_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// A connection to the trace file with the settings every user of it shares.
pub(crate) fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "journal_size_limit", 16 << 20)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Opens the trace file for writing: checked first if the machine went down while it had
/// unsynced writes, moved aside and started over if it is damaged (the trace describes data; a
/// damaged trace must not keep the platform from starting), then marked as unsynced under
/// `boot` and switched to writing without syncs. Without a `boot`, it syncs at its checkpoints.
pub(crate) fn open_for_writing(path: &Path, boot: Option<&str>) -> Result<Connection, StoreError> {
    let conn = match open_sound(path, boot) {
        Ok(conn) => conn,
        Err(error) if is_damage(&error) => {
            let aside = move_aside(path)?;
            tracing::warn!(%error, moved_to = %aside.display(), "the trace file was damaged; starting a new one");
            open_sound(path, boot)?
        }
        Err(error) => return Err(error),
    };
    if let Some(boot) = boot {
        // Synced, so that after a crash of the machine the mark is there to be found.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute(
            "INSERT INTO trace_meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [UNSYNCED_KEY, boot],
        )?;
        conn.pragma_update(None, "synchronous", "OFF")?;
    }
    Ok(conn)
}

/// Opens the file and creates what is missing; an error of damage if it is not a sound database.
fn open_sound(path: &Path, boot: Option<&str>) -> Result<Connection, StoreError> {
    let conn = open_connection(path)?;
    conn.execute_batch(SCHEMA)?;
    let unsynced_under: Option<String> = conn
        .query_row(
            "SELECT value FROM trace_meta WHERE key = ?1",
            [UNSYNCED_KEY],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(then) = unsynced_under.filter(|then| Some(then.as_str()) != boot) {
        tracing::info!(
            boot = then,
            "the machine restarted while the trace file had unsynced writes; checking it"
        );
        let verdict: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
        if verdict != "ok" {
            return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(format!("trace file check: {verdict}")),
            )));
        }
    }
    Ok(conn)
}

/// Whether an error says the file is not a sound database (rather than, say, busy or unreadable).
fn is_damage(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
            if matches!(e.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Renames the damaged file (and its log) out of the way, keeping them for whoever wants to look.
fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let aside = with_suffix(&format!(".damaged-{stamp}"));
    std::fs::rename(path, &aside)?;
    let log = with_suffix("-wal");
    if log.exists() {
        std::fs::rename(&log, with_suffix(&format!("-wal.damaged-{stamp}")))?;
    }
    let _ = std::fs::remove_file(with_suffix("-shm"));
    Ok(aside)
}

/// Ends the writing connection's life: everything synced into the file, the log emptied and the
/// unsynced mark removed (with a sync), so the next start finds a clean file.
pub(crate) fn close_synced(conn: &Connection) {
    let synced = conn
        .pragma_update(None, "synchronous", "FULL")
        .and_then(|()| conn.pragma_update(None, "wal_checkpoint", "TRUNCATE"))
        .and_then(|()| {
            conn.execute("DELETE FROM trace_meta WHERE key = ?1", [UNSYNCED_KEY])
                .map(|_| ())
        })
        .and_then(|()| conn.pragma_update(None, "wal_checkpoint", "TRUNCATE"));
    if let Err(error) = synced {
        tracing::warn!(%error, "final trace checkpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use crate::writer::Checkpoints;
    use crate::{Durability, Store, TraceEntry};

    fn open(dir: &Path, boot: &str) -> Store {
        Store::open_tuned(
            &dir.join("t.db"),
            Durability::Normal,
            Checkpoints::default(),
            Some(boot),
        )
        .unwrap()
    }

    fn entries(device: &str, from: i64, count: i64) -> Vec<TraceEntry> {
        (from..from + count)
            .map(|i| TraceEntry {
                id: 0,
                device_id: device.into(),
                at: i,
                kind: "k".into(),
                detail: json!({ "i": i, "text": format!("entry {i} of {device}") }).into(),
            })
            .collect()
    }

    async fn seen(store: &Store, device: &str) -> Vec<i64> {
        let read = store.trace(device.into(), 1000).await.unwrap();
        read.iter().map(|e| e.at).collect()
    }

    fn raw(dir: &Path) -> rusqlite::Connection {
        rusqlite::Connection::open(dir.join("t-trace.db")).unwrap()
    }

    /// The boot under which the trace file says it has unsynced writes.
    fn mark(dir: &Path) -> Option<String> {
        use rusqlite::OptionalExtension;
        raw(dir)
            .query_row(
                "SELECT value FROM trace_meta WHERE key = 'unsynced_since_boot'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
    }

    /// Leaves the file as a crash of the machine under `boot` would: still marked unsynced.
    fn crash_under(dir: &Path, boot: &str) {
        raw(dir)
            .execute(
                "INSERT INTO trace_meta (key, value) VALUES ('unsynced_since_boot', ?1)",
                [boot],
            )
            .unwrap();
    }

    /// The trace files moved aside (their logs, if any, beside them).
    fn moved_aside(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("t-trace.db.damaged-"))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn the_file_is_marked_unsynced_while_open_and_clean_after_closing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), "boot-a");
        assert_eq!(mark(dir.path()).as_deref(), Some("boot-a"));
        store.record_trace(entries("d1", 1, 3)).await.unwrap();
        store.close().await;
        assert_eq!(mark(dir.path()), None);
        let store = open(dir.path(), "boot-a");
        assert_eq!(seen(&store, "d1").await, vec![3, 2, 1]);
        store.close().await;
    }

    #[tokio::test]
    async fn after_a_machine_crash_a_sound_trace_is_checked_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), "boot-a");
        store.record_trace(entries("d1", 1, 3)).await.unwrap();
        store.close().await;
        crash_under(dir.path(), "boot-a");
        let store = open(dir.path(), "boot-b");
        assert_eq!(seen(&store, "d1").await, vec![3, 2, 1]);
        assert!(moved_aside(dir.path()).is_empty());
        assert_eq!(mark(dir.path()).as_deref(), Some("boot-b"));
        store.close().await;
    }

    #[tokio::test]
    async fn after_a_machine_crash_a_damaged_trace_is_moved_aside_and_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), "boot-a");
        for device in 0..50 {
            let device = format!("d{device}");
            store.record_trace(entries(&device, 1, 40)).await.unwrap();
        }
        store.close().await;
        crash_under(dir.path(), "boot-a");
        // Garbage over the file's last pages: the trace's own blocks, not its notes or schema.
        let file = dir.path().join("t-trace.db");
        let mut bytes = std::fs::read(&file).unwrap();
        let pages = bytes.len() / 4096;
        assert!(pages > 8, "the trace should span pages: {pages}");
        for byte in &mut bytes[(pages - 4) * 4096..] {
            *byte = 0xA5;
        }
        std::fs::write(&file, &bytes).unwrap();

        let store = open(dir.path(), "boot-b");
        assert_eq!(moved_aside(dir.path()).len(), 1);
        assert_eq!(seen(&store, "d1").await, Vec::<i64>::new());
        store.record_trace(entries("d1", 7, 1)).await.unwrap();
        assert_eq!(seen(&store, "d1").await, vec![7]);
        store.close().await;
        let store = open(dir.path(), "boot-b");
        assert_eq!(seen(&store, "d1").await, vec![7]);
        store.close().await;
    }

    #[tokio::test]
    async fn a_trace_file_that_is_no_database_is_moved_aside_whatever_the_boot() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = "not a database ".repeat(600);
        std::fs::write(dir.path().join("t-trace.db"), &garbage).unwrap();
        let store = open(dir.path(), "boot-a");
        let aside = moved_aside(dir.path());
        assert_eq!(aside.len(), 1);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(&aside[0])).unwrap(),
            garbage
        );
        store.record_trace(entries("d1", 1, 1)).await.unwrap();
        assert_eq!(seen(&store, "d1").await, vec![1]);
        store.close().await;
    }
}
