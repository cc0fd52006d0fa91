//! NB-IoT devices over LwM2M: a registration makes the device online on a link whose outbox is
//! served over CoAP instead of MQTT. Data on `/19/0/0` enters the same uplink path as an MQTT
//! property report (a binary product's codec decodes it); commands and messages go out as a
//! confirmable `PUT /19/1/0`, one at a time, and only while a queue-mode device is awake.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ioda_coap::{CoapHandle, Lwm2mHandler, Outcome, Registration, ResponseType};
use ioda_mqtt::codec::{Publish, PublishProperties, QoS};
use ioda_mqtt::server::{CloseCause, Delivery, Outbound, OutboundPublish, PublishVerdict, Session};
use ioda_types::Device;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::access::DeviceSession;
use crate::{Platform, lock};

/// After a queue-mode device talks, how long it stays reachable (its PSM receive window).
const AWAKE_MS: i64 = 20_000;
/// After a command is delivered, how long the next one waits for the device's answer.
const ANSWER_WAIT_MS: i64 = 30_000;

/// The platform as an LwM2M server.
pub struct Lwm2mAccess {
    platform: Arc<Platform>,
    /// The plain CoAP server and the DTLS one: a device is answered on the one it registered on.
    plain: std::sync::OnceLock<CoapHandle>,
    secure: std::sync::OnceLock<CoapHandle>,
    links: Mutex<HashMap<String, EndpointLink>>,
}

impl std::fmt::Debug for Lwm2mAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lwm2mAccess").finish_non_exhaustive()
    }
}

/// A registered endpoint: where it is, until when, and its connection task.
struct EndpointLink {
    device_id: String,
    /// The DTLS identity it registered with; updates and de-registration must prove the same.
    identity: Option<String>,
    peer: Arc<Mutex<SocketAddr>>,
    expires_at: i64,
    lifetime_ms: i64,
    uplink: mpsc::Sender<Uplink>,
}

enum Uplink {
    /// Data on `/19/0/0`; `done` is answered once it is stored.
    Data(Vec<u8>, oneshot::Sender<()>),
    /// The device talked (an update): a queue-mode device is awake.
    Awake,
    /// The registration ended.
    Closed(CloseCause),
}

impl Lwm2mAccess {
    /// LwM2M access without servers yet (`serve_on` attaches them, once each).
    pub fn new(platform: Arc<Platform>) -> Arc<Lwm2mAccess> {
        Arc::new(Lwm2mAccess {
            platform,
            plain: std::sync::OnceLock::new(),
            secure: std::sync::OnceLock::new(),
            links: Mutex::new(HashMap::new()),
        })
    }

    /// Attaches the server that requests to devices go out through: plain CoAP or CoAPS.
    pub fn serve_on(&self, coap: CoapHandle, secure: bool) {
        let slot = if secure { &self.secure } else { &self.plain };
        let _ = slot.set(coap);
    }

    /// Ends registrations whose lifetime passed without an update. Called every second (and by
    /// tests after moving the clock).
    pub fn sweep(&self) {
        let now = self.platform.now();
        let expired: Vec<EndpointLink> = {
            let mut links = lock(&self.links);
            let gone: Vec<String> = links
                .iter()
                .filter(|(_, l)| l.expires_at <= now)
                .map(|(e, _)| e.clone())
                .collect();
            gone.iter().filter_map(|e| links.remove(e)).collect()
        };
        for link in expired {
            let closed = Uplink::Closed(CloseCause::KeepaliveTimeout);
            if let Err(mpsc::error::TrySendError::Full(closed)) = link.uplink.try_send(closed) {
                // A busy task still has to hear it.
                tokio::spawn(async move {
                    let _ = link.uplink.send(closed).await;
                });
            }
        }
    }

    /// The DTLS pre-shared key of a node: its device secret, hex-decoded when it is 8 to 32 hex
    /// characters (IoTDA's PSK form), else the secret's bytes. Frozen and unknown nodes have none.
    pub fn psk(&self, identity: &str) -> Option<Vec<u8>> {
        let endpoint = identity.strip_prefix("urn:imei:").unwrap_or(identity);
        let devices = self.platform.store.devices_by_node_now(endpoint).ok()?;
        let [device] = devices.as_slice() else {
            return None;
        };
        if device.frozen {
            return None;
        }
        let secret = device.auth.secret.as_deref()?;
        let hex = (8..=32).contains(&secret.len())
            && secret.len() % 2 == 0
            && secret.bytes().all(|b| b.is_ascii_hexdigit());
        Some(if hex {
            ioda_codec::hex_decode(secret).ok()?
        } else {
            secret.as_bytes().to_vec()
        })
    }

