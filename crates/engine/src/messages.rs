//! Downlink messages: delivered at once to a connected device, otherwise cached (at most 20 per
//! device, one day by default) and delivered in order when it reconnects.

use std::sync::Arc;

use base64::Engine as _;
use ioda_mqtt::server::Delivery;
use ioda_store::DeviceMessage;
use ioda_types::{MessageStatus, PlatformEvent};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::downlink::{PushError, new_request_id};
use crate::topic::{messages_down_topic, user_topic};
use crate::{EngineError, Platform, invalid};

/// Cached messages kept per device; a newer one pushes the oldest out (FAILED, visibly).
pub const MESSAGE_CACHE: i64 = 20;
/// Largest downlink message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Default and largest time to live of a cached message, in minutes.
pub const MAX_TTL_MINUTES: i64 = 1440;

/// The error a message pushed out of a full cache carries.
pub const CACHE_FULL: (&str, &str) = (
    "IOTDA.014124",
    "The device's message cache is full; a newer message replaced this one.",
);

/// A message as an application gives it (`DeviceMessageRequest`).
#[derive(Debug, Clone, Default)]
pub struct MessageRequest {
    pub message_id: Option<String>,
    pub name: Option<String>,
    pub message: Value,
    pub encoding: Option<String>,
    pub payload_format: Option<String>,
    pub topic: Option<String>,
    pub topic_full_name: Option<String>,
    pub properties: Option<Value>,
    pub ttl: Option<i64>,
}

/// The bytes a message is sent as: IoTDA's standard envelope, or the message itself for `raw`.
pub(crate) fn payload_of(message: &DeviceMessage) -> Result<Vec<u8>, String> {
    if message.payload_format == "raw" {
        return match (&message.message, message.encoding.as_deref()) {
            (Value::String(text), Some("base64")) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| format!("message is not valid base64: {e}")),
            (Value::String(text), _) => Ok(text.as_bytes().to_vec()),
            (other, _) => Ok(other.to_string().into_bytes()),
        };
    }
    let envelope = json!({
        "object_device_id": message.device_id,
        "name": message.name,
        "id": message.message_id,
        "content": message.message,
    });
    Ok(envelope.to_string().into_bytes())
}

fn topic_suffix(topic: Option<String>) -> Result<Option<String>, EngineError> {
    let Some(topic) = topic else {
        return Ok(None);
    };
    // IoTDA takes the part after `$oc/devices/{id}/user/`; accept it with the `user/` prefix too.
    let suffix = topic.strip_prefix("user/").unwrap_or(&topic).to_owned();
    if suffix.is_empty() || suffix.len() > 128 || suffix.contains(['+', '#']) {
        return Err(invalid(
            "topic must be a custom topic name without wildcards",
        ));
    }
    Ok(Some(suffix))
}

