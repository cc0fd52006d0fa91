//! MQTT device access the IoTDA way: client id and HMAC password, one connection per device,
//! topic ACL, status on connect and disconnect. Implements the MQTT layer's broker traits.

use std::net::SocketAddr;
use std::sync::Arc;

use ioda_mqtt::codec::{Connect, Publish, SubscribeFilter, reason};
use ioda_mqtt::server::{Broker, CloseCause, Outbox, PublishVerdict, Refusal, Session};
use ioda_store::{TraceDetail, TraceEntry};
use ioda_types::event::DeviceRef;
use ioda_types::{Device, DeviceStatus, PlatformEvent, StatusCause, time};
use serde_json::json;

use crate::Platform;
use crate::auth::{parse_client_id, password_matches};
use crate::ratelimit::TokenBucket;
use crate::registry::{Link, close_connection};
use crate::topic::subscribe_allowed;

/// Subscriptions one connection may hold.
const MAX_SUBSCRIPTIONS: usize = 100;

/// How long after CONNECT queued downlinks wait for the device's first SUBSCRIBE.
const QUEUE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The MQTT broker of the platform.
#[derive(Debug, Clone)]
pub struct DeviceBroker {
    platform: Arc<Platform>,
}

impl DeviceBroker {
    pub fn new(platform: Arc<Platform>) -> Self {
        DeviceBroker { platform }
    }
}

/// One connected device.
pub struct DeviceSession {
    pub(crate) platform: Arc<Platform>,
    pub(crate) device: Arc<DeviceRef>,
    pub(crate) link: Arc<Link>,
    pub(crate) bucket: TokenBucket,
    /// False for a device that cannot be sent to (HTTPS access): its data does not trigger the
    /// delivery of what waits for it.
    pub(crate) takes_downlinks: bool,
    trace_budget: TokenBucket,
    suppressed_traces: u64,
}

pub(crate) fn trace_entry(
    device_id: &str,
    at: i64,
    kind: &'static str,
    detail: impl Into<TraceDetail>,
) -> TraceEntry {
    TraceEntry {
        id: 0,
        device_id: device_id.to_owned(),
        at,
        kind: kind.into(),
        detail: detail.into(),
    }
}

impl Platform {
    /// A short-connection device sent data (or registered): its status follows its data, and
    /// an ABNORMAL or OFFLINE one is ONLINE again.
    pub(crate) async fn data_seen(&self, device: &Arc<DeviceRef>) {
        let now = self.now();
        match self.store.data_seen(device.device_id.clone(), now).await {
            Ok(Some(DeviceStatus::Abnormal | DeviceStatus::Offline | DeviceStatus::Inactive)) => {
                self.bus.publish(PlatformEvent::DeviceStatusChanged {
                    device: device.clone(),
                    status: DeviceStatus::Online,
                    cause: StatusCause::DataReceived,
                    at: now,
                });
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, device_id = %device.device_id, "could not record the device's data time")
            }
        }
    }

    /// Records one trace entry for a device now (outside any session).
    pub(crate) async fn trace_now(
        &self,
        device_id: &str,
        kind: &'static str,
        detail: impl Into<TraceDetail>,
    ) {
        let entry = trace_entry(device_id, self.now(), kind, detail);
        let _ = self.store.record_trace(vec![entry]).await;
    }

    /// Checks a CONNECT against the device registry; on success the device is ONLINE.
    async fn authenticate(&self, connect: &Connect) -> Result<Device, Refusal> {
        let client = parse_client_id(&connect.client_id).ok_or(Refusal::ClientIdRejected)?;
        let device = self
            .store
            .device(client.device_id.to_owned())
            .await
            .map_err(|_| Refusal::ServerUnavailable)?
            .ok_or(Refusal::BadCredentials)?;
        let refuse = |refusal: Refusal, why: &str| {
            let entry = trace_entry(
                &device.device_id,
                self.now(),
                "connect_refused",
                json!({ "reason": why, "client_id": connect.client_id }),
            );
            (refusal, entry)
        };
        let verdict = self.check_connect(connect, &device, client.sign_type, client.timestamp);
        if let Err((refusal, why)) = verdict {
            let (refusal, entry) = refuse(refusal, why);
            let _ = self.store.record_trace(vec![entry]).await;
            return Err(refusal);
        }
        Ok(device)
    }

    fn check_connect(
        &self,
        connect: &Connect,
        device: &Device,
        sign_type: u8,
        timestamp: &str,
    ) -> Result<(), (Refusal, &'static str)> {
        let keep_alive = connect.keep_alive;
        if keep_alive < self.config.keepalive_min || keep_alive > self.config.keepalive_max {
            return Err((
                Refusal::ClientIdRejected,
                "keepalive outside the accepted range",
            ));
        }
        if connect.username.as_deref() != Some(device.device_id.as_str()) {
            return Err((Refusal::BadCredentials, "username is not the device id"));
        }
        let password = connect.password.as_deref().unwrap_or_default();
        self.check_credentials(device, sign_type, timestamp, password)
    }

    /// The secret, the timestamp and the device's state, as MQTT's CONNECT and HTTPS's
    /// device-auth present them.
    pub(crate) fn check_credentials(
        &self,
        device: &Device,
        sign_type: u8,
        timestamp: &str,
        password: &[u8],
    ) -> Result<(), (Refusal, &'static str)> {
        if device.auth.auth_type != "SECRET" {
            return Err((
                Refusal::BadCredentials,
                "device authenticates with certificates, which need MQTTS",
            ));
        }
        if sign_type == 2 {
            return Err((
                Refusal::BadCredentials,
                "sign type 2 (HMAC-SM3) is not supported",
            ));
        }
        if sign_type == 1 {
            let stamp = time::parse_hour_stamp(timestamp)
                .ok_or((Refusal::BadCredentials, "timestamp is not a valid hour"))?;
            // The stamp names the start of an hour, so "now" may lie anywhere within that hour.
            let delta = self.now() - stamp;
            let tolerance = self.config.timestamp_tolerance_ms;
            if delta < -tolerance || delta > 3_600_000 + tolerance {
                return Err((
                    Refusal::BadCredentials,
                    "timestamp too far from the platform clock",
                ));
            }
        }
        let secrets = [
            device.auth.secret.as_deref(),
            device.auth.secondary_secret.as_deref(),
        ];
        if !password_matches(password, timestamp, &secrets) {
            return Err((Refusal::BadCredentials, "wrong password"));
        }
        if device.frozen {
            return Err((Refusal::NotAuthorized, "device is frozen"));
        }
        Ok(())
    }

    pub(crate) async fn go_online(
        &self,
        device: &Device,
        outbox: Outbox,
    ) -> Result<Arc<Link>, Refusal> {
        let (link, previous) = self
            .registry
            .register(&device.device_id, outbox, self.now());
        if let Some(previous) = previous {
            close_connection(previous.outbox.clone(), reason::SESSION_TAKEN_OVER);
        }
        let now = self.now();
        if self
            .store
            .set_status(device.device_id.clone(), DeviceStatus::Online, now)
            .await
            .is_err()
        {
            self.registry.unregister(&device.device_id, link.conn_id);
            return Err(Refusal::ServerUnavailable);
        }
        self.bus.publish(PlatformEvent::DeviceStatusChanged {
            device: device.reference(),
            status: DeviceStatus::Online,
            cause: StatusCause::Connected,
            at: now,
        });
        Ok(link)
    }
}

