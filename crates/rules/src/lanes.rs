//! A delivery lane: one connection to the target and a task delivering, in order, what the
//! worker hands it. Lanes run on their own, so a message committed while one lane is busy goes out
//! on its own lane at once instead of waiting for every lane to finish a round.

use std::sync::Arc;

use ioda_store::QueuedMessage;
use tokio::sync::mpsc;

use crate::connector::{BatchFailure, Connector, Spec};
use crate::forward::Forwarder;

/// What the worker hands a lane: messages go in batches (one hop between tasks per batch, not per
/// message).
pub(crate) enum LaneInput {
    Deliver(Vec<Arc<QueuedMessage>>),
    /// The worker has recorded the lane's failure; deliver again.
    Resume,
}

/// What a lane did with one batch.
pub(crate) struct Outcome {
    pub(crate) lane: usize,
    pub(crate) delivered: Vec<Arc<QueuedMessage>>,
    /// The attempt that failed; the lane hands back everything after it (`released`), in this
    /// batch and the next ones, until `Resume`, so a device's later messages never overtake it.
    pub(crate) failed: Option<(Arc<QueuedMessage>, String)>,
    pub(crate) released: Vec<i64>,
}

impl Outcome {
    /// How many messages the batch held.
    pub(crate) fn len(&self) -> usize {
        self.delivered.len() + usize::from(self.failed.is_some()) + self.released.len()
    }
}

/// The worker's handle on a lane.
pub(crate) struct Lane {
    input: mpsc::UnboundedSender<LaneInput>,
    /// Messages handed over and not reported back yet.
    pub(crate) in_flight: usize,
    /// Attempts failing in a row on this lane, with no success on any lane since.
    pub(crate) failures_in_a_row: u64,
}

impl Lane {
    /// Starts lane `index`; it ends when the worker drops its handle.
    pub(crate) fn start(
        index: usize,
        forwarder: Arc<Forwarder>,
        spec: Spec,
        outcomes: mpsc::UnboundedSender<Outcome>,
    ) -> Lane {
        let (input, inbox) = mpsc::unbounded_channel();
        tokio::spawn(run(index, forwarder, spec, inbox, outcomes));
        Lane {
            input,
            in_flight: 0,
            failures_in_a_row: 0,
        }
    }

    pub(crate) fn hand(&mut self, batch: Vec<Arc<QueuedMessage>>) {
        let count = batch.len();
        if count > 0 && self.input.send(LaneInput::Deliver(batch)).is_ok() {
            self.in_flight += count;
        }
    }

    pub(crate) fn resume(&mut self) {
        let _ = self.input.send(LaneInput::Resume);
    }
}

async fn run(
    index: usize,
    forwarder: Arc<Forwarder>,
    spec: Spec,
    mut inbox: mpsc::UnboundedReceiver<LaneInput>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    let mut connector: Option<Connector> = None;
    let mut halted = false;
    while let Some(input) = inbox.recv().await {
        // The worker has ended (its action changed or went): deliver nothing more.
        if outcomes.is_closed() {
            return;
        }
        let batch = match input {
            LaneInput::Resume => {
                halted = false;
                continue;
            }
            LaneInput::Deliver(batch) => batch,
        };
        let mut outcome = Outcome {
            lane: index,
            delivered: Vec::with_capacity(batch.len()),
            failed: None,
            released: Vec::new(),
        };
        if halted {
            outcome.released = batch.iter().map(|m| m.id).collect();
        } else {
            match forwarder.deliver_batch(&spec, &mut connector, &batch).await {
                Ok(()) => outcome.delivered = batch,
                Err(BatchFailure { confirmed, error }) => {
                    let mut rest = batch.into_iter();
                    outcome.delivered = rest.by_ref().take(confirmed).collect();
                    outcome.failed = rest.next().map(|message| (message, error));
                    outcome.released = rest.map(|m| m.id).collect();
                    halted = outcome.failed.is_some();
                }
            }
        }
        if outcomes.send(outcome).is_err() {
            return;
        }
    }
}
