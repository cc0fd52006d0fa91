//! The channels an action can forward to. Each channel lives in its own module behind a cargo
//! feature; this module is the one place that knows them all. A channel is checked (`Spec::parse`)
//! when an action is created, connected (`Connector::open`) by the action's worker, and reconnected
//! after a failure.

use std::sync::Arc;
use std::time::Duration;

use ioda_store::QueuedMessage;
use serde_json::Value;

/// The channels this build offers.
pub const CHANNELS: &[&str] = &[
    #[cfg(feature = "http")]
    "HTTP_FORWARDING",
    #[cfg(feature = "mqtt")]
    "MQTT_FORWARDING",
    #[cfg(feature = "nats")]
    "NATS_FORWARDING",
    #[cfg(feature = "postgres")]
    "POSTGRESQL_FORWARDING",
    #[cfg(feature = "rabbitmq")]
    "RABBITMQ_FORWARDING",
];

/// A checked channel configuration.
#[derive(Debug, Clone)]
pub enum Spec {
    #[cfg(feature = "http")]
    Http(crate::http::Target),
    #[cfg(feature = "mqtt")]
    Mqtt(crate::mqtt::MqttSpec),
    #[cfg(feature = "nats")]
    Nats(crate::nats::NatsSpec),
    #[cfg(feature = "postgres")]
    Postgres(crate::postgres::PgSpec),
    #[cfg(feature = "rabbitmq")]
    Rabbit(crate::rabbitmq::RabbitSpec),
}

impl Spec {
    /// Checks a channel and its details; the error says what is wrong.
    pub fn parse(channel: &str, detail: &Value) -> Result<Spec, String> {
        match channel {
            #[cfg(feature = "http")]
            "HTTP_FORWARDING" => {
                let url = detail
                    .pointer("/http_forwarding/url")
                    .and_then(Value::as_str)
                    .ok_or("channel_detail.http_forwarding.url is required")?;
                let http = detail.get("http_forwarding").unwrap_or(&Value::Null);
                Ok(Spec::Http(crate::http::parse_url(url, http)?))
            }
            #[cfg(feature = "mqtt")]
            "MQTT_FORWARDING" => Ok(Spec::Mqtt(crate::mqtt::spec(detail)?)),
            #[cfg(feature = "nats")]
            "NATS_FORWARDING" => Ok(Spec::Nats(crate::nats::spec(detail)?)),
            #[cfg(feature = "postgres")]
            "POSTGRESQL_FORWARDING" => Ok(Spec::Postgres(crate::postgres::spec(detail)?)),
            #[cfg(feature = "rabbitmq")]
            "RABBITMQ_FORWARDING" => Ok(Spec::Rabbit(crate::rabbitmq::spec(detail)?)),
            other => Err(format!(
                "channel {other} is not available; this build offers {}",
                CHANNELS.join(", ")
            )),
        }
    }

    /// Whether the channel keeps a connection to a broker or database (checked at creation).
    pub fn is_broker(&self) -> bool {
        match self {
            #[cfg(feature = "http")]
            Spec::Http(_) => false,
            #[allow(unreachable_patterns)]
            _ => true,
        }
    }
}

/// A connected channel.
#[derive(Debug)]
pub enum Connector {
    #[cfg(feature = "http")]
    Http(Box<crate::http::HttpSink>),
    #[cfg(feature = "mqtt")]
    Mqtt(Box<crate::mqtt::MqttSink>),
    #[cfg(feature = "nats")]
    Nats(crate::nats::NatsSink),
    #[cfg(feature = "postgres")]
    Postgres(crate::postgres::PgSink),
    #[cfg(feature = "rabbitmq")]
    Rabbit(Box<crate::rabbitmq::RabbitSink>),
}

