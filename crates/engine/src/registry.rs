//! Which devices are connected, and how to reach each connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ioda_mqtt::server::{Outbound, Outbox};
use serde_json::{Map, Value};

/// What the platform keeps about one live connection, shared between the connection's session and
/// everyone who sends to the device.
#[derive(Debug)]
pub struct Link {
    pub conn_id: u64,
    /// Platform time the connection was established.
    pub connected_at: i64,
    pub outbox: Outbox,
    state: Mutex<LinkState>,
    /// Serialises deliveries of queued downlinks, so two triggers never send the same item twice.
    pub(crate) delivery: tokio::sync::Mutex<()>,
}

/// Mutable per-connection state.
#[derive(Debug, Default)]
pub(crate) struct LinkState {
    /// Granted subscriptions: filter and QoS.
    pub subscriptions: Vec<(String, u8)>,
    /// Whether the queued downlinks have been delivered on this connection.
    pub queue_delivered: bool,
    /// Messages pushed on this connection and not settled yet, by device and message id (a
    /// gateway's connection carries its children's): a message created while the queue is
    /// delivered is read by both, and must go out once.
    pub messages_in_flight: Vec<(String, String)>,
    /// A gateway's `sub_device_sync_request` is being answered on this connection; another
    /// meanwhile is traced and dropped, so a device cannot queue up work.
    pub child_sync_running: bool,
    /// Desired and reported shadow per service, loaded when queued downlinks are delivered.
    pub shadow: Option<HashMap<String, ShadowCache>>,
    /// Counts committed reports and shadow loads: a load that saw it change while reading the
    /// store may hold reported values older than a report the connection already compared.
    pub shadow_generation: u64,
    /// The last desired-state push on this connection.
    pub desired_push: Option<DesiredPush>,
    /// A sleeping (LwM2M queue-mode) device is reachable only until this platform time after
    /// it last talked; pushes fail as for an offline device, so commands stay PENDING.
    pub awake_until: Option<i64>,
    /// An LwM2M device takes one command at a time (`serial_commands`): from the moment one is
    /// handed over until it is answered (`commands_gated`), the next stays PENDING (pushes of
    /// commands fail as for an offline device).
    pub serial_commands: bool,
    pub commands_gated: bool,
}

/// The shadow of one service as the connection last saw it.
#[derive(Debug, Default, Clone)]
pub(crate) struct ShadowCache {
    pub desired: Map<String, Value>,
    pub reported: Map<String, Value>,
    /// The shadow's version when it was loaded (reports merged since do not change it; every
    /// desired-state change does, and reloads).
    pub version: i64,
}

/// A desired-state push (`properties/set`) sent on a connection.
#[derive(Debug)]
pub(crate) struct DesiredPush {
    pub request_id: String,
    pub at: i64,
    /// The shadow version of each service it carried.
    pub versions: Vec<(String, i64)>,
    pub answered: bool,
}

impl Link {
    pub(crate) fn new(conn_id: u64, connected_at: i64, outbox: Outbox) -> Link {
        Link {
            conn_id,
            connected_at,
            outbox,
            state: Mutex::new(LinkState::default()),
            delivery: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Connected devices: one connection per device; a new one replaces (takes over) the old.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<String, Arc<Link>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Link>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection and returns its link and the link it replaced.
    pub(crate) fn register(
        &self,
        device_id: &str,
        outbox: Outbox,
        now: i64,
    ) -> (Arc<Link>, Option<Arc<Link>>) {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let link = Arc::new(Link::new(conn_id, now, outbox));
        let old = self.lock().insert(device_id.to_owned(), link.clone());
        (link, old)
    }

    /// Removes the connection if it is still the current one for the device; `true` if it was.
    pub fn unregister(&self, device_id: &str, conn_id: u64) -> bool {
        let mut entries = self.lock();
        if entries.get(device_id).is_some_and(|e| e.conn_id == conn_id) {
            entries.remove(device_id);
            true
        } else {
            false
        }
    }

    /// The device's current connection.
    pub(crate) fn link(&self, device_id: &str) -> Option<Arc<Link>> {
        self.lock().get(device_id).cloned()
    }

    /// Asks the device's connection, if any, to close with an MQTT 5 reason.
    pub fn kick(&self, device_id: &str, reason: u8) -> bool {
        match self.link(device_id) {
            Some(link) => {
                close_connection(link.outbox.clone(), reason);
                true
            }
            None => false,
        }
    }

    /// Whether the device has a live connection.
    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock().contains_key(device_id)
    }

    /// Number of connected devices.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sends a disconnect without waiting: a full outbox must not stall the caller.
pub(crate) fn close_connection(outbox: Outbox, reason: u8) {
    if let Err(tokio::sync::mpsc::error::TrySendError::Full(message)) =
        outbox.try_send(Outbound::Disconnect { reason })
    {
        tokio::spawn(async move {
            let _ = outbox.send(message).await;
        });
    }
}