    /// Number of registered endpoints.
    pub fn registered(&self) -> usize {
        lock(&self.links).len()
    }

    async fn device_named(&self, peer: SocketAddr, endpoint: &str) -> Result<Device, ResponseType> {
        let devices = self
            .platform
            .store
            .devices_by_node(endpoint.to_owned())
            .await
            .map_err(|_| ResponseType::InternalServerError)?;
        let [device] = devices.as_slice() else {
            tracing::info!(%peer, endpoint, matches = devices.len(), "LwM2M registration refused: no single device has this node id");
            return Err(ResponseType::Forbidden);
        };
        if device.frozen {
            let detail = json!({ "reason": "device is frozen", "peer": peer.to_string() });
            self.platform
                .trace_now(&device.device_id, "connect_refused", detail)
                .await;
            return Err(ResponseType::Forbidden);
        }
        Ok(device.clone())
    }

    /// A registered endpoint talked from `peer`: it is reachable there, and its registration
    /// lasts another lifetime. Over DTLS only its own identity may do so.
    fn touch(
        &self,
        endpoint: &str,
        peer: SocketAddr,
        identity: Option<&str>,
        lifetime_s: Option<u64>,
    ) -> Result<mpsc::Sender<Uplink>, ResponseType> {
        let now = self.platform.now();
        let mut links = lock(&self.links);
        let link = links.get_mut(endpoint).ok_or(ResponseType::NotFound)?;
        if link.identity.is_some() && link.identity.as_deref() != identity {
            return Err(ResponseType::Forbidden);
        }
        *lock(&link.peer) = peer;
        if let Some(lifetime) = lifetime_s {
            link.lifetime_ms = lifetime as i64 * 1000;
        }
        link.expires_at = now + link.lifetime_ms;
        Ok(link.uplink.clone())
    }
}

impl Lwm2mHandler for Lwm2mAccess {
    async fn register(
        &self,
        peer: SocketAddr,
        registration: Registration,
    ) -> Result<(), ResponseType> {
        let device = self.device_named(peer, &registration.endpoint).await?;
        if let Err(why) = check_security(&device, &registration) {
            let detail = json!({ "reason": why, "peer": peer.to_string() });
            self.platform
                .trace_now(&device.device_id, "connect_refused", detail)
                .await;
            return Err(ResponseType::Forbidden);
        }
        let coap = if registration.identity.is_some() {
            &self.secure
        } else {
            &self.plain
        };
        let Some(coap) = coap.get().cloned() else {
            return Err(ResponseType::ServiceUnavailable);
        };
        let (outbox, outbound) = mpsc::channel(64);
        let link = self
            .platform
            .go_online(&device, outbox)
            .await
            .map_err(|_| ResponseType::ServiceUnavailable)?;
        // Everything for the device goes out confirmable, so its ACK makes a command DELIVERED.
        link.state().subscriptions = vec![(format!("$oc/devices/{}/sys/#", device.device_id), 1)];
        link.state().serial_commands = true;
        if registration.queue_mode() {
            link.state().awake_until = Some(self.platform.now() + AWAKE_MS);
        }

        let session = DeviceSession::new(self.platform.clone(), &device, link);
        let (uplink, uplinks) = mpsc::channel(32);
        let peer_cell = Arc::new(Mutex::new(peer));
        let now = self.platform.now();
        let lifetime_ms = registration.lifetime_s as i64 * 1000;
        // A previous registration's task ends by itself: `go_online` took its link over.
        lock(&self.links).insert(
            registration.endpoint.clone(),
            EndpointLink {
                device_id: device.device_id.clone(),
                identity: registration.identity.clone(),
                peer: peer_cell.clone(),
                expires_at: now + lifetime_ms,
                lifetime_ms,
                uplink,
            },
        );
        let detail = json!({
            "peer": peer.to_string(), "lifetime_s": registration.lifetime_s, "binding": registration.binding,
            "lwm2m": registration.version, "objects": registration.objects,
        });
        self.platform
            .trace_now(&device.device_id, "lwm2m_registered", detail)
            .await;
        self.platform.data_seen(&device.reference()).await;
        let task = EndpointTask {
            session,
            coap,
            peer: peer_cell,
            queue_mode: registration.queue_mode(),
            awake_until: now + AWAKE_MS,
            held: VecDeque::new(),
            in_flight: None,
            gate_until: 0,
        };
        tokio::spawn(task.run(uplinks, outbound));
        Ok(())
    }

    async fn update(
        &self,
        peer: SocketAddr,
        identity: Option<String>,
        endpoint: String,
        lifetime_s: Option<u64>,
        _binding: Option<String>,
    ) -> Result<(), ResponseType> {
        let uplink = self.touch(&endpoint, peer, identity.as_deref(), lifetime_s)?;
        let _ = uplink.try_send(Uplink::Awake);
        Ok(())
    }

