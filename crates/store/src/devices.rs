//! Devices: registration, updates, secrets, freezing and connection status.

use ioda_types::{Device, DeviceAuth, DeviceStatus};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{Store, StoreError, conflict};

pub(crate) const COLUMNS: &str = "seq, project_id, app_id, device_id, node_id, product_id, gateway_id, device_name, description, \
    auth_type, secret, secondary_secret, fingerprint, secondary_fingerprint, secure_access, auth_timeout, \
    extension_info, status, frozen, fw_version, sw_version, sdk_version, created_at, first_online_at, \
    last_online_at, last_offline_at, status_updated_at";

pub(crate) fn from_row(r: &Row<'_>) -> rusqlite::Result<Device> {
    let extension: Option<String> = r.get(16)?;
    let status: String = r.get(17)?;
    Ok(Device {
        seq: r.get(0)?,
        project_id: r.get(1)?,
        app_id: r.get(2)?,
        device_id: r.get(3)?,
        node_id: r.get(4)?,
        product_id: r.get(5)?,
        gateway_id: r.get(6)?,
        device_name: r.get(7)?,
        description: r.get(8)?,
        auth: DeviceAuth {
            auth_type: r.get(9)?,
            secret: r.get(10)?,
            secondary_secret: r.get(11)?,
            fingerprint: r.get(12)?,
            secondary_fingerprint: r.get(13)?,
            secure_access: r.get(14)?,
            timeout: r.get(15)?,
        },
        extension_info: extension.and_then(|e| serde_json::from_str(&e).ok()),
        status: DeviceStatus::parse(&status).unwrap_or(DeviceStatus::Offline),
        frozen: r.get(18)?,
        fw_version: r.get(19)?,
        sw_version: r.get(20)?,
        sdk_version: r.get(21)?,
        created_at: r.get(22)?,
        first_online_at: r.get(23)?,
        last_online_at: r.get(24)?,
        last_offline_at: r.get(25)?,
        status_updated_at: r.get(26)?,
    })
}

fn load(c: &Connection, device_id: &str) -> Result<Option<Device>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE device_id = ?1");
    Ok(c.prepare_cached(&sql)?
        .query_row([device_id], from_row)
        .optional()?)
}

fn by_node(c: &Connection, node_id: &str) -> Result<Vec<Device>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE node_id = ?1 LIMIT 2");
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt.query_map([node_id], from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Desired shadow values per service, as given at registration.
pub type InitialDesired = Vec<(String, serde_json::Map<String, serde_json::Value>)>;

/// Filters of a device listing (all optional, combined with AND).
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub project_id: String,
    pub product_id: Option<String>,
    pub gateway_id: Option<String>,
    pub node_id: Option<String>,
    pub device_name: Option<String>,
    pub app_id: Option<String>,
    /// Creation time window, Unix milliseconds, inclusive.
    pub created_from: Option<i64>,
    pub created_to: Option<i64>,
}

/// One page of a device listing.
#[derive(Debug, Clone)]
pub struct DevicePage {
    pub items: Vec<Device>,
    pub count: i64,
}

/// The children `?1` is gateway for (through the partial index `devices_by_gateway`).
pub(crate) const CHILDREN_OF: &str =
    "SELECT device_id FROM devices WHERE gateway_id = ?1 AND gateway_id != device_id";

/// Versions a device reports of itself; `None` leaves the stored one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceVersions {
    pub fw: Option<String>,
    pub sw: Option<String>,
    pub sdk: Option<String>,
}

/// The fields an update may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct DeviceUpdate {
    pub device_name: Option<String>,
    pub description: Option<String>,
    pub extension_info: Option<serde_json::Value>,
    pub secure_access: Option<bool>,
    pub timeout: Option<i64>,
}

/// A connection status transition to persist.
#[derive(Debug, Clone, Copy)]
pub struct StatusChange<'a> {
    pub device_id: &'a str,
    pub status: DeviceStatus,
    pub at: i64,
}

fn apply_status(c: &Connection, change: StatusChange<'_>) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE devices SET status = ?2, status_updated_at = ?3, \
         first_online_at = CASE WHEN ?2 = 'ONLINE' THEN COALESCE(first_online_at, ?3) ELSE first_online_at END, \
         last_online_at = CASE WHEN ?2 = 'ONLINE' THEN ?3 ELSE last_online_at END, \
         last_offline_at = CASE WHEN ?2 = 'OFFLINE' THEN ?3 ELSE last_offline_at END \
         WHERE device_id = ?1",
    )?
    .execute(params![change.device_id, change.status.as_str(), change.at])?;
    Ok(())
}

