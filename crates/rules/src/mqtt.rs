//! MQTT_FORWARDING: publish each message to a topic on an external MQTT broker, at QoS 1 (waiting
//! for the broker's PUBACK) or QoS 0.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;

/// Where and how to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSpec {
    pub host: String,
    pub port: u16,
    pub topic: String,
    pub qos: u8,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Reads `channel_detail.mqtt_forwarding`.
pub fn spec(detail: &Value) -> Result<MqttSpec, String> {
    let d = detail
        .get("mqtt_forwarding")
        .ok_or("channel_detail.mqtt_forwarding is required")?;
    let text = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_owned);
    let host = text("host")
        .filter(|h| !h.is_empty())
        .ok_or("mqtt_forwarding.host is required")?;
    let port = d.get("port").and_then(Value::as_u64).unwrap_or(1883);
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or("mqtt_forwarding.port must be 1 to 65535")?;
    let topic = text("topic")
        .filter(|t| !t.is_empty() && !t.contains(['+', '#']))
        .ok_or("mqtt_forwarding.topic must be a topic name without wildcards")?;
    let qos = d.get("qos").and_then(Value::as_u64).unwrap_or(1);
    if qos > 1 {
        return Err("mqtt_forwarding.qos must be 0 or 1".into());
    }
    Ok(MqttSpec {
        host,
        port,
        topic,
        qos: qos as u8,
        username: text("username"),
        password: text("password"),
    })
}

/// A live connection to the broker.
pub struct MqttSink {
    spec: MqttSpec,
    client: AsyncClient,
    events: EventLoop,
}

impl std::fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSink")
            .field("spec", &self.spec)
            .finish()
    }
}

impl MqttSink {
    /// Connects and waits for the CONNACK.
    pub async fn open(spec: &MqttSpec, timeout: Duration) -> Result<MqttSink, String> {
        let mut bytes = [0u8; 6];
        let _ = getrandom::fill(&mut bytes);
        let client_id = format!(
            "ioda-forward-{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let mut options = MqttOptions::new(client_id, spec.host.clone(), spec.port);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some(user) = &spec.username {
            options.set_credentials(user.clone(), spec.password.clone().unwrap_or_default());
        }
        let (client, mut events) = AsyncClient::new(options, 16);
        let connected = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("MQTT broker {}:{}: {e}", spec.host, spec.port)),
                }
            }
        };
        tokio::time::timeout(timeout, connected)
            .await
            .map_err(|_| format!("MQTT broker {}:{} did not answer", spec.host, spec.port))??;
        Ok(MqttSink {
            spec: spec.clone(),
            client,
            events,
        })
    }

    /// Publishes one message; at QoS 1 it counts as delivered on the broker's PUBACK.
    pub async fn publish(&mut self, payload: &str, timeout: Duration) -> Result<(), String> {
        let qos = if self.spec.qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        self.client
            .publish(
                self.spec.topic.clone(),
                qos,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let events = &mut self.events;
        let done = async {
            let mut sent = None;
            loop {
                match events.poll().await.map_err(|e| format!("MQTT: {e}"))? {
                    Event::Outgoing(Outgoing::Publish(pkid)) if qos == QoS::AtMostOnce => {
                        return Ok::<_, String>(pkid);
                    }
                    Event::Outgoing(Outgoing::Publish(pkid)) => sent = Some(pkid),
                    Event::Incoming(Packet::PubAck(ack)) if Some(ack.pkid) == sent => {
                        return Ok(ack.pkid);
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, done)
            .await
            .map_err(|_| "MQTT broker did not acknowledge in time".to_owned())??;
        Ok(())
    }
}
