//! Data-forwarding rules and actions, and the durable per-action queue of messages to forward.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rusqlite::{Connection, Row, params};
use serde_json::Value;

use crate::{Store, StoreError};

/// A forwarding rule (`RoutingRule`).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingRule {
    pub seq: i64,
    pub rule_id: String,
    pub project_id: String,
    pub rule_name: Option<String>,
    pub description: Option<String>,
    pub resource: String,
    pub event: String,
    pub app_type: String,
    pub app_id: Option<String>,
    pub select: Option<String>,
    pub condition: Option<String>,
    pub active: bool,
    pub created_at: i64,
}

/// A forwarding action of a rule (`RoutingRuleAction`).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingAction {
    pub seq: i64,
    pub action_id: String,
    pub project_id: String,
    pub rule_id: String,
    pub channel: String,
    pub channel_detail: Value,
    pub created_at: i64,
}

/// One message waiting to be forwarded by an action.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    pub id: i64,
    pub action_id: String,
    /// The device and uplink the message came from, for the device trace.
    pub device_id: Option<String>,
    pub request_id: Option<String>,
    /// Stable across retries, so receivers can drop duplicates.
    pub message_id: String,
    pub payload: String,
    pub enqueued_at: i64,
    pub attempts: i64,
    pub next_at: i64,
    /// The device's message trace ran when the message was staged, so its first delivery is
    /// traced even if the trace has stopped by then (known only for messages handed over in
    /// memory; a row read back says false, and the trace's state at delivery decides).
    pub traced: bool,
}

/// A message to queue for an action.
#[derive(Debug, Clone, PartialEq)]
pub struct NewForward {
    pub action_id: String,
    pub message_id: String,
    pub payload: String,
    pub device_id: Option<String>,
    pub request_id: Option<String>,
}

/// How much an action's queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    pub messages: i64,
    pub bytes: i64,
}

