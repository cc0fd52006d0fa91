//! POSTGRESQL_FORWARDING: insert selected fields of each message into a table, one row per message,
//! columns mapped from JSON keys of the rule's `select` output.

use std::time::Duration;

use serde_json::Value;

/// Where to insert and how to map fields to columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSpec {
    pub url: String,
    pub table: String,
    /// `(column, json key)` pairs.
    pub columns: Vec<(String, String)>,
}

fn identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Reads `channel_detail.postgresql_forwarding`: `{url, table, column_mappings: [{column_name, json_key}]}`.
pub fn spec(detail: &Value) -> Result<PgSpec, String> {
    let d = detail
        .get("postgresql_forwarding")
        .ok_or("channel_detail.postgresql_forwarding is required")?;
    let url = d
        .get("url")
        .and_then(Value::as_str)
        .filter(|u| {
            u.starts_with("postgres://") || u.starts_with("postgresql://") || u.contains("host=")
        })
        .ok_or("postgresql_forwarding.url must be a postgres:// URL")?;
    let table = d
        .get("table_name")
        .or_else(|| d.get("table"))
        .and_then(Value::as_str)
        .filter(|t| t.split('.').all(identifier))
        .ok_or("postgresql_forwarding.table_name must be an identifier (letters, digits, _)")?;
    let mappings = d
        .get("column_mappings")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or(
            "postgresql_forwarding.column_mappings must list at least one {column_name, json_key}",
        )?;
    let mut columns = Vec::new();
    for m in mappings {
        let column = m
            .get("column_name")
            .and_then(Value::as_str)
            .filter(|c| identifier(c))
            .ok_or("column_name must be an identifier")?;
        let key = m
            .get("json_key")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty())
            .ok_or("json_key must not be empty")?;
        columns.push((column.to_owned(), key.to_owned()));
    }
    Ok(PgSpec {
        url: url.to_owned(),
        table: table.to_owned(),
        columns,
    })
}

/// A live connection with the insert prepared.
pub struct PgSink {
    client: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    /// `(column, json key)` pairs.
    columns: Vec<(String, String)>,
    connection: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PgSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSink")
            .field("columns", &self.columns)
            .finish()
    }
}

impl Drop for PgSink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PgSink {
    pub async fn open(spec: &PgSpec, timeout: Duration) -> Result<PgSink, String> {
        let work = async {
            let (client, connection) = tokio_postgres::connect(&spec.url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("PostgreSQL: {e}"))?;
            let connection = tokio::spawn(async move {
                let _ = connection.await;
            });
            let columns: Vec<&str> = spec.columns.iter().map(|(c, _)| c.as_str()).collect();
            // json_populate_record gives every value its column's type, whatever the table declares.
            let list = columns.join(", ");
            let sql = format!(
                "INSERT INTO {table} ({list}) SELECT {list} FROM json_populate_record(NULL::{table}, $1::text::json)",
                table = spec.table
            );
            let insert = client
                .prepare_typed(&sql, &[tokio_postgres::types::Type::TEXT])
                .await
                .map_err(|e| format!("PostgreSQL: {e}"))?;
            Ok::<_, String>(PgSink {
                client,
                insert,
                columns: spec.columns.clone(),
                connection,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| "PostgreSQL did not answer in time".to_owned())?
    }

    pub async fn insert(&mut self, payload: &str, timeout: Duration) -> Result<(), String> {
        let message: Value =
            serde_json::from_str(payload).map_err(|e| format!("message is not JSON: {e}"))?;
        let row: serde_json::Map<String, Value> = self
            .columns
            .iter()
            .map(|(column, key)| {
                (
                    column.clone(),
                    message.get(key).cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        let row = Value::Object(row).to_string();
        tokio::time::timeout(timeout, self.client.execute(&self.insert, &[&row]))
            .await
            .map_err(|_| "PostgreSQL did not answer in time".to_owned())?
            .map_err(|e| format!("PostgreSQL: {e}"))?;
        Ok(())
    }
}
