//! Which devices are connected, and how to reach each connection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ioda_mqtt::server::{Outbound, Outbox};

struct Entry {
    conn_id: u64,
    outbox: Outbox,
}

/// Connected devices: one connection per device; a new one replaces (takes over) the old.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection and returns its id and the outbox of the connection it replaced.
    pub fn register(&self, device_id: &str, outbox: Outbox) -> (u64, Option<Outbox>) {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let old = self
            .lock()
            .insert(device_id.to_owned(), Entry { conn_id, outbox });
        (conn_id, old.map(|e| e.outbox))
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

    /// Asks the device's connection, if any, to close with an MQTT 5 reason.
    pub fn kick(&self, device_id: &str, reason: u8) -> bool {
        let outbox = self.lock().get(device_id).map(|e| e.outbox.clone());
        match outbox {
            Some(outbox) => {
                close_connection(outbox, reason);
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
