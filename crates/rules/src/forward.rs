//! The forwarding runtime: a dispatcher that turns platform events into queued messages for the
//! actions of matching rules, and one worker per action that delivers its queue (`deliver.rs`).
//!
//! Queues are durable (SQLite) and bounded by size and age; every drop is counted. A target on
//! which one connection fails ten times in a row, with no success on any, is marked failing and
//! probed every three minutes; a success clears it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ioda_engine::{ForwardStage, Platform, StageTrace, StagedForwarding};
use ioda_store::{
    AfterCommit, DetailWriter, NewForward, RoutingAction, RoutingRule, TraceDetail, TraceEntry,
};
use ioda_types::{PlatformEvent, ids};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;

use crate::envelope::{
    Subject, device_of, envelope, parse_subject, report_envelope_text, subject_of,
};
use crate::report_queue::{ReportQueue, Source, report_message};
use crate::sql::{Rule, compile};

/// Limits and timings of forwarding.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// How long a target has to answer.
    pub timeout: Duration,
    /// Largest queue per action, in bytes; the oldest messages go first beyond it.
    pub max_queue_bytes: i64,
    /// Oldest message a queue keeps, in milliseconds.
    pub max_age_ms: i64,
    /// Attempts failing in a row on one connection (with no success on any) after which a target
    /// counts as failing.
    pub failing_after: u64,
    /// How often a failing target is probed, in milliseconds.
    pub probe_interval_ms: i64,
    /// Connections an HTTP action delivers over at once (at least one); a broker or database
    /// action uses at most `BROKER_LANES` of them, so it holds few connections per target.
    pub lanes: usize,
    /// Bytes of messages an action forwarding property reports holds in memory; beyond it the
    /// action reads the reports back from the stored history.
    pub report_memory_bytes: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            timeout: Duration::from_secs(15),
            max_queue_bytes: 1 << 30,
            max_age_ms: 24 * 3_600_000,
            failing_after: 10,
            probe_interval_ms: 180_000,
            lanes: 16,
            report_memory_bytes: 32 << 20,
        }
    }
}

