//! Schema migrations, applied in order and tracked with `PRAGMA user_version`.

use rusqlite::Connection;

use crate::StoreError;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE projects (
    project_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE access_keys (
    access_key TEXT PRIMARY KEY,
    secret_key TEXT NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects(project_id),
    created_at INTEGER NOT NULL
);
CREATE TABLE apps (
    app_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(project_id),
    app_name TEXT NOT NULL,
    is_default INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE products (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id TEXT NOT NULL,
    product_id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX products_by_project ON products(project_id, seq);
CREATE TABLE devices (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    device_id TEXT NOT NULL UNIQUE,
    node_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    device_name TEXT,
    description TEXT,
    auth_type TEXT NOT NULL,
    secret TEXT,
    secondary_secret TEXT,
    fingerprint TEXT,
    secondary_fingerprint TEXT,
    secure_access INTEGER NOT NULL,
    auth_timeout INTEGER NOT NULL,
    extension_info TEXT,
    status TEXT NOT NULL,
    frozen INTEGER NOT NULL DEFAULT 0,
    fw_version TEXT,
    sw_version TEXT,
    sdk_version TEXT,
    created_at INTEGER NOT NULL,
    first_online_at INTEGER,
    last_online_at INTEGER,
    last_offline_at INTEGER,
    status_updated_at INTEGER,
    UNIQUE (project_id, product_id, node_id)
);
CREATE INDEX devices_by_project ON devices(project_id, seq);
CREATE INDEX devices_by_product ON devices(product_id, seq);
CREATE TABLE shadows (
    device_id TEXT NOT NULL,
    service_id TEXT NOT NULL,
    desired TEXT,
    desired_at INTEGER,
    reported TEXT,
    reported_at INTEGER,
    version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, service_id)
) WITHOUT ROWID;
CREATE TABLE property_history (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    service_id TEXT NOT NULL,
    properties TEXT NOT NULL,
    event_time INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX property_history_by_device ON property_history(device_id, id);
CREATE TABLE message_history (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX message_history_by_device ON message_history(device_id, id);
CREATE TABLE device_trace (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX device_trace_by_device ON device_trace(device_id, id);
"#,
    r#"
CREATE TABLE async_commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL UNIQUE,
    project_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    service_id TEXT,
    command_name TEXT,
    paras TEXT NOT NULL,
    expire_time INTEGER NOT NULL,
    send_strategy TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    created_at INTEGER NOT NULL,
    sent_at INTEGER,
    delivered_at INTEGER,
    response_at INTEGER,
    sends INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER
);
CREATE INDEX async_commands_by_device ON async_commands(device_id, seq);
CREATE INDEX async_commands_due ON async_commands(next_at) WHERE next_at IS NOT NULL;
CREATE TABLE device_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    name TEXT,
    message TEXT NOT NULL,
    encoding TEXT,
    payload_format TEXT NOT NULL,
    topic TEXT,
    properties TEXT,
    ttl_minutes INTEGER NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    error_msg TEXT,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    UNIQUE (device_id, message_id)
);
CREATE INDEX device_messages_pending ON device_messages(device_id, seq) WHERE status = 'PENDING';
"#,
    r#"
CREATE TABLE routing_rules (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rule_id TEXT NOT NULL UNIQUE,
    project_id TEXT NOT NULL,
    rule_name TEXT,
    description TEXT,
    resource TEXT NOT NULL,
    event TEXT NOT NULL,
    app_type TEXT NOT NULL,
    app_id TEXT,
    select_sql TEXT,
    where_sql TEXT,
    active INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE routing_actions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    action_id TEXT NOT NULL UNIQUE,
    project_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    channel_detail TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE forward_queue (
    id INTEGER PRIMARY KEY,
    action_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    enqueued_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    last_error TEXT
);
CREATE INDEX forward_queue_by_action ON forward_queue(action_id, id);
"#,
    r#"
ALTER TABLE forward_queue ADD COLUMN device_id TEXT;
ALTER TABLE forward_queue ADD COLUMN request_id TEXT;
"#,
    r#"
ALTER TABLE async_commands ADD COLUMN callback_url TEXT;
"#,
    r#"
CREATE INDEX devices_by_node ON devices(node_id);
ALTER TABLE devices ADD COLUMN data_seen_at INTEGER;
CREATE INDEX devices_by_data_seen ON devices(data_seen_at) WHERE data_seen_at IS NOT NULL;
"#,
    r#"
CREATE TABLE forward_cursors (
    action_id TEXT PRIMARY KEY,
    after_id INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // A device's reports are found by walking back from its shadow, not through an index on
    // (device_id, id): that index dirtied a page per device per commit (BENCHMARKS.md).
    r#"
ALTER TABLE property_history ADD COLUMN prev_id INTEGER;
ALTER TABLE shadows ADD COLUMN last_history_id INTEGER;
WITH chained AS (
    SELECT id, LAG(id) OVER (PARTITION BY device_id, service_id ORDER BY id) AS prev FROM property_history
)
UPDATE property_history SET prev_id = chained.prev FROM chained
WHERE chained.id = property_history.id AND chained.prev IS NOT NULL;
UPDATE shadows SET last_history_id = (
    SELECT MAX(h.id) FROM property_history h
    WHERE h.device_id = shadows.device_id AND h.service_id = shadows.service_id
);
DROP INDEX property_history_by_device;
"#,
    // Shadow rows are written every 100 ms, not in every commit: every history row up to
    // `applied_through` is in its shadow (`shadow_defer.rs`).
    r#"
CREATE TABLE shadow_mark (applied_through INTEGER NOT NULL);
INSERT INTO shadow_mark (applied_through) SELECT COALESCE(MAX(id), 0) FROM property_history;
"#,
    // Devices whose message trace has been started: their successful traffic is traced too, until
    // the time given (`trace.rs`).
    r#"
CREATE TABLE device_tracing (
    device_id TEXT PRIMARY KEY,
    until INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // A gateway's children, for what waits for them when the gateway connects; direct devices
    // (their own gateway) stay out of it.
    r#"
CREATE INDEX devices_by_gateway ON devices(gateway_id) WHERE gateway_id != device_id;
"#,
    // Children deleted, kept a while so a gateway that asks what changed since its version
    // hears of them (`children.rs`).
    r#"
CREATE TABLE child_deletions (
    gateway_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted_at INTEGER NOT NULL,
    PRIMARY KEY (gateway_id, device_id)
) WITHOUT ROWID;
CREATE INDEX child_deletions_by_age ON child_deletions(deleted_at);
"#,
];

/// Brings the database up to the newest schema.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
