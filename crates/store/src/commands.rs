//! Asynchronous commands: every transition is a row update, so a restart resumes where it was.

use ioda_types::CommandStatus;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;

use crate::devices::CHILDREN_OF;
use crate::{Store, StoreError, conflict};

/// An asynchronous command and where it is in its life.
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncCommand {
    pub seq: i64,
    pub command_id: String,
    pub project_id: String,
    pub device_id: String,
    pub service_id: Option<String>,
    pub command_name: Option<String>,
    pub paras: Value,
    /// Seconds the command may stay cached; 0 = deliver only now.
    pub expire_time: i64,
    pub send_strategy: String,
    pub status: CommandStatus,
    pub result: Option<Value>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub response_at: Option<i64>,
    /// How many times it has been sent (the first send and resends).
    pub sends: i64,
    /// When the scheduler must look at it next (resend, timeout, expiry); `None` when final.
    pub next_at: Option<i64>,
    /// Where to POST each status change (legacy `callbackUrl`), if anywhere.
    pub callback_url: Option<String>,
}

/// Filters of a command listing.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub device_id: String,
    pub status: Option<String>,
    pub command_name: Option<String>,
    pub created_from: Option<i64>,
    pub created_to: Option<i64>,
}

const COLUMNS: &str = "seq, command_id, project_id, device_id, service_id, command_name, paras, expire_time, send_strategy, \
    status, result, created_at, sent_at, delivered_at, response_at, sends, next_at, callback_url";

fn from_row(r: &Row<'_>) -> rusqlite::Result<AsyncCommand> {
    let paras: String = r.get(6)?;
    let status: String = r.get(9)?;
    let result: Option<String> = r.get(10)?;
    Ok(AsyncCommand {
        seq: r.get(0)?,
        command_id: r.get(1)?,
        project_id: r.get(2)?,
        device_id: r.get(3)?,
        service_id: r.get(4)?,
        command_name: r.get(5)?,
        paras: serde_json::from_str(&paras).unwrap_or(Value::Null),
        expire_time: r.get(7)?,
        send_strategy: r.get(8)?,
        status: CommandStatus::parse(&status).unwrap_or(CommandStatus::Failed),
        result: result.and_then(|r| serde_json::from_str(&r).ok()),
        created_at: r.get(11)?,
        sent_at: r.get(12)?,
        delivered_at: r.get(13)?,
        response_at: r.get(14)?,
        sends: r.get(15)?,
        next_at: r.get(16)?,
        callback_url: r.get(17)?,
    })
}

fn load(c: &Connection, command_id: &str) -> Result<Option<AsyncCommand>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM async_commands WHERE command_id = ?1");
    Ok(c.prepare_cached(&sql)?
        .query_row([command_id], from_row)
        .optional()?)
}

fn query(
    c: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<AsyncCommand>, StoreError> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(args, from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

impl Store {
    /// Stores a new command.
    pub async fn insert_command(&self, command: AsyncCommand) -> Result<AsyncCommand, StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO async_commands (command_id, project_id, device_id, service_id, command_name, paras, \
                 expire_time, send_strategy, status, result, created_at, sent_at, delivered_at, response_at, sends, next_at, \
                 callback_url) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                params![
                    command.command_id, command.project_id, command.device_id, command.service_id, command.command_name,
                    command.paras.to_string(), command.expire_time, command.send_strategy, command.status.as_str(),
                    command.result.as_ref().map(Value::to_string), command.created_at, command.sent_at,
                    command.delivered_at, command.response_at, command.sends, command.next_at, command.callback_url
                ],
            )
            .map_err(|e| conflict(e, "command_id"))?;
            Ok(AsyncCommand { seq: c.last_insert_rowid(), ..command })
        })
        .await
    }

    /// Applies a transition, but only if the command is still in `expected` status: concurrent
    /// actors (a response, the scheduler, a reconnect) cannot overwrite each other. Returns whether
    /// the transition took place.
    pub async fn transition_command(
        &self,
        expected: CommandStatus,
        next: AsyncCommand,
    ) -> Result<bool, StoreError> {
        self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE async_commands SET status = ?3, result = ?4, sent_at = ?5, delivered_at = ?6, response_at = ?7, \
                     sends = ?8, next_at = ?9 WHERE command_id = ?1 AND status = ?2",
                )?
                .execute(params![
                    next.command_id, expected.as_str(), next.status.as_str(), next.result.as_ref().map(Value::to_string),
                    next.sent_at, next.delivered_at, next.response_at, next.sends, next.next_at
                ])?;
            Ok(changed == 1)
        })
        .await
    }

    /// One command.
    pub async fn command(&self, command_id: String) -> Result<Option<AsyncCommand>, StoreError> {
        self.read(move |c| load(c, &command_id)).await
    }

    /// A device's commands, newest first.
    pub async fn list_commands(
        &self,
        f: CommandFilter,
        before: i64,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<AsyncCommand>, i64), StoreError> {
        self.read(move |c| {
            let clause = "device_id = ?1 AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR command_name = ?3) \
                AND (?4 IS NULL OR created_at >= ?4) AND (?5 IS NULL OR created_at <= ?5)";
            let count: i64 = c.query_row(
                &format!("SELECT COUNT(*) FROM async_commands WHERE {clause}"),
                params![f.device_id, f.status, f.command_name, f.created_from, f.created_to],
                |r| r.get(0),
            )?;
            let sql = format!("SELECT {COLUMNS} FROM async_commands WHERE {clause} AND seq < ?6 ORDER BY seq DESC LIMIT ?7 OFFSET ?8");
            let items = query(c, &sql, params![f.device_id, f.status, f.command_name, f.created_from, f.created_to, before, limit, offset])?;
            Ok((items, count))
        })
        .await
    }

    /// Commands whose next scheduled step is due.
    pub async fn due_commands(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<AsyncCommand>, StoreError> {
        self.read(move |c| {
            let sql = format!("SELECT {COLUMNS} FROM async_commands WHERE next_at IS NOT NULL AND next_at <= ?1 ORDER BY next_at LIMIT ?2");
            query(c, &sql, params![now, limit])
        })
        .await
    }

    /// A device's commands that were sent and wait for its answer (SENT or DELIVERED), oldest first.
    pub async fn awaiting_commands(
        &self,
        device_id: String,
    ) -> Result<Vec<AsyncCommand>, StoreError> {
        self.read(move |c| {
            let sql = format!("SELECT {COLUMNS} FROM async_commands WHERE device_id = ?1 AND status IN ('SENT', 'DELIVERED') ORDER BY seq");
            query(c, &sql, [device_id])
        })
        .await
    }

    /// The commands that wait for delivery (PENDING) or for an acknowledgement (SENT) on a
    /// device's connection: its own, oldest first, then (for a gateway) its children's.
    pub async fn undelivered_commands_via(
        &self,
        device_id: String,
    ) -> Result<Vec<AsyncCommand>, StoreError> {
        self.read(move |c| {
            // Two statements: the device's own in index order (no sort, as every connection
            // runs it), then its children's, which for a device without any costs one probe.
            let own = format!("SELECT {COLUMNS} FROM async_commands WHERE device_id = ?1 AND status IN ('PENDING', 'SENT') ORDER BY seq");
            let children = format!("SELECT {COLUMNS} FROM async_commands WHERE device_id IN ({CHILDREN_OF}) AND status IN ('PENDING', 'SENT') ORDER BY seq");
            let mut commands = query(c, &own, [&device_id])?;
            commands.extend(query(c, &children, [&device_id])?);
            Ok(commands)
        })
        .await
    }
}
