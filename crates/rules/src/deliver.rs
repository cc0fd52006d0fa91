//! Delivery: each action's worker reads the front of its durable queue and hands it out to
//! several lanes, each with its own connection and task (`lanes`). A device always uses the same
//! lane, so one device's messages arrive in the order they were produced while different devices'
//! messages overlap their round trips; lanes do not wait for each other.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ioda_store::{QueuedMessage, RoutingAction, TraceDetail, TraceEntry};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::connector::{BatchFailure, Connector, Spec};
use crate::forward::{ActionStats, Forwarder, fnv};
use crate::lanes::{Lane, Outcome};
use crate::report_queue::Source;

/// A worker's state besides its lanes: what is out for delivery, what was delivered and waits to
/// be removed from the queue, and the removals in flight.
#[derive(Default)]
struct Dispatch {
    /// Read and not yet delivered (waiting for its lane, or on it), or delivered and not yet
    /// submitted for removal.
    out: HashSet<i64>,
    /// Per lane, what was read and waits for room on the lane, in queue order.
    waiting: Vec<VecDeque<Arc<QueuedMessage>>>,
    delivered: Vec<i64>,
    trace: Vec<TraceEntry>,
    settling: Settling,
    /// The last read reached its limit: read again once the lanes are half empty.
    more_behind: bool,
    /// Every message numbered up to here is taken care of (out, settling, or removed): reads
    /// start after it instead of reading what is already held again.
    cursor: i64,
}

impl Dispatch {
    /// Messages held for the lanes: handed over, or waiting for room.
    fn held(&self, lanes: &[Lane]) -> usize {
        lanes.iter().map(|l| l.in_flight).sum::<usize>()
            + self.waiting.iter().map(VecDeque::len).sum::<usize>()
    }

    /// Hands a lane what waits for it, as far as it has room.
    fn feed(&mut self, index: usize, lane: &mut Lane) {
        let room = LANE_DEPTH.saturating_sub(lane.in_flight);
        let waiting = &mut self.waiting[index];
        let batch: Vec<Arc<QueuedMessage>> = waiting.drain(..room.min(waiting.len())).collect();
        lane.hand(batch);
    }

    /// Forgets what was read for a lane that failed: it is read again, after the failure's
    /// retry is scheduled, so nothing overtakes the message that failed.
    fn put_back(&mut self, index: usize) {
        for message in std::mem::take(&mut self.waiting[index]) {
            self.out.remove(&message.id);
            self.cursor = self.cursor.min(message.id - 1);
        }
    }

    /// Messages taken from the queue and not yet settled (read past them).
    fn taken(&self) -> usize {
        self.out.len() + self.settling.len()
    }

    /// Nothing read, nothing out, nothing waiting to be removed: the last read found the queue
    /// empty.
    fn drained(&self, lanes: &[Lane]) -> bool {
        self.held(lanes) == 0
            && self.taken() == 0
            && self.delivered.is_empty()
            && !self.more_behind
            && self.settling.removals.is_empty()
    }
}

