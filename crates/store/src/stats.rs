//! The writer's side of `/metrics`: how long a write waits for its commit.

use ioda_types::histogram::{Histogram, render_family};

/// From a job being handed to the writer (a wait while its queue is full included) until its
/// transaction has committed (and, with durability `full`, been synced): the queue's wait, the
/// transaction and the sync together. Counted before the job's caller is told, and only for
/// commits that succeeded.
pub(crate) static JOB_COMMITTED: Histogram = Histogram::new();

const JOB_METRIC: &str = "ioda_store_job_commit_seconds";

/// Appends the store's metrics in the Prometheus text format.
pub fn render(out: &mut String) {
    render_family(
        JOB_METRIC,
        "Time a write spends from being handed to the writer until committed (and synced, durability full).",
        &[("", &JOB_COMMITTED)],
        out,
    );
}