fn queue_rows(
    c: &Connection,
    action_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<QueuedMessage>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT id, action_id, message_id, payload, enqueued_at, attempts, next_at, device_id, request_id \
         FROM forward_queue WHERE action_id = ?1 AND id > ?3 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![action_id, limit, after], |r| {
        Ok(QueuedMessage {
            id: r.get(0)?,
            action_id: r.get(1)?,
            message_id: r.get(2)?,
            payload: r.get(3)?,
            enqueued_at: r.get(4)?,
            attempts: r.get(5)?,
            next_at: r.get(6)?,
            device_id: r.get(7)?,
            request_id: r.get(8)?,
            traced: false,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn delete_forwards(c: &Connection, ids: &[i64]) -> Result<(), StoreError> {
    let mut delete = c.prepare_cached("DELETE FROM forward_queue WHERE id = ?1")?;
    for id in ids {
        delete.execute([id])?;
    }
    Ok(())
}

/// Numbers queued messages: ids only ever grow while the store is open, even when the newest
/// rows have been removed (SQLite would hand out the highest id again), so a forwarding worker
/// can read on from the last id it has seen and never miss a message.
#[derive(Debug, Clone)]
pub(crate) struct ForwardIds(Arc<AtomicI64>);

impl ForwardIds {
    pub(crate) fn after_newest(c: &Connection) -> Result<ForwardIds, StoreError> {
        let newest: i64 =
            c.query_row("SELECT COALESCE(MAX(id), 0) FROM forward_queue", [], |r| {
                r.get(0)
            })?;
        Ok(ForwardIds(Arc::new(AtomicI64::new(newest))))
    }

    fn next(&self) -> i64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Appends messages to their actions' queues (inside the caller's transaction).
pub(crate) fn insert_forwards(
    c: &Connection,
    ids: &ForwardIds,
    items: &[NewForward],
    now: i64,
) -> Result<(), StoreError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO forward_queue (id, action_id, message_id, payload, bytes, enqueued_at, next_at, device_id, request_id) \
         VALUES (?8, ?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
    )?;
    for item in items {
        let bytes = item.payload.len() as i64;
        insert.execute(params![
            item.action_id,
            item.message_id,
            item.payload,
            bytes,
            now,
            item.device_id,
            item.request_id,
            ids.next()
        ])?;
    }
    Ok(())
}

const RULE_COLUMNS: &str = "seq, rule_id, project_id, rule_name, description, resource, event, app_type, app_id, select_sql, where_sql, active, created_at";

fn rule_row(r: &Row<'_>) -> rusqlite::Result<RoutingRule> {
    Ok(RoutingRule {
        seq: r.get(0)?,
        rule_id: r.get(1)?,
        project_id: r.get(2)?,
        rule_name: r.get(3)?,
        description: r.get(4)?,
        resource: r.get(5)?,
        event: r.get(6)?,
        app_type: r.get(7)?,
        app_id: r.get(8)?,
        select: r.get(9)?,
        condition: r.get(10)?,
        active: r.get(11)?,
        created_at: r.get(12)?,
    })
}

const ACTION_COLUMNS: &str =
    "seq, action_id, project_id, rule_id, channel, channel_detail, created_at";

fn action_row(r: &Row<'_>) -> rusqlite::Result<RoutingAction> {
    let detail: String = r.get(5)?;
    Ok(RoutingAction {
        seq: r.get(0)?,
        action_id: r.get(1)?,
        project_id: r.get(2)?,
        rule_id: r.get(3)?,
        channel: r.get(4)?,
        channel_detail: serde_json::from_str(&detail).unwrap_or(Value::Null),
        created_at: r.get(6)?,
    })
}

fn all<T>(
    c: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
    map: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(args, map)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn save_rule(c: &Connection, r: &RoutingRule) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO routing_rules (rule_id, project_id, rule_name, description, resource, event, app_type, app_id, select_sql, \
         where_sql, active, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
         ON CONFLICT (rule_id) DO UPDATE SET rule_name = ?3, description = ?4, select_sql = ?9, where_sql = ?10, active = ?11",
        params![r.rule_id, r.project_id, r.rule_name, r.description, r.resource, r.event, r.app_type, r.app_id, r.select, r.condition, r.active, r.created_at],
    )?;
    Ok(())
}

impl Store {
    /// Creates or replaces a rule.
    pub async fn save_rule(&self, rule: RoutingRule) -> Result<RoutingRule, StoreError> {
        self.write(move |c| {
            save_rule(c, &rule)?;
            let sql = format!("SELECT {RULE_COLUMNS} FROM routing_rules WHERE rule_id = ?1");
            c.query_row(&sql, [&rule.rule_id], rule_row)
                .map_err(StoreError::from)
        })
        .await
    }

    /// Deletes a rule and its actions (and their queues).
    pub async fn delete_rule(&self, rule_id: String) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute("DELETE FROM forward_queue WHERE action_id IN (SELECT action_id FROM routing_actions WHERE rule_id = ?1)", [&rule_id])?;
            c.execute("DELETE FROM forward_cursors WHERE action_id IN (SELECT action_id FROM routing_actions WHERE rule_id = ?1)", [&rule_id])?;
            c.execute("DELETE FROM routing_actions WHERE rule_id = ?1", [&rule_id])?;
            let changed = c.execute("DELETE FROM routing_rules WHERE rule_id = ?1", [&rule_id])?;
            if changed == 0 { Err(StoreError::NotFound) } else { Ok(()) }
        })
        .await
    }

    /// Every rule, oldest first.
    pub async fn rules(&self) -> Result<Vec<RoutingRule>, StoreError> {
        self.read(|c| {
            all(
                c,
                &format!("SELECT {RULE_COLUMNS} FROM routing_rules ORDER BY seq"),
                [],
                rule_row,
            )
        })
        .await
    }

    /// Creates or replaces an action.
    pub async fn save_action(&self, action: RoutingAction) -> Result<RoutingAction, StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO routing_actions (action_id, project_id, rule_id, channel, channel_detail, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (action_id) DO UPDATE SET channel = ?4, channel_detail = ?5",
                params![action.action_id, action.project_id, action.rule_id, action.channel, action.channel_detail.to_string(), action.created_at],
            )?;
            let sql = format!("SELECT {ACTION_COLUMNS} FROM routing_actions WHERE action_id = ?1");
            c.query_row(&sql, [&action.action_id], action_row).map_err(StoreError::from)
        })
        .await
    }

    /// Deletes an action and its queue.
    pub async fn delete_action(&self, action_id: String) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "DELETE FROM forward_queue WHERE action_id = ?1",
                [&action_id],
            )?;
            c.execute(
                "DELETE FROM forward_cursors WHERE action_id = ?1",
                [&action_id],
            )?;
            let changed = c.execute(
                "DELETE FROM routing_actions WHERE action_id = ?1",
                [&action_id],
            )?;
            if changed == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    /// Every action, oldest first.
    pub async fn actions(&self) -> Result<Vec<RoutingAction>, StoreError> {
        self.read(|c| {
            all(
                c,
                &format!("SELECT {ACTION_COLUMNS} FROM routing_actions ORDER BY seq"),
                [],
                action_row,
            )
        })
        .await
    }

    /// Queues messages for actions, with the trace entries that say so, in one transaction.
    pub async fn enqueue_forward(
        &self,
        items: Vec<NewForward>,
        trace: Vec<crate::TraceEntry>,
        now: i64,
    ) -> Result<(), StoreError> {
        let ids = self.forward_ids().clone();
        self.write_traced(move |c| insert_forwards(c, &ids, &items, now), trace)
            .await
    }

    /// The oldest `limit` messages of an action's queue numbered after `after`, oldest first.
    pub async fn queue_after(
        &self,
        action_id: String,
        after: i64,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        self.read(move |c| queue_rows(c, &action_id, after, limit))
            .await
    }

    /// `queue_after` on the calling thread, on a connection of the forwarding workers' own: for a
    /// worker reading on from the last message it saw (a few rows, found by the index), which
    /// costs less than the hop to a blocking thread and its wait behind other reads.
    pub fn queue_after_now(
        &self,
        action_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<QueuedMessage>, StoreError> {
        self.read_queue_now(|c| queue_rows(c, action_id, after, limit))
    }

    /// Queues the removal of forwarded messages (and their trace entries) without waiting for its
    /// commit; the receiver says when it is durable.
    pub async fn submit_dequeue(
        &self,
        ids: Vec<i64>,
        trace: Vec<crate::TraceEntry>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        self.submit_repeatable(move |c| delete_forwards(c, &ids), trace)
            .await
    }

    /// Records a failed attempt and when to try again.
    pub async fn retry_forward(
        &self,
        id: i64,
        next_at: i64,
        error: String,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute("UPDATE forward_queue SET attempts = attempts + 1, next_at = ?2, last_error = ?3 WHERE id = ?1", params![id, next_at, error])?;
            Ok(())
        })
        .await
    }

    /// How many messages and bytes an action's queue holds.
    pub async fn queue_depth(&self, action_id: String) -> Result<QueueDepth, StoreError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM forward_queue WHERE action_id = ?1",
                [action_id],
                |r| {
                    Ok(QueueDepth {
                        messages: r.get(0)?,
                        bytes: r.get(1)?,
                    })
                },
            )?)
        })
        .await
    }

    /// Drops an action's messages older than `cutoff`, returning how many.
    pub async fn drop_aged(&self, action_id: String, cutoff: i64) -> Result<usize, StoreError> {
        self.write(move |c| {
            Ok(c.execute(
                "DELETE FROM forward_queue WHERE action_id = ?1 AND enqueued_at < ?2",
                params![action_id, cutoff],
            )?)
        })
        .await
    }

    /// Drops an action's oldest messages until it holds at most `max_bytes`, returning how many.
    /// One pass: a running total from the newest message marks everything beyond the limit.
    pub async fn drop_oversize(
        &self,
        action_id: String,
        max_bytes: i64,
    ) -> Result<usize, StoreError> {
        self.write(move |c| {
            let total: i64 = c.query_row("SELECT COALESCE(SUM(bytes), 0) FROM forward_queue WHERE action_id = ?1", [&action_id], |r| r.get(0))?;
            if total <= max_bytes {
                return Ok(0);
            }
            Ok(c.execute(
                "DELETE FROM forward_queue WHERE id IN (SELECT id FROM (SELECT id, SUM(bytes) OVER (ORDER BY id DESC) AS newer \
                 FROM forward_queue WHERE action_id = ?1) WHERE newer > ?2)",
                params![action_id, max_bytes],
            )?)
        })
        .await
    }
}