impl Forwarder {
    pub(crate) async fn worker(
        self: Arc<Self>,
        action: RoutingAction,
        stats: Arc<ActionStats>,
        wake: Arc<Notify>,
        source: Source,
        new_cursor: i64,
    ) {
        let spec = match Spec::parse(&action.channel, &action.channel_detail) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::warn!(action_id = %action.action_id, %error, "action has an unusable channel; it forwards nothing");
                return;
            }
        };
        if let Source::Reports(queue) = &source {
            // Rows queued before report actions read the history (an older version) go first.
            let leftover = self
                .platform
                .store()
                .queue_depth(action.action_id.clone())
                .await;
            if leftover.is_ok_and(|depth| depth.messages > 0) {
                self.deliver_from(&action, &spec, &stats, &wake, &Source::Table, true)
                    .await;
            }
            self.start_reports(&action.action_id, queue, new_cursor)
                .await;
        }
        self.deliver_from(&action, &spec, &stats, &wake, &source, false)
            .await;
    }

    /// Delivers what the source holds until shutdown (or, with `until_empty`, until it is empty).
    async fn deliver_from(
        self: &Arc<Self>,
        action: &RoutingAction,
        spec: &Spec,
        stats: &ActionStats,
        wake: &Notify,
        source: &Source,
        until_empty: bool,
    ) {
        let lane_count = if spec.is_broker() {
            self.config.lanes.min(BROKER_LANES)
        } else {
            self.config.lanes
        };
        let (outcome_tx, mut outcomes) = mpsc::unbounded_channel();
        let mut lanes: Vec<Lane> = (0..lane_count.max(1))
            .map(|i| Lane::start(i, self.clone(), spec.clone(), outcome_tx.clone()))
            .collect();
        drop(outcome_tx);
        let mut state = Dispatch {
            waiting: vec![VecDeque::new(); lanes.len()],
            cursor: i64::MIN,
            ..Dispatch::default()
        };
        let half_full = lanes.len() * LANE_DEPTH / 2;
        let mut shutdown = self.shutdown.clone();
        let mut last_trim = i64::MIN;
        let mut read_wanted = true;
        let mut next_due: Option<i64> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let now = self.platform.now();
            if now.saturating_sub(last_trim) >= 10_000 {
                self.trim(&action.action_id, source, stats, now).await;
                last_trim = now;
            }
            // A read brings more into memory, so it waits while the lanes hold a lot.
            if read_wanted && state.held(&lanes) <= half_full {
                self.submit_removals(&action.action_id, source, &mut state)
                    .await;
                state.settling.settle();
                state.settling.bound().await;
                next_due = self
                    .read_and_hand_out(
                        &action.action_id,
                        source,
                        stats,
                        &mut lanes,
                        &mut state,
                        now,
                    )
                    .await;
                read_wanted = false;
                if until_empty && next_due.is_none() && state.drained(&lanes) {
                    return;
                }
            }
            let wait = next_due.map_or(Duration::from_secs(1), |due| {
                Duration::from_millis((due - now).clamp(10, 1000) as u64)
            });
            tokio::select! {
                _ = wake.notified() => read_wanted = true,
                outcome = outcomes.recv() => {
                    let Some(outcome) = outcome else { return };
                    read_wanted |= self.settle_outcome(outcome, source, &mut lanes, &mut state, stats).await;
                    while let Ok(outcome) = outcomes.try_recv() {
                        read_wanted |= self.settle_outcome(outcome, source, &mut lanes, &mut state, stats).await;
                    }
                    if state.more_behind && state.held(&lanes) <= half_full {
                        state.more_behind = false;
                        read_wanted = true;
                    }
                    if state.delivered.len() >= REMOVE_IN_GROUPS_OF || state.held(&lanes) == 0 {
                        self.submit_removals(&action.action_id, source, &mut state).await;
                    }
                }
                _ = tokio::time::sleep(wait) => read_wanted = true,
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            }
        }
        self.settle_at_shutdown(
            &action.action_id,
            source,
            &mut lanes,
            &mut state,
            &mut outcomes,
            stats,
        )
        .await;
    }

    /// At shutdown: waits a little for the batches the lanes have out and records what they
    /// delivered, so a message the target took just before the stop is not delivered again after
    /// the restart. Nothing more is handed out; what waits in memory is read again then.
    async fn settle_at_shutdown(
        &self,
        action_id: &str,
        source: &Source,
        lanes: &mut [Lane],
        state: &mut Dispatch,
        outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
        stats: &ActionStats,
    ) {
        let deadline = tokio::time::Instant::now() + SETTLE_AT_SHUTDOWN;
        state.waiting.iter_mut().for_each(VecDeque::clear);
        while lanes.iter().any(|lane| lane.in_flight > 0) {
            let Ok(Some(outcome)) = tokio::time::timeout_at(deadline, outcomes.recv()).await else {
                break;
            };
            self.settle_outcome(outcome, source, lanes, state, stats)
                .await;
            state.waiting.iter_mut().for_each(VecDeque::clear);
        }
        self.submit_removals(action_id, source, state).await;
        while !state.settling.removals.is_empty() {
            let oldest = state.settling.wait_oldest();
            if tokio::time::timeout_at(deadline, oldest).await.is_err() {
                break;
            }
        }
    }

    /// Reads the queue on from the cursor and hands what it finds out to the lanes (what finds no
    /// room waits in memory for its lane). Returns the earliest time a message held back for a
    /// retry is due.
    async fn read_and_hand_out(
        &self,
        action_id: &str,
        source: &Source,
        stats: &ActionStats,
        lanes: &mut [Lane],
        state: &mut Dispatch,
        now: i64,
    ) -> Option<i64> {
        if state.settling.lost_removal {
            // A removal failed: its messages are queued again, behind the cursor.
            state.settling.lost_removal = false;
            state.cursor = i64::MIN;
        }
        let store = self.platform.store();
        let from_start = state.cursor == i64::MIN;
        // From the start the read passes what is already taken, so it reads that much more.
        let limit = if from_start {
            BATCH + state.taken() as i64
        } else {
            BATCH
        };
        let front = match source {
            Source::Reports(queue) => {
                self.read_reports(action_id, queue, state.cursor, limit as usize, stats)
                    .await
            }
            // Possibly many rows: off the async threads.
            Source::Table if from_start => store
                .queue_after(action_id.to_owned(), state.cursor, limit)
                .await
                .map(shared),
            Source::Table => store
                .queue_after_now(action_id, state.cursor, limit)
                .map(shared),
        };
        let front = match front {
            Ok(front) => front,
            Err(error) => {
                tracing::warn!(%error, "forward queue unreadable");
                return Some(now + 1000);
            }
        };
        // A report queue may have more in the stored history than its memory holds.
        let in_log = matches!(source, Source::Reports(queue) if queue.spilled());
        state.more_behind = front.len() as i64 >= limit || in_log;
        let mut blocked = vec![false; lanes.len()];
        let mut next_due: Option<i64> = None;
        let mut first_skipped: Option<i64> = None;
        let mut last_seen = state.cursor;
        for message in front {
            last_seen = message.id;
            if state.out.contains(&message.id) || state.settling.ids.contains(&message.id) {
                continue;
            }
            let index = lane_of(message.device_id.as_deref(), lanes.len());
            if blocked[index] {
                continue;
            }
            // The lane's earlier messages go first: a message that is not due holds back
            // everything after it on its lane.
            if message.next_at > now {
                next_due = Some(next_due.map_or(message.next_at, |d| d.min(message.next_at)));
                blocked[index] = true;
                first_skipped.get_or_insert(message.id);
            } else {
                state.out.insert(message.id);
                state.waiting[index].push_back(message);
            }
        }
        for (index, lane) in lanes.iter_mut().enumerate() {
            state.feed(index, lane);
        }
        // A message held back (and those after it on its lane) is read again next time.
        state.cursor = first_skipped.map_or(last_seen, |id| id - 1);
        next_due
    }

    /// Books what a lane did with a batch and feeds it more; says whether to read the queue again
    /// (a lane resumed after a failure).
    async fn settle_outcome(
        &self,
        outcome: Outcome,
        source: &Source,
        lanes: &mut [Lane],
        state: &mut Dispatch,
        stats: &ActionStats,
    ) -> bool {
        let index = outcome.lane;
        // A success right after this lane failed ends a run of failures: traced whatever.
        let after_failure = lanes[index].failures_in_a_row > 0;
        lanes[index].in_flight = lanes[index].in_flight.saturating_sub(outcome.len());
        if !outcome.delivered.is_empty() {
            for lane in lanes.iter_mut() {
                lane.failures_in_a_row = 0;
            }
            stats
                .delivered
                .fetch_add(outcome.delivered.len() as u64, Ordering::Relaxed);
            stats.consecutive_failures.store(0, Ordering::Relaxed);
            stats.failing.store(false, Ordering::Relaxed);
        }
        for message in outcome.delivered {
            state
                .trace
                .extend(self.attempt_entry(&message, None, after_failure));
            state.delivered.push(message.id);
        }
        for id in outcome.released {
            state.out.remove(&id);
            state.cursor = state.cursor.min(id - 1);
        }
        if let Some((message, error)) = outcome.failed {
            // The lane hands back what it holds until it is resumed, and what waits for it is
            // put back, so the device's later messages are read again behind the retry.
            self.record_failure(&mut lanes[index], source, &message, &error, state, stats)
                .await;
            state.out.remove(&message.id);
            state.cursor = state.cursor.min(message.id - 1);
            state.put_back(index);
            lanes[index].resume();
            return true;
        }
        state.feed(index, &mut lanes[index]);
        false
    }

    /// Counts a failed attempt and schedules the message's retry (before its lane resumes, so the
    /// next read finds it not yet due and holds the device's later messages behind it).
    async fn record_failure(
        &self,
        lane: &mut Lane,
        source: &Source,
        message: &QueuedMessage,
        error: &str,
        state: &mut Dispatch,
        stats: &ActionStats,
    ) {
        lane.failures_in_a_row += 1;
        // The target counts as failing once one connection has failed `failing_after` times in
        // a row with no success anywhere: lanes failing together are one outage, not many.
        let in_a_row = lane.failures_in_a_row;
        if in_a_row > stats.consecutive_failures.load(Ordering::Relaxed) {
            stats
                .consecutive_failures
                .store(in_a_row, Ordering::Relaxed);
        }
        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
        let failing =
            stats.consecutive_failures.load(Ordering::Relaxed) >= self.config.failing_after;
        stats.failing.store(failing, Ordering::Relaxed);
        let delay = if failing {
            self.config.probe_interval_ms
        } else {
            backoff_ms(message.attempts)
        };
        tracing::debug!(action_id = %message.action_id, %error, in_a_row, "forwarding attempt failed");
        *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_owned());
        state
            .trace
            .extend(self.attempt_entry(message, Some(error), false));
        let next_at = self.platform.now() + delay;
        match source {
            Source::Reports(queue) => queue.retry(message.id, next_at),
            Source::Table => {
                let _ = self
                    .platform
                    .store()
                    .retry_forward(message.id, next_at, error.to_owned())
                    .await;
            }
        }
    }

    /// Submits the removal of what was delivered (with the trace entries gathered meanwhile)
    /// without waiting for its commit (see `Settling`).
    async fn submit_removals(&self, action_id: &str, source: &Source, state: &mut Dispatch) {
        if state.delivered.is_empty() && state.trace.is_empty() {
            return;
        }
        let delivered = std::mem::take(&mut state.delivered);
        let trace = std::mem::take(&mut state.trace);
        for id in &delivered {
            state.out.remove(id);
        }
        let removal = match source {
            Source::Reports(queue) => {
                self.settle_reports(action_id, queue, &delivered, trace)
                    .await
            }
            Source::Table => {
                self.platform
                    .store()
                    .submit_dequeue(delivered.clone(), trace)
                    .await
            }
        };
        if let Ok(removal) = removal {
            state.settling.track(removal, delivered);
        }
    }

    /// Enforces the queue's age and size limits, counting what they drop.
    async fn trim(&self, action_id: &str, source: &Source, stats: &ActionStats, now: i64) {
        if let Source::Reports(queue) = source {
            return self.trim_reports(action_id, queue, stats, now).await;
        }
        let store = self.platform.store();
        if let Ok(n) = store
            .drop_aged(action_id.to_owned(), now - self.config.max_age_ms)
            .await
            && n > 0
        {
            stats.dropped_too_old.fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(
                action_id,
                dropped = n,
                "forwarding messages older than the queue's age limit were dropped"
            );
        }
        if let Ok(n) = store
            .drop_oversize(action_id.to_owned(), self.config.max_queue_bytes)
            .await
            && n > 0
        {
            stats
                .dropped_queue_full
                .fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(
                action_id,
                dropped = n,
                "the forwarding queue was full; its oldest messages were dropped"
            );
        }
    }

    /// Delivers a lane's batch in order over the lane's connection (opened if need be).
    pub(crate) async fn deliver_batch(
        &self,
        spec: &Spec,
        connector: &mut Option<Connector>,
        messages: &[Arc<QueuedMessage>],
    ) -> Result<(), BatchFailure> {
        if connector.is_none() {
            let open = Connector::open(spec, self.config.timeout).await;
            *connector = Some(open.map_err(|error| BatchFailure {
                confirmed: 0,
                error,
            })?);
        }
        let Some(open) = connector.as_mut() else {
            return Err(BatchFailure {
                confirmed: 0,
                error: "no connection".into(),
            });
        };
        let outcome = open.deliver_all(messages, self.config.timeout).await;
        if outcome.is_err() {
            // Reconnect on the next attempt: a broken connection must not stick.
            *connector = None;
        }
        outcome
    }

    /// The trace entry of a delivery attempt, for the device the message came from. A first
    /// attempt that succeeded is traced when the device's message trace ran as the report was
    /// staged (its `report_stored` has its routing, so its `forwarded` follows it even if the
    /// trace stops before delivery) or runs now (`ioda_engine::Platform::traces_success`); a
    /// failure, and the success that ends one (a retried message, or any right `after_failure`
    /// of its lane), always.
    fn attempt_entry(
        &self,
        message: &QueuedMessage,
        error: Option<&str>,
        after_failure: bool,
    ) -> Option<TraceEntry> {
        let device_id = message.device_id.as_deref()?;
        let routine = error.is_none() && message.attempts == 0 && !after_failure;
        if routine && !message.traced && !self.platform.traces_success(device_id) {
            return None;
        }
        let device_id = device_id.to_owned();
        Some(TraceEntry {
            id: 0,
            device_id,
            at: self.platform.now(),
            kind: if error.is_some() {
                "forward_failed"
            } else {
                "forwarded"
            }
            .into(),
            detail: {
                let detail = TraceDetail::object()
                    .opt_str("request_id", message.request_id.as_deref())
                    .str("action_id", &message.action_id)
                    .str("message_id", &message.message_id)
                    .int("attempt", message.attempts + 1);
                // A success is the common case: its entry says no more than it must.
                match error {
                    Some(error) => detail.str("error", error).finish(),
                    None => detail.finish(),
                }
            },
        })
    }
}

