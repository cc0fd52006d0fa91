//! A gateway's children: paged in the order they were registered, and the deletions a gateway
//! is told of when it asks what changed since the version it holds.

use ioda_types::Device;
use rusqlite::params;

use crate::devices::{COLUMNS, from_row};
use crate::{Store, StoreError};

/// A child deleted, as a gateway is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildDeletion {
    pub device_id: String,
    pub node_id: String,
    /// The child-list version the deletion was announced under.
    pub version: i64,
}

impl Store {
    /// Up to `limit` children of `gateway_id` registered after record `after_seq`, oldest first
    /// (through the partial index `devices_by_gateway`).
    pub async fn children_page(
        &self,
        gateway_id: String,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<Device>, StoreError> {
        self.read(move |c| {
            let sql = format!(
                "SELECT {COLUMNS} FROM devices WHERE gateway_id = ?1 AND gateway_id != device_id \
                 AND seq > ?2 ORDER BY seq LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![gateway_id, after_seq, limit], from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Remembers that a gateway's child was deleted under `version`.
    pub async fn record_child_deletion(
        &self,
        gateway_id: String,
        deletion: ChildDeletion,
        at: i64,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO child_deletions (gateway_id, device_id, node_id, version, deleted_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![gateway_id, deletion.device_id, deletion.node_id, deletion.version, at])?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` of a gateway's children deleted under a version above `version`, oldest
    /// first.
    pub async fn child_deletions_since(
        &self,
        gateway_id: String,
        version: i64,
        limit: i64,
    ) -> Result<Vec<ChildDeletion>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT device_id, node_id, version FROM child_deletions \
                 WHERE gateway_id = ?1 AND version > ?2 ORDER BY version LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![gateway_id, version, limit], |r| {
                Ok(ChildDeletion {
                    device_id: r.get(0)?,
                    node_id: r.get(1)?,
                    version: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Forgets deletions older than `cutoff` (a gateway away longer learns of them no more).
    pub async fn trim_child_deletions(&self, cutoff: i64) -> Result<usize, StoreError> {
        self.write(move |c| {
            Ok(
                c.prepare_cached("DELETE FROM child_deletions WHERE deleted_at < ?1")?
                    .execute([cutoff])?,
            )
        })
        .await
    }
}