impl Store {
    /// Registers a device, with the initial desired shadow its creator gave.
    pub async fn insert_device(
        &self,
        device: Device,
        desired: InitialDesired,
    ) -> Result<Device, StoreError> {
        self.write(move |c| {
            let extension = device.extension_info.as_ref().map(serde_json::to_string).transpose()?;
            c.execute(
                "INSERT INTO devices (project_id, app_id, device_id, node_id, product_id, gateway_id, device_name, \
                 description, auth_type, secret, secondary_secret, fingerprint, secondary_fingerprint, secure_access, \
                 auth_timeout, extension_info, status, frozen, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, 0, ?18)",
                params![
                    device.project_id, device.app_id, device.device_id, device.node_id, device.product_id,
                    device.gateway_id, device.device_name, device.description, device.auth.auth_type,
                    device.auth.secret, device.auth.secondary_secret, device.auth.fingerprint,
                    device.auth.secondary_fingerprint, device.auth.secure_access, device.auth.timeout, extension,
                    device.status.as_str(), device.created_at
                ],
            )
            .map_err(|e| conflict(e, "device_id or node_id"))?;
            let seq = c.last_insert_rowid();
            // A child registered again under the gateway it was deleted from: no longer a
            // deletion to tell that gateway of (a lookup by key; direct devices skip it).
            if device.gateway_id != device.device_id {
                c.prepare_cached(
                    "DELETE FROM child_deletions WHERE gateway_id = ?1 AND device_id = ?2",
                )?
                .execute([&device.gateway_id, &device.device_id])?;
            }
            for (service_id, properties) in desired {
                c.execute(
                    "INSERT INTO shadows (device_id, service_id, desired, desired_at, version) VALUES (?1, ?2, ?3, ?4, 1)",
                    params![device.device_id, service_id, serde_json::to_string(&properties)?, device.created_at],
                )?;
            }
            Ok(Device { seq, ..device })
        })
        .await
    }

    /// One device.
    pub async fn device(&self, device_id: String) -> Result<Option<Device>, StoreError> {
        self.read(move |c| load(c, &device_id)).await
    }

    /// The devices of these ids that exist, in one read (a catch-up of forwarding names up to a
    /// thousand reports' devices at a time; a read each was a hop each between threads).
    pub async fn devices(&self, device_ids: Vec<String>) -> Result<Vec<Device>, StoreError> {
        self.read(move |c| {
            let mut found = Vec::with_capacity(device_ids.len());
            for device_id in &device_ids {
                found.extend(load(c, device_id)?);
            }
            Ok(found)
        })
        .await
    }

    /// Every device with this node id (an NB-IoT device names itself by node id alone); at most
    /// two, which is enough to tell "exactly one" apart.
    pub async fn devices_by_node(&self, node_id: String) -> Result<Vec<Device>, StoreError> {
        self.read(move |c| by_node(c, &node_id)).await
    }

    /// The same, without awaiting: for the DTLS handshake's synchronous key callback.
    pub fn devices_by_node_now(&self, node_id: &str) -> Result<Vec<Device>, StoreError> {
        self.read_now(|c| by_node(c, node_id))
    }

    /// Devices matching `filter`, newest first, with `seq < before`.
    pub async fn list_devices(
        &self,
        filter: DeviceFilter,
        before: i64,
        offset: i64,
        limit: i64,
    ) -> Result<DevicePage, StoreError> {
        self.read(move |c| {
            let clause = "project_id = ?1 AND (?2 IS NULL OR product_id = ?2) AND (?3 IS NULL OR gateway_id = ?3) \
                AND (?4 IS NULL OR node_id = ?4) AND (?5 IS NULL OR device_name = ?5) AND (?6 IS NULL OR app_id = ?6) \
                AND (?7 IS NULL OR created_at >= ?7) AND (?8 IS NULL OR created_at <= ?8)";
            let f = &filter;
            let args = params![f.project_id, f.product_id, f.gateway_id, f.node_id, f.device_name, f.app_id, f.created_from, f.created_to];
            let count: i64 = c.query_row(&format!("SELECT COUNT(*) FROM devices WHERE {clause}"), args, |r| r.get(0))?;
            let sql = format!("SELECT {COLUMNS} FROM devices WHERE {clause} AND seq < ?9 ORDER BY seq DESC LIMIT ?10 OFFSET ?11");
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(
                params![f.project_id, f.product_id, f.gateway_id, f.node_id, f.device_name, f.app_id, f.created_from, f.created_to, before, limit, offset],
                from_row,
            )?;
            Ok(DevicePage { items: rows.collect::<Result<Vec<_>, _>>()?, count })
        })
        .await
    }