/// Delivered messages whose removal from the queue has not committed yet. The worker goes on
/// delivering meanwhile, skipping these when it reads the queue, instead of waiting for a commit
/// behind the devices' reports. A removal that fails leaves its messages queued: they
/// are delivered again (at least once, never lost).
#[derive(Default)]
struct Settling {
    ids: HashSet<i64>,
    removals: VecDeque<(Removal, Vec<i64>)>,
    /// A removal failed since the worker last looked: its messages wait in the queue again.
    lost_removal: bool,
}

type Removal = oneshot::Receiver<Result<(), ioda_store::StoreError>>;

impl Settling {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn track(&mut self, removal: Removal, ids: Vec<i64>) {
        self.ids.extend(ids.iter().copied());
        self.removals.push_back((removal, ids));
    }

    /// Forgets the removals that have finished.
    fn settle(&mut self) {
        while let Some((removal, _)) = self.removals.front_mut() {
            let outcome = match removal.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return,
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(oneshot::error::TryRecvError::Closed) => Err("the store closed".into()),
            };
            self.forget_oldest(outcome);
        }
    }

    /// Waits for the oldest removal to finish.
    async fn wait_oldest(&mut self) {
        if let Some((removal, _)) = self.removals.front_mut() {
            let outcome = match removal.await {
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(_) => Err("the store closed".into()),
            };
            self.forget_oldest(outcome);
        }
    }

    /// Keeps the delivered-but-unremoved messages bounded (the writer is far behind).
    async fn bound(&mut self) {
        while self.ids.len() > MAX_SETTLING {
            self.wait_oldest().await;
        }
    }

    fn forget_oldest(&mut self, outcome: Result<(), String>) {
        if let Some((_, ids)) = self.removals.pop_front() {
            if let Err(error) = outcome {
                self.lost_removal = true;
                tracing::warn!(%error, messages = ids.len(), "forwarded messages could not be removed from the queue; they will be delivered again");
            }
            for id in ids {
                self.ids.remove(&id);
            }
        }
    }
}