    async fn deregister(
        &self,
        peer: SocketAddr,
        identity: Option<String>,
        endpoint: String,
    ) -> Result<(), ResponseType> {
        self.touch(&endpoint, peer, identity.as_deref(), None)?;
        let link = lock(&self.links).remove(&endpoint);
        if let Some(link) = link {
            tracing::debug!(device_id = %link.device_id, "LwM2M de-registration");
            let _ = link
                .uplink
                .send(Uplink::Closed(CloseCause::ClientDisconnect))
                .await;
        }
        Ok(())
    }

    async fn data(&self, peer: SocketAddr, endpoint: String, payload: Vec<u8>) {
        // Data comes on the observation the platform opened on the registered transport, so the
        // registration's own identity applies.
        let identity = lock(&self.links)
            .get(&endpoint)
            .and_then(|l| l.identity.clone());
        let Ok(uplink) = self.touch(&endpoint, peer, identity.as_deref(), None) else {
            self.refused(
                peer,
                format!("data from {endpoint}, which is not registered"),
            );
            return;
        };
        let (done, stored) = oneshot::channel();
        if uplink.send(Uplink::Data(payload, done)).await.is_ok() {
            let _ = stored.await;
        }
    }

    fn refused(&self, peer: SocketAddr, why: String) {
        tracing::info!(%peer, why, "CoAP request refused");
    }
}

/// Over DTLS the endpoint must be the identity the key proved; a device registered for secure
/// access may not use plain CoAP.
fn check_security(device: &Device, registration: &Registration) -> Result<(), &'static str> {
    match registration.identity.as_deref() {
        Some(identity) => {
            let proved = identity.strip_prefix("urn:imei:").unwrap_or(identity);
            if proved == registration.endpoint {
                Ok(())
            } else {
                Err("the endpoint name is not the DTLS identity")
            }
        }
        None if device.auth.secure_access => {
            Err("the device must use CoAPS (DTLS): its secure_access is true")
        }
        None => Ok(()),
    }
}

/// One registered device: its uplink in order, its downlink one confirmable write at a time.
struct EndpointTask {
    session: DeviceSession,
    coap: CoapHandle,
    peer: Arc<Mutex<SocketAddr>>,
    queue_mode: bool,
    awake_until: i64,
    /// Downlinks waiting for the device to be awake or for the previous one to be answered.
    held: VecDeque<Box<OutboundPublish>>,
    in_flight: Option<(
        oneshot::Receiver<Outcome>,
        Option<oneshot::Sender<Delivery>>,
        String,
    )>,
    /// No new downlink before this time (the previous command's answer may still come).
    gate_until: i64,
}

impl EndpointTask {
    async fn run(
        mut self,
        mut uplinks: mpsc::Receiver<Uplink>,
        mut outbound: mpsc::Receiver<Outbound>,
    ) {
        let cause = loop {
            let now = self.session.platform.now();
            if self.gate_until != 0 && now >= self.gate_until {
                self.open_gate(); // No answer in time: the next command may go.
            }
            self.send_next();
            let wake = (self.gate_until.max(now) - now).clamp(50, 1000) as u64;
            tokio::select! {
                uplink = uplinks.recv() => match uplink {
                    Some(Uplink::Data(payload, done)) => {
                        self.on_data(payload).await;
                        let _ = done.send(());
                    }
                    Some(Uplink::Awake) => self.awake(),
                    Some(Uplink::Closed(cause)) => break cause,
                    None => break CloseCause::ConnectionLost,
                },
                item = outbound.recv() => match item {
                    Some(Outbound::Publish(publish)) => self.hold(publish),
                    Some(Outbound::Disconnect { reason }) => break CloseCause::Server(reason),
                    None => break CloseCause::ConnectionLost,
                },
                outcome = in_flight(&mut self.in_flight) => self.settle(outcome).await,
                _ = tokio::time::sleep(Duration::from_millis(wake)) => {}
            }
        };
        if matches!(cause, CloseCause::KeepaliveTimeout) {
            // A lapsed registration leaves the status to the data timers (ABNORMAL after 25 h
            // without data, OFFLINE after 49 h), as IoTDA does for NB-IoT devices.
            self.session.detach("lwm2m_lifetime_expired").await;
        } else {
            self.session.closed(cause).await;
        }
    }