    /// Applies an update and returns the device as it now is.
    pub async fn update_device(
        &self,
        device_id: String,
        update: DeviceUpdate,
    ) -> Result<Device, StoreError> {
        self.write(move |c| {
            let extension = update.extension_info.as_ref().map(serde_json::to_string).transpose()?;
            let changed = c.execute(
                "UPDATE devices SET device_name = COALESCE(?2, device_name), description = COALESCE(?3, description), \
                 extension_info = COALESCE(?4, extension_info), secure_access = COALESCE(?5, secure_access), \
                 auth_timeout = COALESCE(?6, auth_timeout) WHERE device_id = ?1",
                params![device_id, update.device_name, update.description, extension, update.secure_access, update.timeout],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            load(c, &device_id)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    /// Deletes a device with its shadow, history and trace.
    pub async fn delete_device(&self, device_id: String) -> Result<Device, StoreError> {
        let forgotten = device_id.clone();
        let device = self
            .write(move |c| {
                let device = load(c, &device_id)?.ok_or(StoreError::NotFound)?;
                // The reports are found from the shadow (there is no index by device), so first.
                c.execute(
                    "WITH RECURSIVE chain(id) AS ( \
                       SELECT last_history_id FROM shadows WHERE device_id = ?1 AND last_history_id IS NOT NULL \
                       UNION ALL \
                       SELECT h.prev_id FROM chain JOIN property_history h ON h.id = chain.id WHERE h.prev_id IS NOT NULL) \
                     DELETE FROM property_history WHERE id IN (SELECT id FROM chain)",
                    [&device_id],
                )?;
                for table in [
                    "devices",
                    "shadows",
                    "message_history",
                    "async_commands",
                    "device_messages",
                    "device_tracing",
                ] {
                    c.execute(
                        &format!("DELETE FROM {table} WHERE device_id = ?1"),
                        [&device_id],
                    )?;
                }
                Ok(device)
            })
            .await?;
        // After the commit, so entries of jobs committed with the deletion are forgotten too.
        crate::trace::lock(self.pending_trace()).forget_device(&forgotten);
        Ok(device)
    }

    /// Records the versions a device reported (`$sdk_info`, `$ota` version reports); a version
    /// it did not report stays as it was. `Ok(false)`: no such device.
    pub async fn set_versions(
        &self,
        device_id: String,
        versions: DeviceVersions,
    ) -> Result<bool, StoreError> {
        self.write(move |c| {
            let changed = c.execute(
                "UPDATE devices SET fw_version = COALESCE(?2, fw_version), \
                 sw_version = COALESCE(?3, sw_version), sdk_version = COALESCE(?4, sdk_version) \
                 WHERE device_id = ?1",
                params![device_id, versions.fw, versions.sw, versions.sdk],
            )?;
            Ok(changed > 0)
        })
        .await
    }

    /// Replaces the primary or secondary secret.
    pub async fn set_secret(
        &self,
        device_id: String,
        secret: String,
        secondary: bool,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            let column = if secondary {
                "secondary_secret"
            } else {
                "secret"
            };
            let changed = c.execute(
                &format!("UPDATE devices SET {column} = ?2 WHERE device_id = ?1"),
                [&device_id, &secret],
            )?;
            if changed == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    /// Freezes or unfreezes a device; a frozen device also goes offline.
    pub async fn set_frozen(
        &self,
        device_id: String,
        frozen: bool,
        at: i64,
    ) -> Result<Device, StoreError> {
        self.write(move |c| {
            let changed = c.execute(
                "UPDATE devices SET frozen = ?2 WHERE device_id = ?1",
                params![device_id, frozen],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            let device = load(c, &device_id)?.ok_or(StoreError::NotFound)?;
            if frozen && device.status == DeviceStatus::Online {
                apply_status(
                    c,
                    StatusChange {
                        device_id: &device_id,
                        status: DeviceStatus::Offline,
                        at,
                    },
                )?;
            }
            load(c, &device_id)?.ok_or(StoreError::NotFound)
        })
        .await
    }

    /// Records a connection status change; resolves once durable.
    pub async fn set_status(
        &self,
        device_id: String,
        status: DeviceStatus,
        at: i64,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            apply_status(
                c,
                StatusChange {
                    device_id: &device_id,
                    status,
                    at,
                },
            )?;
            // A connection decides the status from now on, not the data timers of an earlier
            // short-connection (HTTPS, LwM2M) spell: no ABNORMAL for a connected device.
            c.prepare_cached(
                "UPDATE devices SET data_seen_at = NULL WHERE device_id = ?1 AND data_seen_at IS NOT NULL",
            )?
            .execute([&device_id])?;
            Ok(())
        })
        .await
    }

    /// A short-connection (NB-IoT) device sent data at `at`: its status follows its data from now
    /// on, and an ABNORMAL or OFFLINE one is ONLINE again. Returns the status it had.
    pub async fn data_seen(
        &self,
        device_id: String,
        at: i64,
    ) -> Result<Option<DeviceStatus>, StoreError> {
        self.write(move |c| {
            let status: Option<String> = c
                .query_row(
                    "SELECT status FROM devices WHERE device_id = ?1",
                    [&device_id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(status) = status.and_then(|s| DeviceStatus::parse(&s)) else {
                return Ok(None);
            };
            c.execute(
                "UPDATE devices SET data_seen_at = ?2 WHERE device_id = ?1",
                params![device_id, at],
            )?;
            if matches!(
                status,
                DeviceStatus::Abnormal | DeviceStatus::Offline | DeviceStatus::Inactive
            ) {
                apply_status(
                    c,
                    StatusChange {
                        device_id: &device_id,
                        status: DeviceStatus::Online,
                        at,
                    },
                )?;
            }
            Ok(Some(status))
        })
        .await
    }

    /// Sets a silent device's status, unless data arrived after `before` meanwhile; `true` if set.
    pub async fn set_silent_status(
        &self,
        device_id: String,
        status: DeviceStatus,
        before: i64,
        at: i64,
    ) -> Result<bool, StoreError> {
        self.write(move |c| {
            let silent: bool = c
                .query_row(
                    "SELECT COALESCE(data_seen_at <= ?2, 0) FROM devices WHERE device_id = ?1",
                    params![device_id, before],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(false);
            if silent {
                apply_status(
                    c,
                    StatusChange {
                        device_id: &device_id,
                        status,
                        at,
                    },
                )?;
            }
            Ok(silent)
        })
        .await
    }

    /// Short-connection devices in one of `statuses` whose last data is at or before `before`.
    pub async fn silent_devices(
        &self,
        before: i64,
        statuses: &'static [DeviceStatus],
        limit: i64,
    ) -> Result<Vec<Device>, StoreError> {
        self.read(move |c| {
            let wanted: Vec<String> = statuses.iter().map(|s| format!("'{}'", s.as_str())).collect();
            let sql = format!(
                "SELECT {COLUMNS} FROM devices WHERE data_seen_at IS NOT NULL AND data_seen_at <= ?1 \
                 AND status IN ({}) LIMIT ?2",
                wanted.join(", ")
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![before, limit], from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Devices registered with an activation timeout that never connected within it.
    pub async fn lapsed_registrations(
        &self,
        now: i64,
        limit: i64,
    ) -> Result<Vec<Device>, StoreError> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {COLUMNS} FROM devices WHERE first_online_at IS NULL AND auth_timeout > 0 \
                 AND created_at + auth_timeout * 1000 <= ?1 LIMIT ?2"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![now, limit], from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// After an unclean stop, devices recorded ONLINE have no connection any more: mark them OFFLINE.
    pub async fn reset_online(&self, at: i64) -> Result<Vec<String>, StoreError> {
        self.write(move |c| {
            // A child's status is its gateway's to say (IoTDA's rule), across a restart too.
            let mut stmt = c.prepare(
                "SELECT device_id FROM devices WHERE status = 'ONLINE' AND gateway_id = device_id",
            )?;
            let ids = stmt
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            for id in &ids {
                apply_status(
                    c,
                    StatusChange {
                        device_id: id,
                        status: DeviceStatus::Offline,
                        at,
                    },
                )?;
            }
            Ok(ids)
        })
        .await
    }
}