/// How long a stopping worker waits for the batches its lanes have out.
const SETTLE_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// Most delivered messages whose removal may be in flight at once.
const MAX_SETTLING: usize = 8 * BATCH as usize;

/// The lane a device's messages always take (messages of no device share lane 0).
fn lane_of(device_id: Option<&str>, lanes: usize) -> usize {
    match device_id {
        Some(id) if lanes > 1 => (fnv(id.as_bytes()) % lanes as u64) as usize,
        _ => 0,
    }
}

/// Messages a worker reads from its queue at a time (shared out over its lanes).
const BATCH: i64 = 512;
/// Messages a lane holds at most (handed over, not reported back).
const LANE_DEPTH: usize = 64;
/// Delivered messages removed from the queue in one job at most (fewer when the lanes go idle).
const REMOVE_IN_GROUPS_OF: usize = 128;

/// Most connections a broker or database action opens.
const BROKER_LANES: usize = 4;

/// 1 s, 2 s, 4 s ... up to a minute.
fn backoff_ms(attempts: i64) -> i64 {
    1000 * (1i64 << attempts.clamp(0, 6)).min(60)
}

/// Messages read from a queue table, shared like the report queue's.
fn shared(messages: Vec<QueuedMessage>) -> Vec<Arc<QueuedMessage>> {
    messages.into_iter().map(Arc::new).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_device_always_takes_the_same_lane() {
        let lanes: Vec<usize> = ["d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8"]
            .iter()
            .map(|d| super::lane_of(Some(d), 4))
            .collect();
        assert!(lanes.iter().all(|l| *l < 4));
        assert!(lanes.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        assert_eq!(super::lane_of(Some("d1"), 4), lanes[0]);
        assert_eq!(super::lane_of(None, 4), 0);
        assert_eq!(super::lane_of(Some("d1"), 1), 0);
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let delays: Vec<i64> = (0..9).map(super::backoff_ms).collect();
        assert_eq!(
            delays,
            vec![1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
    }
}
