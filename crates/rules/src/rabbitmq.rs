//! RABBITMQ_FORWARDING: publish each message to a RabbitMQ exchange with a routing key (AMQP 0.9.1).
//! Publishes are mandatory and confirmed: a message counts as delivered only when the broker has
//! accepted it and routed it to at least one queue; otherwise the attempt fails and is retried.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use serde_json::Value;

use crate::connector::BatchFailure;

/// Where to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitSpec {
    pub url: String,
    pub exchange: String,
    pub routing_key: String,
}

/// Reads `channel_detail.rabbitmq_forwarding`: `{url, exchange, routing_key}`.
pub fn spec(detail: &Value) -> Result<RabbitSpec, String> {
    let d = detail
        .get("rabbitmq_forwarding")
        .ok_or("channel_detail.rabbitmq_forwarding is required")?;
    let url = d
        .get("url")
        .and_then(Value::as_str)
        .filter(|u| u.starts_with("amqp://"))
        .ok_or("rabbitmq_forwarding.url must look like amqp://user:password@host:5672/%2f")?;
    let exchange = d.get("exchange").and_then(Value::as_str).unwrap_or("");
    let routing_key = d
        .get("routing_key")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or("rabbitmq_forwarding.routing_key is required")?;
    Ok(RabbitSpec {
        url: url.to_owned(),
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
    })
}

/// A live, confirming channel.
pub struct RabbitSink {
    spec: RabbitSpec,
    _connection: Connection,
    channel: Channel,
}

impl std::fmt::Debug for RabbitSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitSink")
            .field("exchange", &self.spec.exchange)
            .field("routing_key", &self.spec.routing_key)
            .finish()
    }
}

impl RabbitSink {
    pub async fn open(spec: &RabbitSpec, timeout: Duration) -> Result<RabbitSink, String> {
        let work = async {
            let connection = Connection::connect(&spec.url, ConnectionProperties::default())
                .await
                .map_err(|e| format!("RabbitMQ: {e}"))?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| format!("RabbitMQ: {e}"))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| format!("RabbitMQ: {e}"))?;
            Ok::<_, String>(RabbitSink {
                spec: spec.clone(),
                _connection: connection,
                channel,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("RabbitMQ at {} did not answer", spec.url))?
    }

    /// Publishes messages in order and then waits for their confirms, so a batch costs one
    /// round trip instead of one per message; the messages before the first one the broker
    /// refuses (or that a failure leaves unconfirmed) count as delivered.
    pub async fn publish_all(
        &mut self,
        messages: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<(), BatchFailure> {
        let work = async {
            let mut confirms = Vec::with_capacity(messages.len());
            let mut sent = Ok(());
            for (message_id, payload) in messages {
                match self.send(message_id, payload).await {
                    Ok(confirm) => confirms.push(confirm),
                    Err(error) => {
                        sent = Err(error);
                        break;
                    }
                }
            }
            let sent_count = confirms.len();
            for (confirmed, confirm) in confirms.into_iter().enumerate() {
                let outcome = confirm.await.map_err(|e| format!("RabbitMQ: {e}"));
                if let Err(error) = outcome.and_then(accepted) {
                    return Err(BatchFailure { confirmed, error });
                }
            }
            sent.map_err(|error| BatchFailure {
                confirmed: sent_count,
                error,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| BatchFailure {
                confirmed: 0,
                error: "RabbitMQ did not confirm in time".to_owned(),
            })?
    }

    /// Sends one message; the returned future resolves with the broker's confirm.
    async fn send(&self, message_id: &str, payload: &str) -> Result<PublisherConfirm, String> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_delivery_mode(2);
        self.channel
            .basic_publish(
                self.spec.exchange.as_str().into(),
                self.spec.routing_key.as_str().into(),
                options,
                payload.as_bytes(),
                properties,
            )
            .await
            .map_err(|e| format!("RabbitMQ: {e}"))
    }
}

/// A confirm that means the message is in a queue: acknowledged, and not returned as unroutable.
fn accepted(confirm: Confirmation) -> Result<(), String> {
    if !confirm.is_ack() {
        return Err("RabbitMQ refused the message (nack)".to_owned());
    }
    if let Some(returned) = confirm.take_message() {
        return Err(format!(
            "RabbitMQ could not route the message: {}",
            returned.reply_text
        ));
    }
    Ok(())
}