impl Connector {
    /// Connects to the channel's target.
    pub async fn open(spec: &Spec, timeout: Duration) -> Result<Connector, String> {
        Ok(match spec {
            #[cfg(feature = "http")]
            Spec::Http(target) => {
                Connector::Http(Box::new(crate::http::HttpSink::new(target.clone())))
            }
            #[cfg(feature = "mqtt")]
            Spec::Mqtt(spec) => {
                Connector::Mqtt(Box::new(crate::mqtt::MqttSink::open(spec, timeout).await?))
            }
            #[cfg(feature = "nats")]
            Spec::Nats(spec) => Connector::Nats(crate::nats::NatsSink::open(spec, timeout).await?),
            #[cfg(feature = "postgres")]
            Spec::Postgres(spec) => {
                Connector::Postgres(crate::postgres::PgSink::open(spec, timeout).await?)
            }
            #[cfg(feature = "rabbitmq")]
            Spec::Rabbit(spec) => Connector::Rabbit(Box::new(
                crate::rabbitmq::RabbitSink::open(spec, timeout).await?,
            )),
        })
    }

    /// Delivers one message (for MQTT, NATS and RabbitMQ, a batch of one).
    async fn deliver(&mut self, message: &QueuedMessage, timeout: Duration) -> Result<(), String> {
        match self {
            #[cfg(feature = "http")]
            Connector::Http(sink) => {
                sink.post(&message.message_id, &message.payload, timeout)
                    .await
            }
            #[cfg(feature = "mqtt")]
            Connector::Mqtt(sink) => sink
                .publish_all(&[&message.payload], timeout)
                .await
                .map_err(|failure| failure.error),
            #[cfg(feature = "nats")]
            Connector::Nats(sink) => sink
                .publish_all(&[&message.payload], timeout)
                .await
                .map_err(|failure| failure.error),
            #[cfg(feature = "postgres")]
            Connector::Postgres(sink) => sink.insert(&message.payload, timeout).await,
            #[cfg(feature = "rabbitmq")]
            Connector::Rabbit(sink) => sink
                .publish_all(&[(&message.message_id, &message.payload)], timeout)
                .await
                .map_err(|failure| failure.error),
        }
    }
}

/// What a batch delivery confirmed before it failed: the first `confirmed` messages arrived, the
/// next one failed with `error`, and those after it count as not delivered.
#[derive(Debug, PartialEq, Eq)]
pub struct BatchFailure {
    pub confirmed: usize,
    pub error: String,
}

impl Connector {
    /// Delivers messages in order. MQTT, NATS and RabbitMQ send them all, then take their
    /// confirmations (a round trip per batch instead of per message); HTTP and PostgreSQL
    /// deliver them one by one, each confirmed before the next.
    pub async fn deliver_all(
        &mut self,
        messages: &[Arc<QueuedMessage>],
        timeout: Duration,
    ) -> Result<(), BatchFailure> {
        #[cfg(feature = "mqtt")]
        if let Connector::Mqtt(sink) = self {
            return sink.publish_all(&payloads(messages), timeout).await;
        }
        #[cfg(feature = "nats")]
        if let Connector::Nats(sink) = self {
            return sink.publish_all(&payloads(messages), timeout).await;
        }
        #[cfg(feature = "rabbitmq")]
        if let Connector::Rabbit(sink) = self {
            let messages: Vec<(&str, &str)> = messages
                .iter()
                .map(|m| (m.message_id.as_str(), m.payload.as_str()))
                .collect();
            return sink.publish_all(&messages, timeout).await;
        }
        for (confirmed, message) in messages.iter().enumerate() {
            self.deliver(message, timeout)
                .await
                .map_err(|error| BatchFailure { confirmed, error })?;
        }
        Ok(())
    }
}

/// The messages' payloads, for the channels that take a batch of texts.
#[cfg(any(feature = "mqtt", feature = "nats"))]
fn payloads(messages: &[Arc<QueuedMessage>]) -> Vec<&str> {
    messages.iter().map(|m| m.payload.as_str()).collect()
}
