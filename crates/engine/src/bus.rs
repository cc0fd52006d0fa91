//! The in-process event bus: every platform event, broadcast to whoever listens (rules, push, tests).
//!
//! Overflow policy: a subscriber that falls more than the capacity behind loses the oldest events
//! and is told how many (tokio's `Lagged`); publishing never blocks the device path. Lost events
//! are counted here so they are visible.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ioda_types::PlatformEvent;
use tokio::sync::broadcast;

/// The platform event bus.
#[derive(Debug, Clone)]
pub struct Bus {
    sender: broadcast::Sender<Arc<PlatformEvent>>,
    published: Arc<AtomicU64>,
}

impl Bus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Bus {
            sender,
            published: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Publishes an event to every current subscriber.
    pub fn publish(&self, event: PlatformEvent) {
        self.published.fetch_add(1, Ordering::Relaxed);
        // No subscriber is not an error: nothing listens until rules exist.
        let _ = self.sender.send(Arc::new(event));
    }

    /// A new subscription that sees events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<PlatformEvent>> {
        self.sender.subscribe()
    }

    /// Events published since start.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}
