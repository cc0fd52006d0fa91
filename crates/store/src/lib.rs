//! ioda's durable state.
//!
//! One writer thread owns the SQLite write connection and commits whatever has queued up in a single
//! transaction (group commit): every caller's future resolves only after the transaction holding its
//! change is durable, so the MQTT layer can send PUBACK on that signal. One failing job (a
//! unique-key conflict, say) never takes its batch-mates down (see `batch`).
//! Reads use a separate connection; WAL mode lets them run beside the writer.

mod batch;
mod children;
mod commands;
mod devices;
mod messages;
mod products;
mod projects;
mod report_log;
mod routing;
mod schema;
mod shadow;
mod shadow_defer;
mod shadow_merge;
pub mod stats;
mod trace;
mod trace_detail;
mod trace_file;
mod trace_log;
mod writer;

pub use children::ChildDeletion;
pub use commands::{AsyncCommand, CommandFilter};
pub use devices::{
    DeviceFilter, DevicePage, DeviceUpdate, DeviceVersions, InitialDesired, StatusChange,
};
pub use messages::DeviceMessage;
pub use products::ProductPage;
pub use projects::{AccessKey, Project};
pub use report_log::{AfterCommit, LoggedService};
pub use routing::{NewForward, QueueDepth, QueuedMessage, RoutingAction, RoutingRule};
pub use shadow::{DesiredUpdate, HistoryRow, MessageRecord, ReportRecord, ShadowRow};
pub use trace::TraceEntry;
pub use trace_detail::{DetailWriter, TraceDetail};
pub use writer::{Durability, Store};

/// A map keyed by the registry's own ids (devices, services): not chosen by a peer to collide, so
/// a fast hash does (SipHash was 4 % of the writer's samples, and showed in the trace's flush).
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
    /// A unique key is already taken; the message names it.
    #[error("already exists: {0}")]
    Conflict(String),
    /// The row to change does not exist.
    #[error("not found")]
    NotFound,
    /// The transaction holding this change did not commit.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// The writer thread has stopped (shutdown or a fatal error).
    #[error("the store is closed")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Maps a unique-constraint failure to [`StoreError::Conflict`], leaving other errors alone.
fn conflict(error: rusqlite::Error, what: &str) -> StoreError {
    match &error {
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(what.to_owned())
        }
        _ => StoreError::Sqlite(error),
    }
}
