//! Sending to connected devices: QoS chosen by subscription, request/response correlated by
//! request id, and delivery of what was queued while a device was away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ioda_mqtt::QoS;
use ioda_mqtt::server::{Delivery, Outbound, OutboundPublish};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::registry::Link;
use crate::topic::filter_matches;
use crate::{EngineError, Platform};
use ioda_types::Device;

/// How long a push waits for room in a connection's outbox.
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a publish to a device could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    Offline,
    /// A custom topic the device has not subscribed to.
    NotSubscribed,
}

/// What kind of reply a request waits for; a reply of another kind does not complete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    Command,
    PropertiesSet,
    PropertiesGet,
}

struct Waiter {
    /// The connected device that answers: the device itself, or the gateway of a child.
    device_id: String,
    kind: ReplyKind,
    reply: oneshot::Sender<Value>,
}

/// Requests waiting for a device's reply, by request id.
#[derive(Default)]
pub(crate) struct Waiters(Mutex<HashMap<String, Waiter>>);

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Waiter>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct WaiterGuard<'a> {
    waiters: &'a Waiters,
    request_id: &'a str,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.waiters.lock().remove(self.request_id);
    }
}

/// A fresh request id: 24 hex digits, unique and sortable by time.
pub(crate) fn new_request_id(now: i64) -> String {
    ioda_types::ids::object_id(now, crate::id_bytes())
}

