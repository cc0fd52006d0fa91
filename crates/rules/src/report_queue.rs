//! The queue of an action that forwards property reports, without a row per message: the stored
//! history is the log (`ioda_store::AfterCommit`), the action keeps a durable cursor in it, and the
//! reports committed after the cursor wait in memory in commit order. After a restart, or while
//! memory is full, the worker reads them back from the history and builds each message again with
//! the same message id.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use ioda_store::{LoggedService, NewForward, QueuedMessage, RoutingAction, StoreError};
use ioda_types::event::{DeviceRef, ReportedService};
use ioda_types::{PlatformEvent, ids};
use tokio::sync::Notify;

use crate::forward::{ActionStats, Batch, Forwarder, LiveRule, Matcher, fnv, read};

/// Stored report rows read back at a time.
const LOG_READ_ROWS: i64 = 4096;
/// Reads of the log one worker read may make while the rows it finds match nothing.
const LOG_READS_PER_READ: usize = 8;

/// The reports an action has yet to settle.
pub(crate) struct ReportQueue {
    inner: Mutex<Inner>,
    pub(crate) wake: Arc<Notify>,
    /// Memory the held messages may take (`held_bytes`) before the queue reads the log instead.
    memory_limit: usize,
}

#[derive(Default)]
struct Inner {
    /// Shared with the delivery lanes: a read hands out references, not copies, and lets go of
    /// the lock the writer thread pushes under at once.
    messages: BTreeMap<i64, Arc<QueuedMessage>>,
    /// Payload bytes held (what `queued_bytes` and the size limit count, as for a queue table).
    bytes: usize,
    /// Memory the held messages take (`held_bytes`), against `memory_limit`.
    held: usize,
    /// Reports numbered from here on are not (all) in memory: they are read back from the log.
    spill_from: Option<i64>,
    /// The newest report left out of memory while spilled.
    dropped_up_to: i64,
    /// Reports up to here are accounted for (read back from the log, or settled before the
    /// worker started); a late hand-over of one of them is ignored.
    floor: i64,
    started: bool,
    /// The cursor last submitted to the store.
    saved: i64,
}

impl Inner {
    fn hold(&mut self, message: QueuedMessage) {
        self.bytes += message.payload.len();
        self.held += held_bytes(&message);
        self.messages.insert(message.id, Arc::new(message));
    }

    fn release(&mut self, id: i64) {
        if let Some(message) = self.messages.remove(&id) {
            self.uncount(&message);
        }
    }

    fn uncount(&mut self, message: &QueuedMessage) {
        self.bytes -= message.payload.len();
        self.held -= held_bytes(message);
    }
}

/// What a message held in memory costs: its text and its bookkeeping, not only its payload (a
/// 200-byte report's message holds about as much again in ids, names and its node in the map).
fn held_bytes(message: &QueuedMessage) -> usize {
    const BOOKKEEPING: usize = std::mem::size_of::<QueuedMessage>() + 64;
    let optional = |text: &Option<String>| text.as_ref().map_or(0, String::len);
    BOOKKEEPING
        + message.payload.len()
        + message.action_id.len()
        + message.message_id.len()
        + optional(&message.device_id)
        + optional(&message.request_id)
}