    /// Data from the device: the same path as an MQTT property report, so a binary product's
    /// codec decodes it (a command response among it completes its command by `mid`).
    async fn on_data(&mut self, payload: Vec<u8>) {
        self.awake();
        self.session.platform.data_seen(&self.session.device).await;
        // The device's answer to the previous command usually comes with this data.
        let command_in_flight = self
            .in_flight
            .as_ref()
            .is_some_and(|(_, _, topic)| topic.contains("/sys/commands/"));
        if !command_in_flight {
            self.open_gate();
        }
        let topic = format!(
            "$oc/devices/{}/sys/properties/report",
            self.session.device.device_id
        );
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            pkid: 1,
            payload: Bytes::from(payload),
            properties: PublishProperties::default(),
        };
        if let PublishVerdict::AcceptAfter(commit) = self.session.handle_uplink(publish).await {
            let _ = commit.await;
        }
    }

    /// The previous command was answered, refused or had its time: PENDING commands may go now.
    fn open_gate(&mut self) {
        self.gate_until = 0;
        let link = self.session.link.clone();
        let was_gated = {
            let mut state = link.state();
            let gated = std::mem::replace(&mut state.commands_gated, false);
            if gated {
                state.queue_delivered = false;
            }
            gated
        };
        if was_gated {
            self.session.platform.deliver_queued_later(
                &self.session.device.device_id,
                link,
                std::time::Duration::ZERO,
            );
        }
    }

    /// The device talked: a queue-mode device is reachable for a while, and what waited while it
    /// slept (commands left PENDING) goes out now.
    fn awake(&mut self) {
        let now = self.session.platform.now();
        let slept = self.queue_mode && now > self.awake_until;
        self.awake_until = now + AWAKE_MS;
        if !self.queue_mode {
            return;
        }
        let link = self.session.link.clone();
        {
            let mut state = link.state();
            state.awake_until = Some(self.awake_until);
            if slept {
                state.queue_delivered = false;
            }
        }
        if slept {
            self.session.platform.deliver_queued_later(
                &self.session.device.device_id,
                link,
                std::time::Duration::ZERO,
            );
        }
    }

    /// Takes a downlink from the platform. A resend of what is already held or in flight (same
    /// topic, so same request) replaces nothing: CoAP retransmits on its own.
    fn hold(&mut self, publish: Box<OutboundPublish>) {
        // Only a command is resent under the same topic; messages and answers each count.
        let is_command = publish.topic.contains("/sys/commands/");
        let repeated = is_command
            && (self.held.iter().any(|h| h.topic == publish.topic)
                || self
                    .in_flight
                    .as_ref()
                    .is_some_and(|(_, _, t)| *t == publish.topic));
        if !repeated {
            self.held.push_back(publish);
        }
    }

    /// Sends the next held downlink when nothing is in flight, the previous command had its
    /// chance to be answered, and (in queue mode) the device is awake.
    fn send_next(&mut self) {
        let now = self.session.platform.now();
        if self.in_flight.is_some() || now < self.gate_until {
            return;
        }
        if self.queue_mode && now > self.awake_until {
            return;
        }
        let Some(mut publish) = self.held.pop_front() else {
            return;
        };
        let peer = *lock(&self.peer);
        let packet = ioda_coap::lwm2m::write_data(publish.payload.to_vec());
        let coap = self.coap.clone();
        let (done, outcome) = oneshot::channel();
        tokio::spawn(async move {
            let _ = done.send(coap.request(peer, packet).await);
        });
        self.in_flight = Some((outcome, publish.acked.take(), publish.topic.clone()));
    }

    /// The device acknowledged (the command is DELIVERED), refused or never answered the write.
    async fn settle(&mut self, outcome: Outcome) {
        let Some((_, acked, topic)) = self.in_flight.take() else {
            return;
        };
        let delivered = match &outcome {
            Outcome::Acknowledged => true,
            Outcome::Answered(_) => outcome.code().is_some_and(|c| !c.is_error()),
            Outcome::Rejected | Outcome::TimedOut => false,
        };
        if delivered {
            if let Some(acked) = acked {
                let _ = acked.send(Delivery::Acknowledged);
            }
            if topic.contains("/sys/commands/") {
                self.gate_until = self.session.platform.now() + ANSWER_WAIT_MS;
            }
            return;
        }
        if topic.contains("/sys/commands/") {
            self.open_gate(); // Refused or lost: the next command need not wait for an answer.
        }
        let detail = json!({ "topic": topic, "outcome": format!("{outcome:?}") });
        self.session.record("lwm2m_write_failed", detail).await;
    }
}

/// The outcome of the write in flight, or never when there is none.
async fn in_flight(
    slot: &mut Option<(
        oneshot::Receiver<Outcome>,
        Option<oneshot::Sender<Delivery>>,
        String,
    )>,
) -> Outcome {
    match slot {
        Some((outcome, ..)) => outcome.await.unwrap_or(Outcome::TimedOut),
        None => std::future::pending().await,
    }
}
