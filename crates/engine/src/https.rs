//! HTTPS device access (IoTDA's device API over HTTPS, uplink only): `POST /v5/device-auth` trades
//! the MQTT password for an access token, and each publish carrying the token takes the same path
//! as the MQTT publish on the matching topic (validation, shadow, history, forwarding, trace).
//!
//! Such a device keeps no connection, so its status follows its data as an NB-IoT device's does:
//! ONLINE on data, ABNORMAL after 25 h without any, OFFLINE after 49 h. Tokens live in memory (a
//! restart asks devices to authenticate again, which they do on IOTDA.000004).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ioda_mqtt::codec::{Publish, PublishProperties, QoS, reason};
use ioda_mqtt::server::{PublishVerdict, Refusal};
use ioda_types::Device;
use serde_json::json;
use tokio::sync::mpsc;

use crate::access::DeviceSession;
use crate::registry::Link;
use crate::{Platform, lock};

/// What IoTDA answers in `expires_in`: a token lasts a day.
pub const TOKEN_LIFETIME_S: u64 = 86_399;
/// A device that authenticates again may go on using its previous token this long.
const PREVIOUS_TOKEN_GRACE_MS: i64 = 30_000;

/// What a device publishes over HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpsUplink {
    MessagesUp,
    PropertiesReport,
    /// A gateway's report of its children's properties (at most 50 children over HTTPS).
    SubDevicesReport,
}

/// Children in one HTTPS batch report, at most (IoTDA's limit; MQTT takes 100).
const MAX_HTTPS_CHILDREN: usize = 50;

impl HttpsUplink {
    fn topic(self, device_id: &str) -> String {
        let tail = match self {
            HttpsUplink::MessagesUp => "messages/up",
            HttpsUplink::PropertiesReport => "properties/report",
            HttpsUplink::SubDevicesReport => "gateway/sub_devices/properties/report",
        };
        format!("$oc/devices/{device_id}/sys/{tail}")
    }
}

/// Why an HTTPS device request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpsRefusal {
    /// Unknown device, wrong password, stale timestamp, certificate device (IOTDA.000002, 401).
    AuthenticationFailed(&'static str),
    /// No token, an expired or unknown one, or one of another device (IOTDA.000004, 403).
    InvalidToken,
    /// The device is frozen (403).
    Frozen,
    /// The body is not what the resource takes (IOTDA.000006, 400).
    InvalidInput(String),
    /// More than the device's messages per second (IOTDA.021101, 429).
    RateLimited,
    /// The body is larger than the largest payload (413).
    TooLarge,
    /// The store could not take it (503).
    Unavailable,
}

/// Which registration of a device, with which secrets: a device deleted and registered again
/// under the same id, or given a new secret, is another incarnation, and the tokens and the
/// session of the last one do not serve it.
#[derive(Clone, PartialEq, Eq)]
struct Incarnation {
    seq: i64,
    secrets: String,
}

impl Incarnation {
    fn of(device: &Device) -> Incarnation {
        let secrets = [&device.auth.secret, &device.auth.secondary_secret]
            .map(|s| s.as_deref().unwrap_or_default())
            .join("\n");
        Incarnation {
            seq: device.seq,
            // A digest, so the secrets themselves are not kept beside the tokens.
            secrets: crate::auth::device_password(&secrets, "https-token"),
        }
    }
}

struct Token {
    device_id: String,
    incarnation: Incarnation,
    expires_at: i64,
}

/// A device's tokens: IoTDA keeps the current one and, for 30 s after a new one, the previous.
#[derive(Default)]
struct Tokens {
    by_token: HashMap<String, Token>,
    current: HashMap<String, String>,
    previous: HashMap<String, String>,
}

struct CachedSession {
    incarnation: Incarnation,
    session: Arc<tokio::sync::Mutex<DeviceSession>>,
}