impl ReportQueue {
    pub(crate) fn new(memory_limit: usize) -> ReportQueue {
        ReportQueue {
            inner: Mutex::new(Inner::default()),
            wake: Arc::new(Notify::new()),
            memory_limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a committed report's message (on the store's writer thread, in commit order).
    pub(crate) fn push(&self, message: QueuedMessage) {
        let mut inner = self.lock();
        if message.id <= inner.floor {
            return;
        }
        if inner.spill_from.is_some() || inner.held + held_bytes(&message) > self.memory_limit {
            inner.spill_from.get_or_insert(message.id);
            inner.dropped_up_to = inner.dropped_up_to.max(message.id);
        } else {
            inner.hold(message);
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Starts from the action's saved cursor (once: a restarted worker keeps what memory holds).
    /// Everything after it is read back from the log first, including what was pushed before the
    /// start: memory then never holds a report beyond where the log takes over, so a report is
    /// either in memory or in the log, never counted (or dropped) twice.
    fn start(&self, cursor: i64) {
        let mut inner = self.lock();
        if inner.started {
            return;
        }
        inner.started = true;
        inner.floor = cursor;
        inner.saved = cursor;
        inner.messages.clear();
        inner.bytes = 0;
        inner.held = 0;
        inner.spill_from = Some(cursor + 1);
    }

    /// Messages numbered after `after` that memory holds in order, and where the log takes over.
    /// Shared, not copied: a message stays here until its delivery is settled, and a copy per
    /// read (five strings) was ~2 % of the server's samples flat out.
    fn read_memory(&self, after: i64, limit: usize) -> (Vec<Arc<QueuedMessage>>, Option<i64>) {
        let inner = self.lock();
        let spill_from = inner.spill_from;
        let upper = spill_from.unwrap_or(i64::MAX);
        let shared: Vec<Arc<QueuedMessage>> = if after.saturating_add(1) >= upper {
            Vec::new()
        } else {
            inner
                .messages
                .range(after.saturating_add(1)..upper)
                .take(limit)
                .map(|(_, m)| m.clone())
                .collect()
        };
        drop(inner);
        (shared, spill_from)
    }

    /// Whether memory holds all it may.
    fn full(&self) -> bool {
        self.lock().held >= self.memory_limit
    }

    /// Whether reports wait in the log beyond memory.
    pub(crate) fn spilled(&self) -> bool {
        self.lock().spill_from.is_some()
    }

    /// Adds what was read back from the log up to `covered` (`complete`: up to the log's end), as
    /// far as memory has room; the rest stays in the log. Memory takes over again once the log is
    /// read to its end and nothing newer was left out meanwhile. Messages received before `cutoff`
    /// are dropped; returns how many.
    fn merge_from_log(
        &self,
        messages: Vec<QueuedMessage>,
        mut covered: i64,
        mut complete: bool,
        cutoff: i64,
    ) -> usize {
        let mut inner = self.lock();
        let mut too_old = 0;
        for message in messages {
            if message.enqueued_at < cutoff {
                too_old += 1;
                continue;
            }
            if inner.held >= self.memory_limit {
                // This report and everything after it are read again later.
                covered = message.id - 1;
                complete = false;
                break;
            }
            inner.hold(message);
        }
        inner.floor = inner.floor.max(covered);
        inner.spill_from = if complete && inner.dropped_up_to <= covered {
            None
        } else {
            Some(covered + 1)
        };
        too_old
    }

    pub(crate) fn remove(&self, ids: &[i64]) {
        let mut inner = self.lock();
        for id in ids {
            inner.release(*id);
        }
    }

    pub(crate) fn retry(&self, id: i64, next_at: i64) {
        if let Some(message) = self.lock().messages.get_mut(&id) {
            let message = Arc::make_mut(message);
            message.attempts += 1;
            message.next_at = next_at;
        }
    }

    /// The cursor (every report up to it is settled) and whether it moved since the last call.
    /// `committed` must be read before the call, so every report up to it has been pushed (or left
    /// out) already.
    fn cursor(&self, committed: i64) -> (i64, bool) {
        let mut inner = self.lock();
        let mut low = committed;
        if let Some(first) = inner.messages.keys().next() {
            low = low.min(first - 1);
        }
        if let Some(from) = inner.spill_from {
            low = low.min(from - 1);
        }
        let moved = low != inner.saved;
        inner.saved = low;
        (low, moved)
    }

    /// Drops messages received before `cutoff` and, oldest first, what exceeds `max_bytes`.
    /// Returns (too old, over the size limit).
    fn trim(&self, cutoff: i64, max_bytes: usize) -> (usize, usize) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut counts = (0, 0);
        while let Some(entry) = inner.messages.first_entry() {
            let too_old = entry.get().enqueued_at < cutoff;
            if !too_old && inner.bytes <= max_bytes {
                break;
            }
            let message = entry.remove();
            inner.uncount(&message);
            if too_old {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
        counts
    }

    /// Messages and bytes in memory, and where the log takes over.
    pub(crate) fn depth(&self) -> (usize, usize, Option<i64>) {
        let inner = self.lock();
        (inner.messages.len(), inner.bytes, inner.spill_from)
    }
}

/// A report's message for an action: its id is the report's first history row, and its message id
/// is derived from that, so a message built again from the log carries the same one. `traced`:
/// the device's message trace ran when the report was staged.
pub(crate) fn report_message(
    item: NewForward,
    (first_row, received_at): (i64, i64),
    traced: bool,
) -> QueuedMessage {
    // A bijection of the row for a given action, so distinct reports of one action get distinct ids.
    let x = ioda_engine::splitmix64((first_row as u64) ^ fnv(item.action_id.as_bytes()));
    QueuedMessage {
        id: first_row,
        message_id: ids::object_id(received_at, x.to_be_bytes()),
        action_id: item.action_id,
        device_id: item.device_id,
        request_id: item.request_id,
        payload: item.payload,
        enqueued_at: received_at,
        attempts: 0,
        next_at: received_at,
        traced,
    }
}

/// Where an action's messages wait: rows of the queue table, or the report log.
#[derive(Clone)]
pub(crate) enum Source {
    Table,
    Reports(Arc<ReportQueue>),
}

impl Forwarder {
    /// Whether an action forwards property reports (and so reads the report log).
    pub(crate) fn reads_report_log(&self, action: &RoutingAction) -> bool {
        read(&self.rules).iter().any(|r| {
            r.rule.rule_id == action.rule_id
                && matches!(&r.matcher, Matcher::Sql { subject, .. }
                    if subject.resource == "device.property" && subject.event == "report")
        })
    }

    /// Loads the cursor a report queue starts from; a new action's is `new_cursor` (the committed
    /// mark read before the action could take its first report: it forwards what arrives from
    /// then on, not the stored past).
    pub(crate) async fn start_reports(
        &self,
        action_id: &str,
        queue: &ReportQueue,
        new_cursor: i64,
    ) {
        let store = self.platform.store();
        let cursor = loop {
            match store.forward_cursor(action_id.to_owned()).await {
                Ok(Some(cursor)) => break cursor,
                Ok(None) => {
                    if let Ok(saved) = store
                        .submit_cursor(action_id.to_owned(), new_cursor, Vec::new())
                        .await
                    {
                        let _ = saved.await;
                    }
                    break new_cursor;
                }
                Err(error) => {
                    tracing::warn!(action_id, %error, "could not read the forwarding cursor");
                    // A store failing at a stop must not hold the stop for its whole timeout.
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            }
        };
        queue.start(cursor);
    }

    /// Up to `limit` messages numbered after `after`, oldest first: from memory, reading the log
    /// on where memory ends.
    pub(crate) async fn read_reports(
        &self,
        action_id: &str,
        queue: &ReportQueue,
        after: i64,
        limit: usize,
        stats: &ActionStats,
    ) -> Result<Vec<Arc<QueuedMessage>>, StoreError> {
        for _ in 0..LOG_READS_PER_READ {
            let (messages, spill_from) = queue.read_memory(after, limit);
            match spill_from {
                Some(from) if messages.len() < limit && !queue.full() => {
                    self.read_log(action_id, queue, from - 1, stats).await?;
                }
                _ => return Ok(messages),
            }
        }
        Ok(queue.read_memory(after, limit).0)
    }

    /// Reads the log after `from` and builds the action's messages of the reports found there.
    async fn read_log(
        &self,
        action_id: &str,
        queue: &ReportQueue,
        from: i64,
        stats: &ActionStats,
    ) -> Result<(), StoreError> {
        let store = self.platform.store();
        let rows = store.logged_after(from, LOG_READ_ROWS).await?;
        let complete = (rows.len() as i64) < LOG_READ_ROWS;
        let reports = whole_reports(rows, complete);
        let covered = reports.last().and_then(|r| r.last()).map_or(from, |s| s.id);
        let cutoff = self.platform.now() - self.config.max_age_ms;
        let mut named: Vec<String> = reports
            .iter()
            .filter_map(|r| r.first().map(|s| s.device_id.clone()))
            .collect();
        named.sort_unstable();
        named.dedup();
        let devices: HashMap<String, Arc<DeviceRef>> = store
            .devices(named)
            .await?
            .into_iter()
            .map(|d| (d.device_id.clone(), d.reference()))
            .collect();
        let mut messages = Vec::new();
        let rule = self.active_rule_of(action_id);
        for report in reports {
            let Some(rule) = &rule else { break };
            let Some(first) = report.first() else {
                continue;
            };
            let (first_row, received_at) = (first.id, first.received_at);
            // A deleted device's stored reports went with it.
            let Some(device) = devices.get(&first.device_id) else {
                continue;
            };
            for item in self.rebuild(action_id, rule, device, report) {
                messages.push(report_message(item, (first_row, received_at), false));
            }
        }
        let too_old = queue.merge_from_log(messages, covered, complete, cutoff);
        stats
            .dropped_too_old
            .fetch_add(too_old as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The action's rule, if it is active (an inactive rule forwards nothing, from the log either).
    fn active_rule_of(&self, action_id: &str) -> Option<Arc<LiveRule>> {
        let actions = read(&self.actions);
        let rule_id = &actions.get(action_id)?.action.rule_id;
        read(&self.rules)
            .iter()
            .find(|r| &r.rule.rule_id == rule_id && r.rule.active)
            .cloned()
    }

    /// The action's message for one stored report, if its rule selects it.
    fn rebuild(
        &self,
        action_id: &str,
        rule: &Arc<LiveRule>,
        device: &Arc<DeviceRef>,
        rows: Vec<LoggedService>,
    ) -> Vec<NewForward> {
        let Some(first) = rows.first() else {
            return Vec::new();
        };
        let (request_id, at) = (first.request_id.clone(), first.received_at);
        // A rule that neither tests nor picks values forwards the envelope around the stored text
        // as it is (`report_envelope_text`): the values are read only for the others (reading
        // them was most of a catch-up's time). Such an event is built for the rule alone.
        let needs_values =
            !matches!(&rule.matcher, Matcher::Sql { compiled, .. } if compiled.reads_no_values());
        let services = rows
            .into_iter()
            .filter_map(|row| {
                Some(ReportedService {
                    properties: if needs_values {
                        serde_json::from_str(&row.properties).ok()?
                    } else {
                        serde_json::Map::new()
                    },
                    // The stored text is what the report's properties were written as.
                    properties_json: row.properties,
                    service_id: row.service_id,
                    event_time: row.event_time,
                })
            })
            .collect();
        let event = PlatformEvent::PropertiesReported {
            device: device.clone(),
            request_id,
            services,
            at,
        };
        let mut batch = Batch {
            device_id: Some(device.device_id.clone()),
            // Read back to be delivered: its stored entry, if any, was made when it came in.
            skip_routing: true,
            ..Batch::default()
        };
        self.evaluate_sql(&event, std::slice::from_ref(rule), None, at, &mut batch);
        batch
            .items
            .into_iter()
            .filter(|item| item.action_id == action_id)
            .collect()
    }

    /// Settles delivered messages: out of memory, and the cursor moved past them (with the trace
    /// entries), without waiting for the commit.
    pub(crate) async fn settle_reports(
        &self,
        action_id: &str,
        queue: &ReportQueue,
        delivered: &[i64],
        trace: Vec<ioda_store::TraceEntry>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let store = self.platform.store();
        let committed = store.history_committed();
        queue.remove(delivered);
        let (cursor, _) = queue.cursor(committed);
        store
            .submit_cursor(action_id.to_owned(), cursor, trace)
            .await
    }

    /// Applies the age and size limits to what memory holds, and saves a cursor that moved without
    /// deliveries (reports the rule let pass).
    pub(crate) async fn trim_reports(
        &self,
        action_id: &str,
        queue: &ReportQueue,
        stats: &ActionStats,
        now: i64,
    ) {
        let max_bytes = usize::try_from(self.config.max_queue_bytes).unwrap_or(usize::MAX);
        let (too_old, too_many) = queue.trim(now - self.config.max_age_ms, max_bytes);
        stats
            .dropped_too_old
            .fetch_add(too_old as u64, Ordering::Relaxed);
        stats
            .dropped_queue_full
            .fetch_add(too_many as u64, Ordering::Relaxed);
        if too_old + too_many > 0 {
            tracing::warn!(
                action_id,
                too_old,
                too_many,
                "forwarding messages were dropped by the queue's limits"
            );
        }
        let store = self.platform.store();
        if let (cursor, true) = queue.cursor(store.history_committed()) {
            let _ = store
                .submit_cursor(action_id.to_owned(), cursor, Vec::new())
                .await;
        }
    }
}

/// Groups stored rows into whole reports (a report's rows are adjacent). When the read stopped at
/// its limit, the last report may be cut: it is left for the next read, unless it is all there is.
fn whole_reports(rows: Vec<LoggedService>, complete: bool) -> Vec<Vec<LoggedService>> {
    let mut reports: Vec<Vec<LoggedService>> = Vec::new();
    for row in rows {
        match reports.last_mut() {
            Some(report)
                if report.last().is_some_and(|last| {
                    last.device_id == row.device_id && last.request_id == row.request_id
                }) =>
            {
                report.push(row)
            }
            _ => reports.push(vec![row]),
        }
    }
    if !complete && reports.len() > 1 {
        reports.pop();
    }
    reports
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn message(id: i64) -> QueuedMessage {
        QueuedMessage {
            id,
            action_id: "action".into(),
            device_id: Some("device".into()),
            request_id: Some(format!("request-{id}")),
            message_id: format!("message-{id}"),
            payload: "x".repeat(200),
            enqueued_at: 0,
            attempts: 0,
            next_at: 0,
            traced: false,
        }
    }

    #[test]
    fn memory_counts_what_a_message_holds_and_queued_bytes_its_payload() {
        let held = held_bytes(&message(1));
        assert!(held > 200 + 50, "ids and bookkeeping count: {held}");
        // Room for two messages as held, though ten payloads would fit.
        let queue = ReportQueue::new(2 * held + held / 2);
        queue.start(0);
        // The log read back to its end, empty: memory takes over.
        queue.merge_from_log(vec![], 0, true, i64::MIN);
        for id in 1..=3 {
            queue.push(message(id));
        }
        let (messages, bytes, spill_from) = queue.depth();
        assert_eq!((messages, bytes, spill_from), (2, 400, Some(3)));
        queue.remove(&[1]);
        assert_eq!(queue.depth().1, 200);
        assert!(!queue.full());
    }
}