impl Platform {
    /// Publishes to a connected device. System topics are delivered whether or not the device
    /// subscribed (IoTDA's implicit subscription), at QoS 1 when it subscribed at QoS 1; custom
    /// topics need a subscription. The receiver tells what became of it: written (QoS 0),
    /// acknowledged (QoS 1) or too large for the device; it is dropped when nothing is known.
    pub(crate) async fn push(
        &self,
        device_id: &str,
        topic: String,
        payload: Vec<u8>,
        needs_subscription: bool,
    ) -> Result<oneshot::Receiver<Delivery>, PushError> {
        let link = self.registry.link(device_id).ok_or(PushError::Offline)?;
        let now = self.now();
        let granted = {
            let state = link.state();
            if state.awake_until.is_some_and(|until| now > until) {
                return Err(PushError::Offline);
            }
            state
                .subscriptions
                .iter()
                .filter(|(f, _)| filter_matches(f, &topic))
                .map(|(_, q)| *q)
                .max()
        };
        if needs_subscription && granted.is_none() {
            return Err(PushError::NotSubscribed);
        }
        let qos = if granted == Some(1) {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        let serial = link.state().serial_commands && topic.contains("/sys/commands/");
        if serial {
            let mut state = link.state();
            if state.commands_gated {
                return Err(PushError::Offline);
            }
            state.commands_gated = true;
        }
        let (acked, receiver) = oneshot::channel();
        let outbound = Outbound::Publish(Box::new(OutboundPublish {
            topic,
            payload: payload.into(),
            qos,
            acked: Some(acked),
        }));
        // A connection whose outbox stays full is not taking anything: treat it as away rather
        // than letting the caller (an API request, the scheduler) wait on it.
        if link
            .outbox
            .send_timeout(outbound, PUSH_TIMEOUT)
            .await
            .is_err()
        {
            if serial {
                link.state().commands_gated = false;
            }
            return Err(PushError::Offline);
        }
        Ok(receiver)
    }

    /// The connected device a request to `device` goes through: the device itself, or the
    /// gateway of a child that is not connected itself (the payload names the child in
    /// `object_device_id`, and the gateway answers on its own topics).
    pub(crate) fn route<'a>(&self, device: &'a Device) -> &'a str {
        let child = device.gateway_id != device.device_id;
        if child
            && !self.registry.is_connected(&device.device_id)
            && self.registry.is_connected(&device.gateway_id)
        {
            &device.gateway_id
        } else {
            &device.device_id
        }
    }

    /// The live connection a downlink to `device` goes out on, with the device id it is
    /// addressed to there (the device's own, or its gateway's).
    pub(crate) fn link_to(&self, device: &Device) -> Option<(String, Arc<Link>)> {
        let via = self.route(device);
        self.registry.link(via).map(|link| (via.to_owned(), link))
    }

    /// As `link_to`, for a device known by id: its record is read only when it is not
    /// connected itself.
    pub(crate) async fn link_to_id(&self, device_id: &str) -> Option<(String, Arc<Link>)> {
        if let Some(link) = self.registry.link(device_id) {
            return Some((device_id.to_owned(), link));
        }
        let device = self
            .store
            .device(device_id.to_owned())
            .await
            .ok()
            .flatten()?;
        self.link_to(&device)
    }

    /// Whether what waits for `device_id` goes out on `via`'s connection: its own, or its
    /// gateway's while it has none of its own (a child connected itself delivers its own).
    fn goes_via(&self, device_id: &str, via: &str) -> bool {
        device_id == via || !self.registry.is_connected(device_id)
    }

    /// Sends a request on `topic_of(device_id, request_id)` (through the gateway, for a child)
    /// and waits for the reply.
    pub(crate) async fn request(
        &self,
        device: &Device,
        kind: ReplyKind,
        topic_of: fn(&str, &str) -> String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<(String, Value), EngineError> {
        let device_id = self.route(device);
        let request_id = new_request_id(self.now());
        let (reply, replied) = oneshot::channel();
        let waiter = Waiter {
            device_id: device_id.to_owned(),
            kind,
            reply,
        };
        self.waiters.lock().insert(request_id.clone(), waiter);
        // Removes the waiter however this call ends, even when the API caller goes away.
        let _cleanup = WaiterGuard {
            waiters: &self.waiters,
            request_id: &request_id,
        };
        let topic = topic_of(device_id, &request_id);
        if self.push(device_id, topic, payload, false).await.is_err() {
            return Err(EngineError::DeviceOffline);
        }
        match tokio::time::timeout(timeout, replied).await {
            Ok(Ok(value)) => Ok((request_id.clone(), value)),
            _ => Err(EngineError::DeviceTimeout),
        }
    }

    /// Hands a device's reply to the request waiting for it; `false` when none waits (unknown,
    /// late or duplicate), which the caller records.
    pub(crate) fn complete_request(
        &self,
        device_id: &str,
        request_id: &str,
        kind: ReplyKind,
        value: Value,
    ) -> bool {
        let mut waiters = self.waiters.lock();
        let matches = waiters
            .get(request_id)
            .is_some_and(|w| w.device_id == device_id && w.kind == kind);
        match waiters.remove(request_id).filter(|_| matches) {
            Some(waiter) => waiter.reply.send(value).is_ok(),
            None => false,
        }
    }

    /// Records a downlink stage in the device trace without waiting for its commit.
    pub(crate) async fn trace_downlink(&self, device_id: &str, kind: &'static str, detail: Value) {
        let entry = ioda_store::TraceEntry {
            id: 0,
            device_id: device_id.to_owned(),
            at: self.now(),
            kind: kind.into(),
            detail: detail.into(),
        };
        let _ = self.store.append_trace(vec![entry]).await;
    }

    /// Delivers the device's queued downlinks after `delay`, once per connection.
    pub(crate) fn deliver_queued_later(
        self: &Arc<Self>,
        device_id: &str,
        link: Arc<Link>,
        delay: Duration,
    ) {
        if link.state().queue_delivered {
            return;
        }
        let platform = self.clone();
        let device_id = device_id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // Boxed: every connection's task waits here first, and should hold a small future
            // while it waits, not the whole delivery's (which is only built if it runs).
            Box::pin(platform.deliver_queued(&device_id, link)).await;
        });
    }

    /// Sends what waited for the device (and, for a gateway, for its children): pending and
    /// unacknowledged commands, cached messages, and the desired shadow state where it differs
    /// from the reported one.
    async fn deliver_queued(self: &Arc<Self>, device_id: &str, link: Arc<Link>) {
        let _turn = link.delivery.lock().await;
        let current = self
            .registry
            .link(device_id)
            .is_some_and(|l| l.conn_id == link.conn_id);
        if !current || link.state().queue_delivered {
            return;
        }
        link.state().queue_delivered = true;
        match self
            .store
            .undelivered_commands_via(device_id.to_owned())
            .await
        {
            Ok(commands) => {
                // A command sent on this very connection is the resend schedule's business.
                let earlier = |c: &ioda_store::AsyncCommand| {
                    c.sent_at.is_none_or(|at| at < link.connected_at)
                };
                let ours = |c: &ioda_store::AsyncCommand| self.goes_via(&c.device_id, device_id);
                for command in commands.into_iter().filter(earlier).filter(ours) {
                    Box::pin(self.send_async_command(command)).await;
                }
            }
            Err(error) => tracing::warn!(%error, device_id, "could not load queued commands"),
        }
        match self.store.pending_messages_via(device_id.to_owned()).await {
            Ok(messages) => {
                let ours = |m: &ioda_store::DeviceMessage| self.goes_via(&m.device_id, device_id);
                for message in messages.into_iter().filter(ours) {
                    Box::pin(self.deliver_message(message)).await;
                }
            }
            Err(error) => tracing::warn!(%error, device_id, "could not load cached messages"),
        }
        // A desired-state change may have loaded the shadow (and pushed) already on this connection.
        if self
            .load_shadow_cache(device_id, &link, crate::shadow::Load::IfMissing)
            .await
        {
            self.push_desired(device_id, &link, crate::shadow::Push::UnlessUnanswered)
                .await;
        }
    }
}
