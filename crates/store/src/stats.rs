//! The writer's side of `/metrics`: how long a write waits for its commit.

use std::fmt::Write as _;

use ioda_types::histogram::Histogram;

/// From a job entering the writer's queue until its transaction has committed (and, with
/// durability `full`, been synced): the queue's wait, the transaction and the sync together.
pub(crate) static JOB_COMMITTED: Histogram = Histogram::new();

const JOB_METRIC: &str = "ioda_store_job_commit_seconds";

/// Appends the store's metrics in the Prometheus text format.
pub fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP {JOB_METRIC} Time a write spends from entering the writer's queue until committed (and synced, durability full)."
    );
    let _ = writeln!(out, "# TYPE {JOB_METRIC} histogram");
    JOB_COMMITTED.render(JOB_METRIC, "", out);
}
