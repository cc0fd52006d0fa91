//! Delivery: each action's worker takes the front of its durable queue and delivers it over
//! several lanes at once, each with its own connection. A device always uses the same lane, so one
//! device's messages arrive in the order they were produced while different devices' messages
//! overlap their round trips.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ioda_store::{QueuedMessage, RoutingAction, TraceEntry};
use serde_json::json;
use tokio::sync::{Notify, oneshot};

use crate::connector::{Connector, Spec};
use crate::forward::{ActionStats, Forwarder, fnv};

impl Forwarder {
    pub(crate) async fn worker(
        self: Arc<Self>,
        action: RoutingAction,
        stats: Arc<ActionStats>,
        wake: Arc<Notify>,
    ) {
        let spec = match Spec::parse(&action.channel, &action.channel_detail) {
            Ok(spec) => spec,
            Err(error) => {
                tracing::warn!(action_id = %action.action_id, %error, "action has an unusable channel; it forwards nothing");
                return;
            }
        };
        let lane_count = if spec.is_broker() {
            self.config.lanes.min(BROKER_LANES)
        } else {
            self.config.lanes
        };
        let mut lanes: Vec<Option<Connector>> = (0..lane_count.max(1)).map(|_| None).collect();
        let mut settling = Settling::default();
        let mut shutdown = self.shutdown.clone();
        let mut last_trim = i64::MIN;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now = self.platform.now();
            if now.saturating_sub(last_trim) >= 10_000 {
                self.trim(&action.action_id, &stats, now).await;
                last_trim = now;
            }
            settling.settle();
            settling.bound().await;
            let front = self
                .platform
                .store()
                .queue_front(action.action_id.clone(), BATCH + settling.len() as i64)
                .await
                .map(|front| settling.unsettled(front));
            let wait = match front {
                Ok(front) if front.first().is_some_and(|m| m.next_at <= now) => {
                    self.deliver_front(&spec, &mut lanes, front, &stats, &mut settling, now)
                        .await;
                    continue;
                }
                Ok(front) if front.is_empty() && settling.len() > 0 => {
                    // Only removals in flight: once the oldest commits, look again.
                    settling.wait_oldest().await;
                    continue;
                }
                Ok(front) => match front.first() {
                    Some(head) => {
                        Duration::from_millis((head.next_at - now).clamp(10, 1000) as u64)
                    }
                    None => Duration::from_secs(1),
                },
                Err(error) => {
                    tracing::warn!(%error, "forward queue unreadable");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            }
        }
    }