impl Broker for DeviceBroker {
    type Session = DeviceSession;

    async fn connect(
        &self,
        connect: &Connect,
        peer: SocketAddr,
        outbox: Outbox,
    ) -> Result<DeviceSession, Refusal> {
        let platform = &self.platform;
        let device = platform.authenticate(connect).await?;
        let link = platform.go_online(&device, outbox).await?;
        tracing::debug!(device_id = %device.device_id, %peer, "device connected");
        // Devices subscribe right after CONNACK and queued downlinks go out on the first SUBSCRIBE;
        // a device that never subscribes still gets them (implicit subscription) a moment later.
        platform.deliver_queued_later(&device.device_id, link.clone(), QUEUE_GRACE);
        Ok(DeviceSession::new(platform.clone(), &device, link))
    }
}

fn status_cause(cause: &CloseCause) -> StatusCause {
    match cause {
        CloseCause::ClientDisconnect => StatusCause::ClientDisconnected,
        CloseCause::KeepaliveTimeout => StatusCause::KeepaliveExpired,
        CloseCause::ConnectionLost => StatusCause::ConnectionLost,
        CloseCause::Protocol(_) | CloseCause::PublishRefused(_) => StatusCause::ProtocolError,
        CloseCause::Server(reason::SERVER_SHUTTING_DOWN) => StatusCause::ServerShutdown,
        CloseCause::Server(reason::SESSION_TAKEN_OVER) => StatusCause::TakenOver,
        CloseCause::Server(_) => StatusCause::Kicked,
    }
}

impl DeviceSession {
    /// The session of a device that just came online on `link`.
    pub(crate) fn new(platform: Arc<Platform>, device: &Device, link: Arc<Link>) -> DeviceSession {
        let now = platform.now();
        DeviceSession {
            bucket: TokenBucket::new(platform.config.rate_limit, now),
            takes_downlinks: true,
            trace_budget: TokenBucket::new(10, now),
            suppressed_traces: 0,
            platform,
            device: device.reference(),
            link,
        }
    }

    /// Leaves the registry without touching the status (a lapsed LwM2M registration, whose
    /// status follows its data).
    pub(crate) async fn detach(mut self, why: &'static str) {
        if self
            .platform
            .registry
            .unregister(&self.device.device_id, self.link.conn_id)
        {
            self.record(why, json!({})).await;
        }
    }