/// The HTTPS device side of the platform: tokens, and one uplink-only session per device (its
/// rate limit and its trace budget carry over from request to request).
pub struct HttpsAccess {
    platform: Arc<Platform>,
    tokens: Mutex<Tokens>,
    sessions: Mutex<HashMap<String, CachedSession>>,
}

impl HttpsAccess {
    pub fn new(platform: Arc<Platform>) -> Arc<HttpsAccess> {
        Arc::new(HttpsAccess {
            platform,
            tokens: Mutex::new(Tokens::default()),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// `POST /v5/device-auth`: the device's credentials as in an MQTT CONNECT; a new access token.
    pub async fn authenticate(
        &self,
        device_id: &str,
        sign_type: u8,
        timestamp: &str,
        password: &str,
    ) -> Result<String, HttpsRefusal> {
        let device = self.device(device_id).await?;
        let Some(device) = device else {
            return Err(HttpsRefusal::AuthenticationFailed("no such device"));
        };
        let checked =
            self.platform
                .check_credentials(&device, sign_type, timestamp, password.as_bytes());
        if let Err((refusal, why)) = checked {
            let detail = json!({ "reason": why, "access": "https" });
            self.platform
                .trace_now(device_id, "connect_refused", detail)
                .await;
            return Err(match refusal {
                Refusal::NotAuthorized => HttpsRefusal::Frozen,
                _ => HttpsRefusal::AuthenticationFailed(why),
            });
        }
        let now = self.platform.now();
        let token = hex::encode(crate::random_bytes::<24>());
        let new = Token {
            device_id: device.device_id.clone(),
            incarnation: Incarnation::of(&device),
            expires_at: now + TOKEN_LIFETIME_S as i64 * 1000,
        };
        lock(&self.tokens).issue(token.clone(), new, now);
        Ok(token)
    }

    /// A publish with `token` on `device_id`'s resource `uplink`; resolves once it is committed.
    pub async fn publish(
        &self,
        token: &str,
        device_id: &str,
        uplink: HttpsUplink,
        body: Bytes,
    ) -> Result<(), HttpsRefusal> {
        let now = self.platform.now();
        let incarnation = lock(&self.tokens)
            .by_token
            .get(token)
            .filter(|t| t.expires_at > now && t.device_id == device_id)
            .map(|t| t.incarnation.clone());
        let Some(incarnation) = incarnation else {
            return Err(HttpsRefusal::InvalidToken);
        };
        if body.len() > self.platform.config.max_payload {
            return Err(HttpsRefusal::TooLarge);
        }
        check_body(uplink, &body).map_err(HttpsRefusal::InvalidInput)?;
        let session = self.session(device_id, &incarnation).await?;
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: uplink.topic(device_id),
            pkid: 1,
            payload: body,
            properties: PublishProperties::default(),
        };
        // A task of its own: a client that hangs up must not cancel what follows the commit
        // (forwarding's wake-up, the bus event, the shadow comparison, the data time).
        let platform = self.platform.clone();
        let handled = tokio::spawn(async move {
            let mut session = session.lock().await;
            let outcome = settle(session.handle_uplink(publish).await).await;
            let device = session.device.clone();
            drop(session);
            // A device connected over MQTT meanwhile keeps its status by its connection.
            if outcome.is_ok() && !platform.registry.is_connected(&device.device_id) {
                platform.data_seen(&device).await;
            }
            outcome
        });
        handled.await.unwrap_or(Err(HttpsRefusal::Unavailable))
    }

    async fn device(&self, device_id: &str) -> Result<Option<Device>, HttpsRefusal> {
        self.platform
            .store
            .device(device_id.to_owned())
            .await
            .map_err(|_| HttpsRefusal::Unavailable)
    }

    /// The device's uplink-only session: made on its first publish after authenticating, and
    /// made again when the device was frozen or deleted meanwhile (which this refuses).
    async fn session(
        &self,
        device_id: &str,
        incarnation: &Incarnation,
    ) -> Result<Arc<tokio::sync::Mutex<DeviceSession>>, HttpsRefusal> {
        let device = match self.device(device_id).await? {
            Some(device) if device.frozen => return Err(HttpsRefusal::Frozen),
            Some(device) if Incarnation::of(&device) == *incarnation => device,
            // Deleted, registered again, or given another secret since the token was issued.
            _ => return Err(HttpsRefusal::InvalidToken),
        };
        let mut sessions = lock(&self.sessions);
        let stale = sessions
            .get(device_id)
            .is_none_or(|cached| cached.incarnation != *incarnation);
        if stale {
            let session = Arc::new(tokio::sync::Mutex::new(self.uplink_only(&device)));
            let incarnation = incarnation.clone();
            let cached = CachedSession {
                incarnation,
                session,
            };
            sessions.insert(device_id.to_owned(), cached);
        }
        let session = sessions.get(device_id).map(|c| c.session.clone());
        session.ok_or(HttpsRefusal::Unavailable)
    }

    /// A session on a link of its own, never registered: nothing is pushed to an HTTPS device
    /// (IoTDA's HTTPS access is uplink only), so messages and commands for it wait as for an
    /// offline device.
    fn uplink_only(&self, device: &Device) -> DeviceSession {
        let (outbox, _) = mpsc::channel(1);
        let link = Arc::new(Link::new(0, self.platform.now(), outbox));
        let mut session = DeviceSession::new(self.platform.clone(), device, link);
        session.takes_downlinks = false;
        session
    }
}

/// Refuses a report body that could not be stored, so the device hears why (a message takes
/// any bytes, as in IoTDA).
fn check_body(uplink: HttpsUplink, body: &[u8]) -> Result<(), String> {
    match uplink {
        HttpsUplink::MessagesUp => Ok(()),
        HttpsUplink::PropertiesReport => crate::report_parse::parse_report(body).map(|_| ()),
        HttpsUplink::SubDevicesReport => {
            let children = crate::report_parse::parse_sub_device_report(body)?;
            if children.len() > MAX_HTTPS_CHILDREN {
                return Err(format!(
                    "{} devices in one report; at most {MAX_HTTPS_CHILDREN}",
                    children.len()
                ));
            }
            Ok(())
        }
    }
}

impl Tokens {
    /// Makes `token` the device's current one; the current becomes the previous (usable 30 s
    /// more) and the one before that is dropped, so a device holds two tokens at most.
    fn issue(&mut self, token: String, new: Token, now: i64) {
        let device_id = new.device_id.clone();
        if let Some(dropped) = self.previous.remove(&device_id) {
            self.by_token.remove(&dropped);
        }
        if let Some(current) = self.current.remove(&device_id) {
            if let Some(entry) = self.by_token.get_mut(&current) {
                entry.expires_at = entry.expires_at.min(now + PREVIOUS_TOKEN_GRACE_MS);
            }
            self.previous.insert(device_id.clone(), current);
        }
        self.current.insert(device_id, token.clone());
        self.by_token.insert(token, new);
    }
}

/// What a publish's verdict means for the HTTP answer, once its commit (if any) is done.
async fn settle(verdict: PublishVerdict) -> Result<(), HttpsRefusal> {
    match verdict {
        PublishVerdict::Accept => Ok(()),
        PublishVerdict::AcceptAfter(commit) => match commit.await {
            reason::SUCCESS => Ok(()),
            _ => Err(HttpsRefusal::Unavailable),
        },
        PublishVerdict::Refuse(reason::QUOTA_EXCEEDED) => Err(HttpsRefusal::RateLimited),
        PublishVerdict::Disconnect(reason::PACKET_TOO_LARGE) => Err(HttpsRefusal::TooLarge),
        PublishVerdict::Discard(_) | PublishVerdict::Refuse(_) | PublishVerdict::Disconnect(_) => {
            Err(HttpsRefusal::InvalidInput(
                "the platform did not take the payload; the device's message trace says why"
                    .to_owned(),
            ))
        }
    }
}