    /// Enforces the queue's age and size limits, counting what they drop.
    async fn trim(&self, action_id: &str, stats: &ActionStats, now: i64) {
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

    /// Delivers the front of a queue over the lanes at once. Each lane goes in order and stops at
    /// its first failure (or at a message not yet due), so a device's later messages wait behind
    /// its earlier ones; successes are removed (with their trace entries) in one write, failures
    /// are scheduled for retry.
    async fn deliver_front(
        &self,
        spec: &Spec,
        lanes: &mut [Option<Connector>],
        front: Vec<QueuedMessage>,
        stats: &ActionStats,
        settling: &mut Settling,
        now: i64,
    ) {
        let mut per_lane: Vec<Vec<&QueuedMessage>> = vec![Vec::new(); lanes.len()];
        for message in &front {
            per_lane[lane_of(message.device_id.as_deref(), lanes.len())].push(message);
        }
        let outcomes = futures_util::future::join_all(
            lanes
                .iter_mut()
                .zip(per_lane)
                .map(|(connector, messages)| self.deliver_lane(spec, connector, messages, now)),
        )
        .await;
        let mut done = Vec::new();
        let mut trace = Vec::new();
        let mut failures = Vec::new();
        for outcome in outcomes {
            done.extend(outcome.done);
            trace.extend(outcome.trace);
            failures.extend(outcome.failure);
        }
        if !done.is_empty() {
            stats
                .delivered
                .fetch_add(done.len() as u64, Ordering::Relaxed);
            stats.consecutive_failures.store(0, Ordering::Relaxed);
            stats.failing.store(false, Ordering::Relaxed);
        }
        let store = self.platform.store();
        if !done.is_empty() || !trace.is_empty() {
            // Not awaited: the next round goes on while the removal commits (see `Settling`).
            if let Ok(removal) = store.submit_dequeue(done.clone(), trace).await {
                settling.track(removal, done);
            }
        }
        if failures.is_empty() {
            return;
        }
        // A round counts as one failure in a row however many lanes failed in it, so a
        // target is marked failing after `failing_after` rounds, not after one bad burst.
        let in_a_row = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        stats
            .failed_attempts
            .fetch_add(failures.len() as u64, Ordering::Relaxed);
        let failing = in_a_row >= self.config.failing_after;
        stats.failing.store(failing, Ordering::Relaxed);
        for (message, error) in failures {
            let delay = if failing {
                self.config.probe_interval_ms
            } else {
                backoff_ms(message.attempts)
            };
            tracing::debug!(action_id = %message.action_id, %error, in_a_row, "forwarding attempt failed");
            *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
            let _ = store
                .retry_forward(message.id, self.platform.now() + delay, error)
                .await;
        }
    }

    /// Delivers one lane's messages in order, stopping at the first failure or the first message
    /// that is not due yet.
    async fn deliver_lane<'m>(
        &self,
        spec: &Spec,
        connector: &mut Option<Connector>,
        messages: Vec<&'m QueuedMessage>,
        now: i64,
    ) -> LaneOutcome<'m> {
        let mut outcome = LaneOutcome::default();
        for message in messages {
            if message.next_at > now {
                break;
            }
            match self.deliver_one(spec, connector, message).await {
                Ok(()) => {
                    outcome.done.push(message.id);
                    outcome.trace.extend(self.attempt_entry(message, None));
                }
                Err(error) => {
                    outcome
                        .trace
                        .extend(self.attempt_entry(message, Some(&error)));
                    outcome.failure = Some((message, error));
                    break;
                }
            }
        }
        outcome
    }

    async fn deliver_one(
        &self,
        spec: &Spec,
        connector: &mut Option<Connector>,
        message: &QueuedMessage,
    ) -> Result<(), String> {
        if connector.is_none() {
            *connector = Some(Connector::open(spec, self.config.timeout).await?);
        }
        let Some(open) = connector.as_mut() else {
            return Err("no connection".into());
        };
        let outcome = open.deliver(message, self.config.timeout).await;
        if outcome.is_err() {
            // Reconnect on the next attempt: a broken connection must not stick.
            *connector = None;
        }
        outcome
    }

    /// The trace entry of a delivery attempt, for the device the message came from.
    fn attempt_entry(&self, message: &QueuedMessage, error: Option<&String>) -> Option<TraceEntry> {
        let device_id = message.device_id.clone()?;
        Some(TraceEntry {
            id: 0,
            device_id,
            at: self.platform.now(),
            kind: if error.is_some() {
                "forward_failed"
            } else {
                "forwarded"
            }
            .to_owned(),
            detail: json!({
                "request_id": message.request_id,
                "action_id": message.action_id,
                "message_id": message.message_id,
                "attempt": message.attempts + 1,
                "error": error,
            }),
        })
    }
}

/// Delivered messages whose removal from the queue has not committed yet. The worker goes on
/// delivering meanwhile, skipping these when it reads the queue, instead of waiting for a commit
/// each round behind the devices' reports. A removal that fails leaves its messages queued: they
/// are delivered again (at least once, never lost).
#[derive(Default)]
struct Settling {
    ids: HashSet<i64>,
    removals: VecDeque<(Removal, Vec<i64>)>,
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

    /// The queue's front without the messages already delivered, at most `BATCH` of them.
    fn unsettled(&self, mut front: Vec<QueuedMessage>) -> Vec<QueuedMessage> {
        front.retain(|m| !self.ids.contains(&m.id));
        front.truncate(BATCH as usize);
        front
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
                tracing::warn!(%error, messages = ids.len(), "forwarded messages could not be removed from the queue; they will be delivered again");
            }
            for id in ids {
                self.ids.remove(&id);
            }
        }
    }
}

/// Most delivered messages whose removal may be in flight at once.
const MAX_SETTLING: usize = 8 * BATCH as usize;

/// What one lane did with its share of a queue's front.
#[derive(Default)]
struct LaneOutcome<'m> {
    done: Vec<i64>,
    trace: Vec<TraceEntry>,
    failure: Option<(&'m QueuedMessage, String)>,
}

/// The lane a device's messages always take (messages of no device share lane 0).
fn lane_of(device_id: Option<&str>, lanes: usize) -> usize {
    match device_id {
        Some(id) if lanes > 1 => (fnv(id.as_bytes()) % lanes as u64) as usize,
        _ => 0,
    }
}

/// Messages a worker takes from its queue at a time (shared out over its lanes).
const BATCH: i64 = 512;

/// Most connections a broker or database action opens.
const BROKER_LANES: usize = 4;

/// 1 s, 2 s, 4 s ... up to a minute.
fn backoff_ms(attempts: i64) -> i64 {
    1000 * (1i64 << attempts.clamp(0, 6)).min(60)
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