    /// Builds a trace entry unless this session has been tracing too much this second; the next
    /// entry that passes says how many were suppressed, so nothing disappears without a count.
    pub(crate) fn trace(
        &mut self,
        kind: &'static str,
        detail: impl Into<TraceDetail>,
    ) -> Option<TraceEntry> {
        let device = self.device.clone();
        self.trace_on(&device.device_id, kind, detail)
    }

    /// As `trace`, for an entry in another device's trace: a gateway's child, whose data
    /// comes over this connection and counts against its budget.
    pub(crate) fn trace_on(
        &mut self,
        device_id: &str,
        kind: &'static str,
        detail: impl Into<TraceDetail>,
    ) -> Option<TraceEntry> {
        let now = self.platform.now();
        if !self.trace_budget.try_take(now) {
            self.suppressed_traces += 1;
            return None;
        }
        let mut detail = detail.into();
        if self.suppressed_traces > 0 {
            detail = detail.with_first("suppressed_before", self.suppressed_traces as i64);
            self.suppressed_traces = 0;
        }
        Some(trace_entry(device_id, now, kind, detail))
    }

    /// A stage record of a message's way through the platform; never throttled.
    pub(crate) fn stage(&self, kind: &'static str, detail: impl Into<TraceDetail>) -> TraceEntry {
        trace_entry(&self.device.device_id, self.platform.now(), kind, detail)
    }

    /// Records a trace entry from a synchronous context, without waiting for it.
    fn trace_later(&mut self, kind: &'static str, detail: impl Into<TraceDetail>) {
        if let Some(entry) = self.trace(kind, detail) {
            let platform = self.platform.clone();
            tokio::spawn(async move {
                let _ = platform.store.record_trace(vec![entry]).await;
            });
        }
    }

    pub(crate) async fn record(&mut self, kind: &'static str, detail: impl Into<TraceDetail>) {
        let device = self.device.clone();
        self.record_on(&device.device_id, kind, detail).await;
    }

    /// Records a trace entry in `device_id`'s trace (this device's or a child's).
    pub(crate) async fn record_on(
        &mut self,
        device_id: &str,
        kind: &'static str,
        detail: impl Into<TraceDetail>,
    ) {
        if let Some(entry) = self.trace_on(device_id, kind, detail) {
            let _ = self.platform.store.record_trace(vec![entry]).await;
        }
    }
}

impl Session for DeviceSession {
    async fn publish(&mut self, publish: Publish) -> PublishVerdict {
        self.handle_uplink(publish).await
    }

    fn subscribe(&mut self, filter: &SubscribeFilter) -> u8 {
        if !subscribe_allowed(&self.device.device_id, &filter.filter) {
            self.trace_later("subscribe_denied", json!({ "filter": filter.filter }));
            return reason::NOT_AUTHORIZED;
        }
        let granted = filter.qos.min(1);
        let accepted = {
            let mut state = self.link.state();
            let count = state.subscriptions.len();
            match state
                .subscriptions
                .iter_mut()
                .find(|(f, _)| *f == filter.filter)
            {
                Some(existing) => {
                    existing.1 = granted;
                    true
                }
                // IoTDA allows a bounded number of subscriptions per connection.
                None if count >= MAX_SUBSCRIPTIONS => false,
                None => {
                    state.subscriptions.push((filter.filter.clone(), granted));
                    true
                }
            }
        };
        if !accepted {
            self.trace_later(
                "subscribe_refused",
                json!({ "filter": filter.filter, "limit": MAX_SUBSCRIPTIONS }),
            );
            return reason::QUOTA_EXCEEDED;
        }
        self.platform.deliver_queued_later(
            &self.device.device_id,
            self.link.clone(),
            std::time::Duration::ZERO,
        );
        granted
    }

    fn unsubscribe(&mut self, filter: &str) {
        self.link.state().subscriptions.retain(|(f, _)| f != filter);
    }

    async fn closed(mut self, cause: CloseCause) {
        if let CloseCause::Protocol(error) = &cause {
            self.record("protocol_error", json!({ "error": error.to_string() }))
                .await;
        }
        let platform = self.platform.clone();
        if !platform
            .registry
            .unregister(&self.device.device_id, self.link.conn_id)
        {
            return; // Taken over: the new connection owns the status.
        }
        let now = platform.now();
        if let Err(error) = platform
            .store
            .set_status(self.device.device_id.clone(), DeviceStatus::Offline, now)
            .await
        {
            tracing::warn!(%error, device_id = %self.device.device_id, "could not record OFFLINE");
        }
        platform.bus.publish(PlatformEvent::DeviceStatusChanged {
            device: self.device.clone(),
            status: DeviceStatus::Offline,
            cause: status_cause(&cause),
            at: now,
        });
    }
}
