//! NATS_FORWARDING: publish each message to a NATS subject; with `jetstream: true` the publish
//! counts only once the stream has stored it.

use std::time::Duration;

use serde_json::Value;

use crate::connector::BatchFailure;

/// Where and how to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSpec {
    pub url: String,
    pub subject: String,
    pub jetstream: bool,
}

/// Reads `channel_detail.nats_forwarding`.
pub fn spec(detail: &Value) -> Result<NatsSpec, String> {
    let d = detail
        .get("nats_forwarding")
        .ok_or("channel_detail.nats_forwarding is required")?;
    let url = d
        .get("url")
        .and_then(Value::as_str)
        .ok_or("nats_forwarding.url is required")?;
    if !url.starts_with("nats://") || url.len() <= "nats://".len() {
        return Err(format!(
            "nats_forwarding.url must look like nats://host:4222, got {url:?}"
        ));
    }
    let subject = d
        .get("subject")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && !s.contains(['*', '>', ' ']))
        .ok_or("nats_forwarding.subject must be a subject without wildcards")?;
    Ok(NatsSpec {
        url: url.to_owned(),
        subject: subject.to_owned(),
        jetstream: d.get("jetstream").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// A live connection.
#[derive(Debug)]
pub struct NatsSink {
    spec: NatsSpec,
    /// The spec's subject, made once: a `Subject` clones by reference count, where publishing to
    /// the spec's `String` would copy it twice per message.
    subject: async_nats::Subject,
    client: async_nats::Client,
}

impl NatsSink {
    pub async fn open(spec: &NatsSpec, timeout: Duration) -> Result<NatsSink, String> {
        let options = async_nats::ConnectOptions::new()
            .connection_timeout(timeout)
            .retry_on_initial_connect();
        let connect = options.connect(spec.url.as_str());
        let client = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("NATS server {} did not answer", spec.url))?
            .map_err(|e| format!("NATS server {}: {e}", spec.url))?;
        Ok(NatsSink {
            spec: spec.clone(),
            subject: async_nats::Subject::from(spec.subject.as_str()),
            client,
        })
    }

    /// Publishes messages in order and confirms them together: core NATS by one flush (a
    /// failure confirms none of them: they are delivered again, at least once), JetStream by
    /// each message's acknowledgement (the ones before the first failure count).
    pub async fn publish_all(
        &mut self,
        payloads: &[&str],
        timeout: Duration,
    ) -> Result<(), BatchFailure> {
        let late = || BatchFailure {
            confirmed: 0,
            error: "NATS did not confirm in time".to_owned(),
        };
        if self.spec.jetstream {
            return tokio::time::timeout(timeout, self.publish_all_stored(payloads))
                .await
                .map_err(|_| late())?;
        }
        let work = async {
            for payload in payloads {
                let data = bytes::Bytes::copy_from_slice(payload.as_bytes());
                self.client
                    .publish(self.subject.clone(), data)
                    .await
                    .map_err(|e| format!("NATS: {e}"))?;
            }
            self.client.flush().await.map_err(|e| format!("NATS: {e}"))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| late())?
            .map_err(|error| BatchFailure {
                confirmed: 0,
                error,
            })
    }

    async fn publish_all_stored(&mut self, payloads: &[&str]) -> Result<(), BatchFailure> {
        let stream = async_nats::jetstream::new(self.client.clone());
        let mut acks = Vec::with_capacity(payloads.len());
        let mut sent = Ok(());
        for payload in payloads {
            let data = bytes::Bytes::copy_from_slice(payload.as_bytes());
            match stream.publish(self.subject.clone(), data).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    sent = Err(format!("JetStream: {e}"));
                    break;
                }
            }
        }
        // What was sent counts as far as the stream acknowledges it, in order.
        let sent_count = acks.len();
        for (confirmed, ack) in acks.into_iter().enumerate() {
            if let Err(e) = ack.await {
                return Err(BatchFailure {
                    confirmed,
                    error: format!("JetStream did not store the message: {e}"),
                });
            }
        }
        sent.map_err(|error| BatchFailure {
            confirmed: sent_count,
            error,
        })
    }
}
