//! Where a QoS 1 publish's acknowledgement spends its time, rendered for `/metrics`.
//!
//! Two stages, counted by every connection of the process: `commit`, from the read that brought
//! the publish until its connection sees it committed (the broker's work, the store's queue,
//! transaction and sync, the wait behind older publishes' commits, since PUBACKs keep their order,
//! and the wait for the connection's task to run again), and `write`, the socket write that
//! carries the PUBACK (PUBACKs committed together share one). The two do not add up to the whole:
//! between them the connection may still be handling the rest of what the same read brought. A
//! QoS 1 publish answered without a commit (a discard, an MQTT 5 refusal) is counted too; an
//! MQTT 3 refusal closes the connection instead of answering and is not.

use ioda_types::histogram::{Histogram, render_family};

/// The acknowledgement stages of QoS 1 publishes.
pub struct AckStages {
    pub commit: Histogram,
    pub write: Histogram,
}

/// Counted by every connection of this process.
pub static ACK_STAGES: AckStages = AckStages {
    commit: Histogram::new(),
    write: Histogram::new(),
};

const ACK_STAGE_METRIC: &str = "ioda_mqtt_puback_stage_seconds";

/// Appends the MQTT layer's metrics in the Prometheus text format.
pub fn render(out: &mut String) {
    render_family(
        ACK_STAGE_METRIC,
        "Time a QoS 1 publish's PUBACK spends in each stage: commit (read until seen committed by its connection), write (the socket write carrying it).",
        &[
            ("stage=\"commit\"", &ACK_STAGES.commit),
            ("stage=\"write\"", &ACK_STAGES.write),
        ],
        out,
    );
}
