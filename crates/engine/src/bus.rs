//! The in-process event bus: every platform event, broadcast to whoever listens (rules, push, tests).
//!
//! Device data (property reports and messages) travels on a channel of its own. Forwarding takes
//! device data when it is stored (the uplink's `ForwardStage`), so the dispatcher listens to the
//! other events only: with one channel it was woken for every report just to skip it (4 % of the
//! async threads' time at 31 000 reports/s). Nothing is built or kept for the data channel while
//! nobody listens to it (`wants_device_data`).
//!
//! Order: events of one channel arrive in publishing order; between the two channels there is none
//! (a device's status change may come before a report it followed). A report read before a
//! subscription began may reach it or not.
//!
//! Overflow policy: a subscriber that falls more than the capacity (per channel) behind loses the
//! oldest events and is told how many (tokio's `Lagged`); publishing never blocks the device path.
//! The forwarding dispatcher counts what it loses (`events_lost_by_dispatcher`).

use std::sync::Arc;

use ioda_types::PlatformEvent;
use tokio::sync::broadcast::{self, error::RecvError};

/// The platform event bus.
#[derive(Debug, Clone)]
pub struct Bus {
    /// Everything but device data.
    control: broadcast::Sender<Arc<PlatformEvent>>,
    /// Property reports and messages.
    data: broadcast::Sender<Arc<PlatformEvent>>,
}

/// Whether an event is device data (a property report or a message), which has a channel of its own.
pub fn is_device_data(event: &PlatformEvent) -> bool {
    matches!(
        event,
        PlatformEvent::PropertiesReported { .. } | PlatformEvent::MessageReported { .. }
    )
}

impl Bus {
    pub fn new(capacity: usize) -> Self {
        let (control, _) = broadcast::channel(capacity);
        let (data, _) = broadcast::channel(capacity);
        Bus { control, data }
    }

    /// Publishes an event to every current subscriber.
    pub fn publish(&self, event: PlatformEvent) {
        let channel = if is_device_data(&event) {
            &self.data
        } else {
            &self.control
        };
        // No subscriber is not an error: nothing listens until rules exist.
        let _ = channel.send(Arc::new(event));
    }

    /// Whether anyone listens for device data: when nobody does, the uplink neither builds nor
    /// keeps a report's event for the bus.
    pub fn wants_device_data(&self) -> bool {
        self.data.receiver_count() > 0
    }

    /// A new subscription to every event published from now on.
    pub fn subscribe(&self) -> BusReceiver {
        BusReceiver {
            control: self.control.subscribe(),
            data: self.data.subscribe(),
        }
    }

    /// A new subscription to every event but device data, published from now on.
    pub fn subscribe_control(&self) -> broadcast::Receiver<Arc<PlatformEvent>> {
        self.control.subscribe()
    }
}

/// A subscription to both channels. Events of one channel arrive in publishing order; between
/// the two, an event already waiting on the control channel is handed out first.
#[derive(Debug)]
pub struct BusReceiver {
    control: broadcast::Receiver<Arc<PlatformEvent>>,
    data: broadcast::Receiver<Arc<PlatformEvent>>,
}

impl BusReceiver {
    /// The next event of either channel; `Lagged` says how many one of them lost.
    pub async fn recv(&mut self) -> Result<Arc<PlatformEvent>, RecvError> {
        tokio::select! {
            biased;
            event = self.control.recv() => event,
            event = self.data.recv() => event,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use ioda_types::PlatformEvent;
    use ioda_types::event::DeviceRef;

    use super::Bus;

    fn device() -> Arc<DeviceRef> {
        Arc::new(DeviceRef {
            project_id: "p".into(),
            app_id: "a".into(),
            device_id: "d".into(),
            node_id: "n".into(),
            product_id: "pr".into(),
            gateway_id: "d".into(),
        })
    }

    fn message(request_id: &str) -> PlatformEvent {
        PlatformEvent::MessageReported {
            device: device(),
            request_id: request_id.into(),
            topic: "t".into(),
            payload: Arc::from(&b"x"[..]),
            at: 0,
        }
    }

    #[tokio::test]
    async fn device_data_reaches_full_subscribers_only() {
        let bus = Bus::new(16);
        assert!(!bus.wants_device_data());
        let mut control = bus.subscribe_control();
        assert!(
            !bus.wants_device_data(),
            "a control subscription is no data listener"
        );
        let mut all = bus.subscribe();
        assert!(bus.wants_device_data());

        bus.publish(message("m1"));
        bus.publish(PlatformEvent::ProductDeleted {
            project_id: "p".into(),
            product_id: "pr".into(),
            at: 0,
        });
        bus.publish(message("m2"));
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(match &*all.recv().await.unwrap() {
                PlatformEvent::MessageReported { request_id, .. } => request_id.clone(),
                PlatformEvent::ProductDeleted { .. } => "product".into(),
                other => panic!("unexpected {other:?}"),
            });
        }
        // The waiting control event first, then the data in publishing order.
        assert_eq!(seen, ["product", "m1", "m2"]);
        assert!(matches!(
            &*control.recv().await.unwrap(),
            PlatformEvent::ProductDeleted { .. }
        ));
        assert!(
            control.try_recv().is_err(),
            "no device data on the control channel"
        );
        drop(all);
        assert!(!bus.wants_device_data());
    }
}