impl Platform {
    /// Creates a message and delivers it now if the device is connected.
    pub async fn create_message(
        self: &Arc<Self>,
        project_id: &str,
        device_id: &str,
        request: MessageRequest,
    ) -> Result<DeviceMessage, EngineError> {
        let device = self.device(project_id, device_id).await?;
        if request.message.is_null() {
            return Err(invalid("message is required"));
        }
        if request.topic_full_name.is_some() {
            return Err(invalid(
                "topic_full_name (topics outside $oc) is not supported yet; use topic",
            ));
        }
        let encoding = request.encoding.filter(|e| e != "none");
        if encoding.as_deref().is_some_and(|e| e != "base64") {
            return Err(invalid("encoding must be none or base64"));
        }
        let payload_format = request.payload_format.unwrap_or_else(|| "standard".into());
        if !matches!(payload_format.as_str(), "standard" | "raw") {
            return Err(invalid("payload_format must be standard or raw"));
        }
        // Through its gateway a child is named only by the standard envelope's
        // `object_device_id`: raw bytes would reach the gateway as if meant for itself.
        if payload_format == "raw" && device.gateway_id != device.device_id {
            return Err(invalid(
                "a child device's messages go through its gateway, which only the standard payload_format can name it to",
            ));
        }
        let ttl_minutes = request.ttl.unwrap_or(MAX_TTL_MINUTES);
        // ttl 0 means "do not cache": delivered now or not at all.
        if !(0..=MAX_TTL_MINUTES).contains(&ttl_minutes) {
            return Err(invalid(format!(
                "ttl must be between 0 and {MAX_TTL_MINUTES} minutes"
            )));
        }
        if request
            .message_id
            .as_ref()
            .is_some_and(|id| id.is_empty() || id.len() > 100)
        {
            return Err(invalid("message_id must be 1 to 100 characters"));
        }
        let now = self.now();
        let message = DeviceMessage {
            seq: 0,
            message_id: request.message_id.unwrap_or_else(|| new_request_id(now)),
            project_id: project_id.to_owned(),
            device_id: device_id.to_owned(),
            name: request.name,
            message: request.message,
            encoding,
            payload_format,
            topic: topic_suffix(request.topic)?,
            properties: request.properties,
            ttl_minutes,
            status: MessageStatus::Pending,
            error: None,
            created_at: now,
            finished_at: None,
        };
        let size = payload_of(&message).map_err(invalid)?.len();
        if size > MAX_MESSAGE_BYTES {
            return Err(invalid(format!(
                "the message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}"
            )));
        }
        // A child without a connection of its own is reached through its gateway's.
        let reach = self.link_to(&device);
        if let (Some(suffix), Some((via, link))) = (&message.topic, &reach)
            && !is_subscribed(link, &user_topic(via, suffix))
        {
            return Err(EngineError::NotSubscribed);
        }
        let overflow = (CACHE_FULL.0.to_owned(), CACHE_FULL.1.to_owned());
        let (message, evicted) = self
            .store
            .insert_message(message, MESSAGE_CACHE, overflow)
            .await
            .map_err(|e| match e {
                ioda_store::StoreError::Conflict(_) => {
                    EngineError::Conflict("message_id already exists for this device".into())
                }
                other => other.into(),
            })?;
        if let Some(evicted) = evicted {
            self.message_event(&evicted).await;
        }
        self.message_event(&message).await;
        if message.ttl_minutes == 0 && reach.is_none() {
            let error = (
                "IOTDA.014016".to_owned(),
                "The device is offline and the message may not be cached (ttl 0).".to_owned(),
            );
            self.finish_message(message.clone(), MessageStatus::Failed, Some(error))
                .await;
            return Ok(self
                .store
                .message(device_id.to_owned(), message.message_id.clone())
                .await?
                .unwrap_or(message));
        }
        if let Some((_, link)) = reach {
            let _turn = link.delivery.lock().await;
            // Until the connection's queue is delivered, the message waits for it, behind the
            // messages cached before it (one that may not be cached, ttl 0, goes now).
            if !link.state().queue_delivered && message.ttl_minutes != 0 {
                return Ok(message);
            }
            let current = self
                .store
                .message(device_id.to_owned(), message.message_id.clone())
                .await?
                .unwrap_or(message);
            if current.status == MessageStatus::Pending {
                self.deliver_message(current.clone()).await;
            }
            return Ok(self
                .store
                .message(device_id.to_owned(), current.message_id.clone())
                .await?
                .unwrap_or(current));
        }
        Ok(message)
    }

    /// One message of a device.
    pub async fn device_message(
        &self,
        project_id: &str,
        device_id: &str,
        message_id: &str,
    ) -> Result<DeviceMessage, EngineError> {
        self.device(project_id, device_id).await?;
        self.store
            .message(device_id.to_owned(), message_id.to_owned())
            .await?
            .ok_or(EngineError::NotFound("message"))
    }