/// Counters of one action, shown by the API so an operator can see what happened to the data.
#[derive(Debug, Default)]
pub struct ActionStats {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dropped_too_old: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub consecutive_failures: AtomicU64,
    pub failing: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

impl ActionStats {
    /// The counters as JSON.
    pub fn snapshot(&self) -> Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "delivered": load(&self.delivered),
            "failed_attempts": load(&self.failed_attempts),
            "dropped_too_old": load(&self.dropped_too_old),
            "dropped_queue_full": load(&self.dropped_queue_full),
            "consecutive_failures": load(&self.consecutive_failures),
            "failing": self.failing.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

/// A rule ready to evaluate.
pub(crate) struct LiveRule {
    pub rule: RoutingRule,
    pub matcher: Matcher,
}

/// How a rule picks events and shapes what it forwards.
pub(crate) enum Matcher {
    /// A v5 routing rule: a subject and rule SQL over the push envelope.
    Sql { subject: Subject, compiled: Rule },
    /// A legacy subscription: a notify type with its own push bodies.
    Legacy { notify_type: String },
}

/// The `resource` under which legacy subscriptions are stored beside the v5 rules.
pub const LEGACY_RESOURCE: &str = "legacy";

/// A running action: its definition, its worker and its counters.
pub(crate) struct LiveAction {
    pub action: RoutingAction,
    pub stats: Arc<ActionStats>,
    pub wake: Arc<Notify>,
    pub worker: JoinHandle<()>,
    pub source: Source,
}

/// Data forwarding for a platform.
pub struct Forwarder {
    pub(crate) platform: Arc<Platform>,
    pub(crate) config: ForwardConfig,
    pub(crate) rules: RwLock<Vec<Arc<LiveRule>>>,
    pub(crate) actions: RwLock<HashMap<String, LiveAction>>,
    /// Events the dispatcher could not see because it fell behind the bus.
    pub lost_events: AtomicU64,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn live_rule(rule: RoutingRule) -> Option<LiveRule> {
    let matcher = if rule.resource == LEGACY_RESOURCE {
        crate::legacy::NOTIFY_TYPES
            .contains(&rule.event.as_str())
            .then(|| Matcher::Legacy {
                notify_type: rule.event.clone(),
            })?
    } else {
        let subject = parse_subject(&rule.resource, &rule.event)?;
        let compiled = compile(rule.select.as_deref(), rule.condition.as_deref()).ok()?;
        Matcher::Sql { subject, compiled }
    };
    Some(LiveRule { rule, matcher })
}

impl Forwarder {
    /// Loads rules and actions, starts a worker per action and the dispatcher.
    pub async fn start(
        platform: Arc<Platform>,
        config: ForwardConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Forwarder>, ioda_store::StoreError> {
        let rules = platform.store().rules().await?;
        let actions = platform.store().actions().await?;
        let events = platform.bus().subscribe_control();
        let forwarder = Arc::new(Forwarder {
            platform,
            config,
            rules: RwLock::new(
                rules
                    .into_iter()
                    .filter_map(live_rule)
                    .map(Arc::new)
                    .collect(),
            ),
            actions: RwLock::new(HashMap::new()),
            lost_events: AtomicU64::new(0),
            shutdown,
        });
        for action in actions {
            forwarder.run_action(action);
        }
        forwarder.platform.set_forward_stage(forwarder.clone());
        tokio::spawn(forwarder.clone().dispatch_loop(events));
        Ok(forwarder)
    }

    /// Starts (or restarts) the worker of an action.
    pub(crate) fn run_action(self: &Arc<Self>, action: RoutingAction) {
        let stats = Arc::new(ActionStats::default());
        // Read before the action can take a report: every report staged for it is numbered after.
        let new_cursor = self.platform.store().history_committed();
        // A restarted action keeps the reports its memory holds (they are not in a table).
        let kept = read(&self.actions)
            .get(&action.action_id)
            .and_then(|live| match &live.source {
                Source::Reports(queue) => Some(queue.clone()),
                Source::Table => None,
            });
        let source = match kept {
            Some(queue) => Source::Reports(queue),
            None if self.reads_report_log(&action) => {
                Source::Reports(Arc::new(ReportQueue::new(self.config.report_memory_bytes)))
            }
            None => Source::Table,
        };
        let wake = match &source {
            Source::Reports(queue) => queue.wake.clone(),
            Source::Table => Arc::new(Notify::new()),
        };
        let worker = tokio::spawn(self.clone().worker(
            action.clone(),
            stats.clone(),
            wake.clone(),
            source.clone(),
            new_cursor,
        ));
        let previous = write(&self.actions).insert(
            action.action_id.clone(),
            LiveAction {
                action,
                stats,
                wake,
                worker,
                source,
            },
        );
        if let Some(previous) = previous {
            previous.worker.abort();
        }
    }

    /// Waits for every action's worker to end after shutdown (each settles what its lanes have
    /// out first).
    pub async fn stopped(&self) {
        let workers: Vec<JoinHandle<()>> = write(&self.actions)
            .drain()
            .map(|(_, live)| live.worker)
            .collect();
        for worker in workers {
            let _ = worker.await;
        }
    }

    /// Stops an action's worker.
    pub(crate) fn stop_action(&self, action_id: &str) {
        if let Some(live) = write(&self.actions).remove(action_id) {
            live.worker.abort();
        }
    }

    async fn dispatch_loop(self: Arc<Self>, mut events: broadcast::Receiver<Arc<PlatformEvent>>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            let received = tokio::select! {
                received = events.recv() => received,
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            };
            match received {
                Ok(event) => self.dispatch(&event).await,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.lost_events.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(lost = n, "forwarding fell behind the event bus");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn project_of(event: &PlatformEvent) -> Option<&str> {
        match event {
            PlatformEvent::ProductCreated { project_id, .. }
            | PlatformEvent::ProductUpdated { project_id, .. }
            | PlatformEvent::ProductDeleted { project_id, .. } => Some(project_id),
            other => device_of(other).map(|d| d.project_id.as_str()),
        }
    }

    /// The full resource some bodies carry (`device` and `product` create/update).
    async fn detail(&self, event: &PlatformEvent) -> Option<Value> {
        match event {
            PlatformEvent::DeviceCreated { device, .. }
            | PlatformEvent::DeviceUpdated { device, .. } => {
                let d = self
                    .platform
                    .store()
                    .device(device.device_id.clone())
                    .await
                    .ok()??;
                Some(json!({
                    "app_id": d.app_id, "device_id": d.device_id, "node_id": d.node_id, "gateway_id": d.gateway_id,
                    "device_name": d.device_name, "node_type": if d.gateway_id == d.device_id { "GATEWAY" } else { "ENDPOINT" },
                    "description": d.description, "product_id": d.product_id, "status": d.shown_status().as_str(),
                    "auth_info": { "auth_type": d.auth.auth_type, "secure_access": d.auth.secure_access, "timeout": d.auth.timeout },
                    "create_time": ioda_types::time::format_compact(d.created_at), "extension_info": d.extension_info, "tags": [],
                }))
            }
            PlatformEvent::ProductCreated {
                project_id,
                product_id,
                ..
            }
            | PlatformEvent::ProductUpdated {
                project_id,
                product_id,
                ..
            } => {
                let p = self.platform.product(project_id, product_id).await.ok()?;
                Some(json!({
                    "app_id": p.app_id, "product_id": p.product_id, "name": p.name, "device_type": p.device_type,
                    "protocol_type": p.protocol_type, "data_format": p.data_format, "manufacturer_name": p.manufacturer_name,
                    "industry": p.industry, "description": p.description, "service_capabilities": p.service_capabilities,
                    "create_time": ioda_types::time::format_compact(p.created_at),
                }))
            }
            _ => None,
        }
    }

    /// The active rules (and legacy subscriptions) of an event's project.
    fn rules_for(&self, event: &PlatformEvent) -> Vec<Arc<LiveRule>> {
        let Some(project_id) = Self::project_of(event) else {
            return Vec::new();
        };
        let app_id = device_of(event).map(|d| d.app_id.as_str());
        read(&self.rules)
            .iter()
            .filter(|r| r.rule.active && r.rule.project_id == project_id)
            .filter(|r| r.rule.app_type != "APP" || r.rule.app_id.as_deref() == app_id)
            .cloned()
            .collect()
    }

    /// Handles the events that were not staged in their own transaction (everything but the
    /// device's data, see `ForwardStage`): evaluates rules and queues what they select.
    async fn dispatch(self: &Arc<Self>, event: &PlatformEvent) {
        let rules = self.rules_for(event);
        let callback = matches!(event, PlatformEvent::AsyncCommandStatusChanged { .. });
        if rules.is_empty() && !callback {
            return;
        }
        let now = self.platform.now();
        let mut batch = Batch {
            device_id: device_of(event).map(|d| d.device_id.clone()),
            ..Batch::default()
        };
        if !rules.is_empty() {
            let detail = self.detail(event).await;
            let device = match device_of(event) {
                Some(d) if rules.iter().any(|r| matches!(&r.matcher, Matcher::Legacy { notify_type } if crate::legacy::needs_device(notify_type))) => {
                    self.platform.store().device(d.device_id.clone()).await.ok().flatten()
                }
                _ => None,
            };
            self.evaluate(event, &rules, detail, device.as_ref(), now, &mut batch);
        }
        self.dispatch_command_callback(event, now, &mut batch).await;
        if batch.items.is_empty() && batch.trace.is_empty() {
            return;
        }
        if let Err(error) = self
            .platform
            .store()
            .enqueue_forward(batch.items, batch.trace, now)
            .await
        {
            tracing::error!(%error, "could not queue messages for forwarding");
            return;
        }
        for wake in batch.woken {
            wake.notify_one();
        }
    }

    /// Queues `payload` for each of the rule's actions: the last takes it, the others a copy.
    fn queue_for_rule(
        &self,
        rule_id: &str,
        payload: String,
        request_id: &str,
        now: i64,
        batch: &mut Batch,
    ) {
        let actions = read(&self.actions);
        let mut taking = actions
            .values()
            .filter(|a| a.action.rule_id == rule_id)
            .peekable();
        let mut payload = Some(payload);
        while let Some(live) = taking.next() {
            let payload = match taking.peek() {
                Some(_) => payload.clone(),
                None => payload.take(),
            };
            batch.items.push(NewForward {
                action_id: live.action.action_id.clone(),
                message_id: ids::object_id(now, rand8()),
                payload: payload.unwrap_or_default(),
                device_id: batch.device_id.clone(),
                request_id: Some(request_id.to_owned()),
            });
            batch.woken.push(live.wake.clone());
        }
    }

    /// Evaluates rules and legacy subscriptions for an event, adding queue items and a trace entry.
    fn evaluate(
        &self,
        event: &PlatformEvent,
        rules: &[Arc<LiveRule>],
        detail: Option<Value>,
        device: Option<&ioda_types::Device>,
        now: i64,
        batch: &mut Batch,
    ) {
        self.evaluate_sql(event, rules, detail, now, batch);
        for rule in rules {
            if let Matcher::Legacy { notify_type } = &rule.matcher {
                for payload in crate::legacy::payloads(notify_type, event, device) {
                    let request_id = payload["requestId"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| ids::object_id(now, rand8()));
                    self.queue_for_rule(
                        &rule.rule.rule_id,
                        payload.to_string(),
                        &request_id,
                        now,
                        batch,
                    );
                }
            }
        }
    }

    pub(crate) fn evaluate_sql(
        &self,
        event: &PlatformEvent,
        rules: &[Arc<LiveRule>],
        detail: Option<Value>,
        now: i64,
        batch: &mut Batch,
    ) {
        let Some(subject) = subject_of(event) else {
            return;
        };
        let candidates: Vec<(&RoutingRule, &Rule)> = rules
            .iter()
            .filter_map(|r| match &r.matcher {
                Matcher::Sql {
                    subject: s,
                    compiled,
                } if *s == subject => Some((&r.rule, compiled)),
                _ => None,
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let request_id = match event {
            PlatformEvent::PropertiesReported { request_id, .. }
            | PlatformEvent::MessageReported { request_id, .. } => request_id.clone(),
            _ => ids::object_id(now, rand8()),
        };
        // Rules that forward the whole envelope share one serialisation of it; when no rule tests
        // or picks anything in it, a report's is written without building the value tree.
        let mut whole: Option<String> = candidates
            .iter()
            .all(|(_, compiled)| compiled.reads_no_values())
            .then(|| report_envelope_text(event, &request_id))
            .flatten();
        let tree = match &whole {
            Some(_) => None,
            None => match envelope(event, detail, &request_id) {
                Some(tree) => Some(tree),
                None => return,
            },
        };
        let (matched, unmatched): (Vec<_>, Vec<_>) =
            candidates.into_iter().partition(|(_, compiled)| {
                tree.as_ref().is_none_or(|tree| compiled.matches(tree, now))
            });
        let first = batch.items.len();
        let last = matched.len().saturating_sub(1);
        for (n, (rule, compiled)) in matched.iter().enumerate() {
            let payload = match &tree {
                Some(tree) if !compiled.selects_all() => compiled.project(tree, now).to_string(),
                Some(tree) => whole.get_or_insert_with(|| tree.to_string()).clone(),
                // The last rule takes the text (usually the only one: no copy at all).
                None if n == last => whole.take().unwrap_or_default(),
                None => whole.clone().unwrap_or_default(),
            };
            self.queue_for_rule(&rule.rule_id, payload, &request_id, now, batch);
        }
        // The device trace says which rules took the data and which let it pass: inside the
        // entry that says the data was stored, for a device's own uplink (one entry per message,
        // not two: the trace was a fifth of the server's time), else in an entry of its own.
        let rules = |detail: DetailWriter| {
            detail
                .strs("matched", matched.iter().map(|(r, _)| r.rule_id.as_str()))
                .strs(
                    "not_matched",
                    unmatched.iter().map(|(r, _)| r.rule_id.as_str()),
                )
                .strs(
                    "queued_for",
                    batch.items[first..].iter().map(|i| i.action_id.as_str()),
                )
                .finish()
        };
        // Device data is staged by the uplink itself, in the transaction that stores it (the
        // dispatcher does not even listen for it): its routing goes into the stored-data entry.
        if ioda_engine::is_device_data(event) {
            if !batch.skip_routing {
                batch.routing = Some(rules(TraceDetail::object()));
            }
        } else if let Some(device_id) = batch.device_id.clone() {
            let detail = rules(TraceDetail::object().str("request_id", &request_id).str(
                "subject",
                &format!("{}/{}", subject.resource, subject.event),
            ));
            let kind = if matched.is_empty() {
                "rules_not_matched"
            } else {
                "rules_matched"
            };
            batch.trace.push(TraceEntry {
                id: 0,
                device_id,
                at: now,
                kind: kind.into(),
                detail,
            });
        }
    }

    /// An asynchronous command created with a `callback_url` reports each status change there,
    /// through a hidden HTTP action per URL (so the notification is queued, retried and traced).
    async fn dispatch_command_callback(
        self: &Arc<Self>,
        event: &PlatformEvent,
        now: i64,
        batch: &mut Batch,
    ) {
        let PlatformEvent::AsyncCommandStatusChanged {
            device,
            command_id,
            status,
            result,
            ..
        } = event
        else {
            return;
        };
        let Ok(Some(command)) = self.platform.store().command(command_id.clone()).await else {
            return;
        };
        let Some(url) = command.callback_url else {
            return;
        };
        // One hidden action per project and URL: projects never share a queue.
        let action_id = format!(
            "callback-{:016x}",
            fnv(format!("{}|{url}", device.project_id).as_bytes())
        );
        let known = read(&self.actions).contains_key(&action_id);
        if !known {
            let action = RoutingAction {
                seq: 0,
                action_id: action_id.clone(),
                project_id: device.project_id.clone(),
                rule_id: String::new(),
                channel: "HTTP_FORWARDING".to_owned(),
                channel_detail: json!({ "http_forwarding": { "url": url } }),
                created_at: now,
            };
            match self.platform.store().save_action(action).await {
                Ok(action) => self.run_action(action),
                Err(error) => {
                    tracing::warn!(%error, "could not create the callback action");
                    return;
                }
            }
        }
        let payload = json!({
            "deviceId": device.device_id,
            "commandId": command_id,
            "result": { "resultCode": status.as_str(), "resultDetail": result },
        });
        let wake = read(&self.actions)
            .get(&action_id)
            .map(|live| live.wake.clone());
        if let Some(wake) = wake {
            batch.items.push(NewForward {
                action_id,
                message_id: ids::object_id(now, rand8()),
                payload: payload.to_string(),
                device_id: batch.device_id.clone(),
                request_id: Some(command_id.clone()),
            });
            batch.woken.push(wake);
        }
    }
}

impl ForwardStage for Forwarder {
    fn stage(&self, event: &PlatformEvent, now: i64, trace: StageTrace) -> StagedForwarding {
        let rules = self.rules_for(event);
        if rules.is_empty() {
            return StagedForwarding::default();
        }
        let mut batch = Batch {
            device_id: device_of(event).map(|d| d.device_id.clone()),
            skip_routing: !trace.routing(),
            ..Batch::default()
        };
        self.evaluate(event, &rules, None, None, now, &mut batch);
        // Actions that read the report log take the report in memory once it has committed;
        // the others get queue rows in the report's transaction.
        let mut rows = Vec::new();
        let mut from_log = Vec::new();
        {
            let actions = read(&self.actions);
            for item in batch.items {
                match actions.get(&item.action_id).map(|live| &live.source) {
                    Some(Source::Reports(queue)) => from_log.push((queue.clone(), item)),
                    _ => rows.push(item),
                }
            }
        }
        let traced = trace == StageTrace::Traced;
        let after_commit = (!from_log.is_empty()).then(|| {
            Box::new(move |first_row: i64| {
                for (queue, item) in from_log {
                    queue.push(report_message(item, (first_row, now), traced));
                }
            }) as AfterCommit
        });
        StagedForwarding {
            rows,
            after_commit,
            routing: batch.routing,
        }
    }

    fn wake(&self, action_ids: &[String]) {
        let actions = read(&self.actions);
        for id in action_ids {
            if let Some(live) = actions.get(id) {
                live.wake.notify_one();
            }
        }
    }
}

/// What one event produced: messages to queue, actions to wake and trace entries.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) device_id: Option<String>,
    pub(crate) items: Vec<NewForward>,
    pub(crate) woken: Vec<Arc<Notify>>,
    pub(crate) trace: Vec<TraceEntry>,
    /// Which rules took a device's own uplink, for the entry that records it as stored.
    pub(crate) routing: Option<TraceDetail>,
    /// No such entry is made (the device's message trace is not running): `routing` stays empty.
    pub(crate) skip_routing: bool,
}

/// FNV-1a: a stable short name for a callback URL.
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn rand8() -> [u8; 8] {
    ioda_engine::id_bytes()
}
