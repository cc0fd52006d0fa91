//! Downlink messages: cached while the device is offline, delivered in order, with a status each.

use ioda_types::MessageStatus;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;

use crate::devices::CHILDREN_OF;
use crate::{Store, StoreError, conflict};

/// A message for a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMessage {
    pub seq: i64,
    pub message_id: String,
    pub project_id: String,
    pub device_id: String,
    pub name: Option<String>,
    pub message: Value,
    pub encoding: Option<String>,
    pub payload_format: String,
    /// The custom topic suffix under `$oc/devices/{id}/user/`, if not `sys/messages/down`.
    pub topic: Option<String>,
    pub properties: Option<Value>,
    pub ttl_minutes: i64,
    pub status: MessageStatus,
    pub error: Option<(String, String)>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

const COLUMNS: &str = "seq, message_id, project_id, device_id, name, message, encoding, payload_format, topic, properties, \
    ttl_minutes, status, error_code, error_msg, created_at, finished_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<DeviceMessage> {
    let message: String = r.get(5)?;
    let properties: Option<String> = r.get(9)?;
    let status: String = r.get(11)?;
    let error_code: Option<String> = r.get(12)?;
    let error_msg: Option<String> = r.get(13)?;
    Ok(DeviceMessage {
        seq: r.get(0)?,
        message_id: r.get(1)?,
        project_id: r.get(2)?,
        device_id: r.get(3)?,
        name: r.get(4)?,
        message: serde_json::from_str(&message).unwrap_or(Value::Null),
        encoding: r.get(6)?,
        payload_format: r.get(7)?,
        topic: r.get(8)?,
        properties: properties.and_then(|p| serde_json::from_str(&p).ok()),
        ttl_minutes: r.get(10)?,
        status: MessageStatus::parse(&status).unwrap_or(MessageStatus::Failed),
        error: error_code.zip(error_msg),
        created_at: r.get(14)?,
        finished_at: r.get(15)?,
    })
}

fn query(
    c: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<DeviceMessage>, StoreError> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(args, from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn set_status(
    c: &Connection,
    seq: i64,
    status: MessageStatus,
    error: Option<&(String, String)>,
    at: i64,
) -> Result<bool, StoreError> {
    let changed = c
        .prepare_cached(
            "UPDATE device_messages SET status = ?2, error_code = ?3, error_msg = ?4, finished_at = ?5 \
             WHERE seq = ?1 AND status = 'PENDING'",
        )?
        .execute(params![seq, status.as_str(), error.map(|e| &e.0), error.map(|e| &e.1), at])?;
    Ok(changed == 1)
}

impl Store {
    /// Stores a new PENDING message. When the device already has `cache_limit` pending messages, the
    /// oldest is marked FAILED with `overflow_error` in the same transaction; it is returned.
    pub async fn insert_message(
        &self,
        message: DeviceMessage,
        cache_limit: i64,
        overflow_error: (String, String),
    ) -> Result<(DeviceMessage, Option<DeviceMessage>), StoreError> {
        self.write(move |c| {
            let pending = query(
                c,
                &format!("SELECT {COLUMNS} FROM device_messages WHERE device_id = ?1 AND status = 'PENDING' ORDER BY seq"),
                [&message.device_id],
            )?;
            let evicted = if pending.len() as i64 >= cache_limit { pending.into_iter().next() } else { None };
            if let Some(oldest) = &evicted {
                set_status(c, oldest.seq, MessageStatus::Failed, Some(&overflow_error), message.created_at)?;
            }
            c.execute(
                "INSERT INTO device_messages (message_id, project_id, device_id, name, message, encoding, payload_format, topic, \
                 properties, ttl_minutes, status, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    message.message_id, message.project_id, message.device_id, message.name, message.message.to_string(),
                    message.encoding, message.payload_format, message.topic, message.properties.as_ref().map(Value::to_string),
                    message.ttl_minutes, message.status.as_str(), message.created_at
                ],
            )
            .map_err(|e| conflict(e, "message_id"))?;
            let stored = DeviceMessage { seq: c.last_insert_rowid(), ..message };
            let evicted = evicted.map(|m| DeviceMessage {
                status: MessageStatus::Failed,
                error: Some(overflow_error),
                finished_at: Some(stored.created_at),
                ..m
            });
            Ok((stored, evicted))
        })
        .await
    }

    /// Moves a PENDING message to a final status; `false` if it was no longer pending.
    pub async fn finish_message(
        &self,
        seq: i64,
        status: MessageStatus,
        error: Option<(String, String)>,
        at: i64,
    ) -> Result<bool, StoreError> {
        self.write(move |c| set_status(c, seq, status, error.as_ref(), at))
            .await
    }

    /// One message of a device.
    pub async fn message(
        &self,
        device_id: String,
        message_id: String,
    ) -> Result<Option<DeviceMessage>, StoreError> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {COLUMNS} FROM device_messages WHERE device_id = ?1 AND message_id = ?2"
            );
            Ok(c.prepare_cached(&sql)?
                .query_row([device_id, message_id], from_row)
                .optional()?)
        })
        .await
    }

    /// A device's messages, newest first.
    pub async fn list_messages(
        &self,
        device_id: String,
        limit: i64,
    ) -> Result<Vec<DeviceMessage>, StoreError> {
        self.read(move |c| query(c, &format!("SELECT {COLUMNS} FROM device_messages WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2"), params![device_id, limit]))
            .await
    }

    /// The pending messages for a device's connection: its own, oldest first, then (for a
    /// gateway) its children's.
    pub async fn pending_messages_via(
        &self,
        device_id: String,
    ) -> Result<Vec<DeviceMessage>, StoreError> {
        self.read(move |c| {
            // As for commands: the device's own without a sort, then its children's.
            let own = format!("SELECT {COLUMNS} FROM device_messages WHERE device_id = ?1 AND status = 'PENDING' ORDER BY seq");
            let children = format!("SELECT {COLUMNS} FROM device_messages WHERE device_id IN ({CHILDREN_OF}) AND status = 'PENDING' ORDER BY seq");
            let mut messages = query(c, &own, [&device_id])?;
            messages.extend(query(c, &children, [&device_id])?);
            Ok(messages)
        })
            .await
    }

    /// Pending messages cached longer than their time to live.
    pub async fn stale_messages(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<DeviceMessage>, StoreError> {
        self.read(move |c| {
            query(
                c,
                &format!("SELECT {COLUMNS} FROM device_messages WHERE status = 'PENDING' AND created_at + ttl_minutes * 60000 <= ?1 ORDER BY seq LIMIT ?2"),
                params![now, limit],
            )
        })
        .await
    }
}