    /// A device's messages, newest first.
    pub async fn device_messages(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<Vec<DeviceMessage>, EngineError> {
        self.device(project_id, device_id).await?;
        Ok(self.store.list_messages(device_id.to_owned(), 100).await?)
    }

    async fn message_event(&self, message: &DeviceMessage) {
        let detail = json!({ "message_id": message.message_id, "status": message.status.as_str(), "error": message.error.as_ref().map(|e| &e.1) });
        self.trace_downlink(&message.device_id, "message_status", detail)
            .await;
        let device = self
            .device_ref(&message.project_id, &message.device_id)
            .await;
        self.bus.publish(PlatformEvent::MessageStatusChanged {
            device,
            message_id: message.message_id.clone(),
            status: message.status,
            at: message.finished_at.unwrap_or(message.created_at),
        });
    }

    /// Moves a pending message to a final status and announces it.
    pub(crate) async fn finish_message(
        &self,
        message: DeviceMessage,
        status: MessageStatus,
        error: Option<(String, String)>,
    ) {
        let now = self.now();
        match self
            .store
            .finish_message(message.seq, status, error.clone(), now)
            .await
        {
            Ok(true) => {
                self.message_event(&DeviceMessage {
                    status,
                    error,
                    finished_at: Some(now),
                    ..message
                })
                .await
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, message_id = %message.message_id, "could not record a message status")
            }
        }
    }

    /// Records what became of a message handed to the device's connection; nothing is known when
    /// the connection closed first, and the message stays PENDING for the next connection.
    async fn settle_message(
        &self,
        message: DeviceMessage,
        delivery: Result<Delivery, oneshot::error::RecvError>,
    ) {
        match delivery {
            Ok(Delivery::Written | Delivery::Acknowledged) => {
                self.finish_message(message, MessageStatus::Delivered, None)
                    .await
            }
            Ok(Delivery::TooLarge { size, limit }) => {
                let reason = format!(
                    "the message is {size} bytes on the wire; the device accepts at most {limit} \
                     (its MQTT 5 Maximum Packet Size)"
                );
                let error = Some(("IOTDA.000006".to_owned(), reason));
                self.finish_message(message, MessageStatus::Failed, error)
                    .await
            }
            Err(_) => {}
        }
    }

    /// Sends a pending message if the device is connected; it is DELIVERED once written (QoS 0) or
    /// acknowledged (QoS 1), and stays PENDING otherwise.
    pub(crate) async fn deliver_message(self: &Arc<Self>, message: DeviceMessage) {
        let Some((via, link)) = self.link_to_id(&message.device_id).await else {
            return;
        };
        // To a child through its gateway: on the gateway's topics, `object_device_id` naming
        // the child.
        let (topic, custom) = match &message.topic {
            Some(suffix) => (user_topic(&via, suffix), true),
            None => (messages_down_topic(&via), false),
        };
        let payload = match payload_of(&message) {
            Ok(payload) => payload,
            Err(error) => {
                self.finish_message(
                    message,
                    MessageStatus::Failed,
                    Some(("IOTDA.000006".into(), error)),
                )
                .await;
                return;
            }
        };
        {
            let mut state = link.state();
            let key = (message.device_id.clone(), message.message_id.clone());
            if state.messages_in_flight.contains(&key) {
                return;
            }
            state.messages_in_flight.push(key);
        }
        let in_flight = InFlight {
            link,
            key: (message.device_id.clone(), message.message_id.clone()),
        };
        match self.push(&via, topic, payload, custom).await {
            Ok(delivery) => {
                let platform = self.clone();
                tokio::spawn(async move {
                    // Settled in the store first, so a delivery reading the pending messages
                    // meanwhile still finds it in flight.
                    platform.settle_message(message, delivery.await).await;
                    drop(in_flight);
                });
            }
            Err(PushError::Offline | PushError::NotSubscribed) => drop(in_flight),
        }
    }
}

/// Whether a connection holds a subscription matching `topic`.
fn is_subscribed(link: &crate::registry::Link, topic: &str) -> bool {
    link.state()
        .subscriptions
        .iter()
        .any(|(f, _)| crate::topic::filter_matches(f, topic))
}

/// A message pushed on a connection and not settled yet; no longer once this is dropped, however
/// the settling ends.
struct InFlight {
    link: Arc<crate::registry::Link>,
    /// Device and message id.
    key: (String, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let key = &self.key;
        self.link.state().messages_in_flight.retain(|m| m != key);
    }
}
