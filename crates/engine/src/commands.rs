//! Commands and property requests: synchronous calls that wait for the device's answer, and
//! asynchronous commands with their persisted lifecycle and resend schedule.

use std::sync::Arc;
use std::time::Duration;

use ioda_store::{AsyncCommand, CommandFilter};
use ioda_types::downlink::{MAX_SENDS, resend_window};
use ioda_types::event::DeviceRef;
use ioda_types::validate::check_value;
use ioda_types::{CommandStatus, Device, PlatformEvent, Product};
use serde_json::{Value, json};

use crate::downlink::{ReplyKind, new_request_id};
use crate::topic::{command_topic, properties_get_topic, properties_set_topic};
use crate::{EngineError, Platform, invalid, random_bytes};

/// Default wait for a synchronous answer, and the range a caller may choose from.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(20);
pub const SYNC_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=60;
/// Longest time an asynchronous command may stay cached (48 h), and the default.
pub const MAX_EXPIRE_SECS: i64 = 172_800;

/// A command as an application gives it.
#[derive(Debug, Clone, Default)]
pub struct CommandRequest {
    pub service_id: Option<String>,
    pub command_name: Option<String>,
    pub paras: Value,
}

/// An asynchronous command request.
#[derive(Debug, Clone, Default)]
pub struct AsyncCommandRequest {
    pub command: CommandRequest,
    pub expire_time: Option<i64>,
    pub send_strategy: Option<String>,
    /// Where each status change is POSTed (checked by the caller).
    pub callback_url: Option<String>,
}

/// Checks a command against the product model: the command must exist when named, its required
/// parameters must be present, and every parameter must be declared and valid.
fn check_command(product: &Product, request: &CommandRequest) -> Result<(), EngineError> {
    let Value::Object(paras) = &request.paras else {
        return Err(invalid("paras must be a JSON object"));
    };
    let Some(name) = request.command_name.as_deref() else {
        return Ok(());
    };
    let services = product.service_capabilities.iter().filter(|s| {
        request
            .service_id
            .as_deref()
            .is_none_or(|id| id == s.service_id)
    });
    let command = services
        .flat_map(|s| s.commands.as_deref().unwrap_or_default())
        .find(|c| c.command_name == name)
        .ok_or_else(|| invalid(format!("command '{name}' is not in the product model")))?;
    let declared = command.paras.as_deref().unwrap_or_default();
    for para in declared {
        match paras.get(&para.para_name) {
            None if para.required == Some(true) => {
                return Err(invalid(format!("paras.{} is required", para.para_name)));
            }
            None => {}
            Some(value) => check_value(&para.constraints(), value)
                .map_err(|r| invalid(format!("paras.{}: {r}", para.para_name)))?,
        }
    }
    if let Some(unknown) = paras
        .keys()
        .find(|k| declared.iter().all(|p| &p.para_name != *k))
    {
        return Err(invalid(format!(
            "paras.{unknown} is not a parameter of '{name}'"
        )));
    }
    Ok(())
}

fn command_body(device_id: &str, request: &CommandRequest) -> Value {
    json!({
        "object_device_id": device_id,
        "service_id": request.service_id,
        "command_name": request.command_name,
        "paras": request.paras,
    })
}

/// A random instant within `window` after `from`.
fn jittered(from: i64, (low, high): (i64, i64)) -> i64 {
    let spread = (high - low).max(1) as u64;
    from + low + (u64::from_le_bytes(random_bytes()) % spread) as i64
}

/// A command's result code as the device reported it (absent means success).
fn succeeded(result: &Value) -> bool {
    result
        .get("result_code")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        == 0
}

impl Platform {
    /// A command on the wire: JSON, or the codec's bytes when the product declares binary data
    /// and has a codec.
    fn command_payload(
        &self,
        product: &Product,
        device_id: &str,
        request: &CommandRequest,
        mid: Option<u16>,
    ) -> Result<Vec<u8>, EngineError> {
        if product.data_format == "binary"
            && let Some(codec) = self.product_codec(product)
        {
            let command = json!({ "service_id": request.service_id, "command_name": request.command_name, "paras": request.paras, "mid": mid });
            return codec.encode(&command).map_err(|e| invalid(e.to_string()));
        }
        Ok(command_body(device_id, request).to_string().into_bytes())
    }

    async fn device_and_product(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<(Device, Arc<Product>), EngineError> {
        let device = self.device(project_id, device_id).await?;
        let product = self
            .product_of(&device)
            .ok_or(EngineError::NotFound("product"))?;
        // Through its gateway a child is named by `object_device_id` in the JSON: a codec's
        // bytes would reach the gateway as if meant for itself.
        if device.gateway_id != device.device_id
            && product.data_format == "binary"
            && self.product_codec(&product).is_some()
        {
            return Err(invalid(
                "a child device of a binary product cannot be named to its gateway: commands and properties go to children as JSON",
            ));
        }
        Ok((device, product))
    }

    /// Sends a synchronous command and returns the command id and the device's answer.
    pub async fn send_command(
        &self,
        project_id: &str,
        device_id: &str,
        request: CommandRequest,
        timeout: Duration,
    ) -> Result<(String, Value), EngineError> {
        let (device, product) = self.device_and_product(project_id, device_id).await?;
        if product.protocol_type == "CoAP" {
            // As in IoTDA: an NB-IoT device sleeps and answers later, on its data channel.
            return Err(invalid(
                "LwM2M/CoAP devices take asynchronous commands only: use POST .../async-commands",
            ));
        }
        check_command(&product, &request)?;
        let payload = self.command_payload(&product, device_id, &request, None)?;
        let (command_id, response) = self
            .request(&device, ReplyKind::Command, command_topic, payload, timeout)
            .await?;
        self.bus.publish(PlatformEvent::CommandResponded {
            device: device.reference(),
            command_id: command_id.clone(),
            response: response.clone(),
            at: self.now(),
        });
        Ok((command_id, response))
    }

    /// Sets properties on a device and returns the request id and the device's answer.
    pub async fn set_properties(
        &self,
        project_id: &str,
        device_id: &str,
        services: Value,
        timeout: Duration,
    ) -> Result<(String, Value), EngineError> {
        let (device, product) = self.device_and_product(project_id, device_id).await?;
        let Value::Array(list) = &services else {
            return Err(invalid("services must be an array"));
        };
        for entry in list {
            let service_id = entry
                .get("service_id")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("services[].service_id is required"))?;
            let properties = entry
                .get("properties")
                .and_then(Value::as_object)
                .ok_or_else(|| invalid("services[].properties must be an object"))?;
            crate::devices::check_desired(
                &product,
                vec![(service_id.to_owned(), Value::Object(properties.clone()))],
            )?;
        }
        let body = json!({ "object_device_id": device_id, "services": services });
        self.request(
            &device,
            ReplyKind::PropertiesSet,
            properties_set_topic,
            body.to_string().into_bytes(),
            timeout,
        )
        .await
    }

    /// Asks a device for its current properties (of one service, or all).
    pub async fn get_properties(
        &self,
        project_id: &str,
        device_id: &str,
        service_id: Option<String>,
        timeout: Duration,
    ) -> Result<(String, Value), EngineError> {
        let (device, product) = self.device_and_product(project_id, device_id).await?;
        if let Some(id) = &service_id
            && product.service(id).is_none()
        {
            return Err(invalid(format!(
                "service '{id}' is not in the product model"
            )));
        }
        let body = json!({ "object_device_id": device_id, "service_id": service_id });
        self.request(
            &device,
            ReplyKind::PropertiesGet,
            properties_get_topic,
            body.to_string().into_bytes(),
            timeout,
        )
        .await
    }

    /// Creates an asynchronous command and, if the device can take it now, sends it.
    pub async fn create_async_command(
        self: &Arc<Self>,
        project_id: &str,
        device_id: &str,
        request: AsyncCommandRequest,
    ) -> Result<AsyncCommand, EngineError> {
        let (device, product) = self.device_and_product(project_id, device_id).await?;
        check_command(&product, &request.command)?;
        // A binary device's command must encode now, not fail later at each resend.
        self.command_payload(&product, device_id, &request.command, None)?;
        let expire_time = request.expire_time.unwrap_or(MAX_EXPIRE_SECS);
        if !(0..=MAX_EXPIRE_SECS).contains(&expire_time) {
            return Err(invalid(format!(
                "expire_time must be between 0 and {MAX_EXPIRE_SECS}"
            )));
        }
        let send_strategy = request
            .send_strategy
            .unwrap_or_else(|| "immediately".into());
        let immediate = match send_strategy.as_str() {
            "immediately" | "immediate" => true,
            "delay" => false,
            _ => return Err(invalid("send_strategy must be immediately or delay")),
        };
        let now = self.now();
        // A child without a connection of its own is reached through its gateway's.
        let link = self.link_to(&device).map(|(_, link)| link);
        let online = link.is_some();
        let (status, result, next_at) = match (online, immediate, expire_time) {
            // If the send fails after all (the device just left), the command expires on time.
            (true, _, secs) => (CommandStatus::Pending, None, Some(now + secs.max(1) * 1000)),
            (false, true, _) => (
                CommandStatus::Failed,
                Some(json!({ "error": "the device is offline" })),
                None,
            ),
            (false, false, 0) => (CommandStatus::Expired, None, None),
            (false, false, secs) => (CommandStatus::Pending, None, Some(now + secs * 1000)),
        };
        let command = AsyncCommand {
            seq: 0,
            command_id: new_request_id(now),
            project_id: project_id.to_owned(),
            device_id: device.device_id.clone(),
            service_id: request.command.service_id,
            command_name: request.command.command_name,
            paras: request.command.paras,
            expire_time,
            send_strategy,
            status,
            result,
            created_at: now,
            sent_at: None,
            delivered_at: None,
            response_at: None,
            sends: 0,
            next_at,
            callback_url: request.callback_url,
        };
        // Taking the delivery turn keeps this command and a reconnect's queue delivery apart.
        let _turn = match &link {
            Some(link) => Some(link.delivery.lock().await),
            None => None,
        };
        let command = self.store.insert_command(command).await?;
        self.command_event(device.reference(), &command);
        if link.is_some() {
            let current = self
                .store
                .command(command.command_id.clone())
                .await?
                .unwrap_or(command);
            if current.status == CommandStatus::Pending {
                self.send_async_command(current.clone()).await;
            }
            return Ok(self
                .store
                .command(current.command_id.clone())
                .await?
                .unwrap_or(current));
        }
        Ok(command)
    }

    /// One asynchronous command of a device.
    pub async fn async_command(
        &self,
        project_id: &str,
        device_id: &str,
        command_id: &str,
    ) -> Result<AsyncCommand, EngineError> {
        self.device(project_id, device_id).await?;
        self.store
            .command(command_id.to_owned())
            .await?
            .filter(|c| c.device_id == device_id)
            .ok_or(EngineError::NotFound("command"))
    }

    /// A device's asynchronous commands, newest first, with the total count.
    pub async fn list_async_commands(
        &self,
        project_id: &str,
        filter: CommandFilter,
        before: i64,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<AsyncCommand>, i64), EngineError> {
        self.device(project_id, &filter.device_id).await?;
        if let Some(status) = &filter.status
            && CommandStatus::parse(status).is_none()
        {
            return Err(invalid(format!("unknown status '{status}'")));
        }
        Ok(self
            .store
            .list_commands(filter, before, offset, limit)
            .await?)
    }

    fn command_event(&self, device: Arc<DeviceRef>, command: &AsyncCommand) {
        self.bus.publish(PlatformEvent::AsyncCommandStatusChanged {
            device,
            command_id: command.command_id.clone(),
            status: command.status,
            result: command.result.clone(),
            at: self.now(),
        });
    }

    /// Persists a transition from `from` and announces it; `false` if someone else moved first.
    /// The device is looked up before the commit, so the event follows the commit without a pause
    /// and events keep the order of the transitions.
    async fn transition(&self, from: CommandStatus, next: AsyncCommand) -> bool {
        let device = self.device_ref(&next.project_id, &next.device_id).await;
        match self.store.transition_command(from, next.clone()).await {
            Ok(true) => {
                self.command_event(device, &next);
                self.trace_downlink(&next.device_id, "command_status", json!({ "command_id": next.command_id, "status": next.status.as_str(), "sends": next.sends })).await;
                true
            }
            Ok(false) => false,
            Err(error) => {
                tracing::warn!(%error, command_id = %next.command_id, "could not record a command transition");
                false
            }
        }
    }

    /// Sends (or resends, with the same request id) a command to its device if it is connected,
    /// and schedules the next resend or the timeout.
    pub(crate) async fn send_async_command(self: &Arc<Self>, command: AsyncCommand) {
        let request = ioda_command_request(&command);
        let device = self
            .store
            .device(command.device_id.clone())
            .await
            .ok()
            .flatten();
        let product = device.as_ref().and_then(|d| self.product_of(d));
        // A child's command goes to its gateway, `object_device_id` naming the child.
        let via = device
            .as_ref()
            .map_or(command.device_id.as_str(), |d| self.route(d))
            .to_owned();
        let payload = match product {
            Some(product) => self.command_payload(
                &product,
                &command.device_id,
                &request,
                Some(crate::codecs::mid_of(&command.command_id)),
            ),
            None => Ok(command_body(&command.device_id, &request)
                .to_string()
                .into_bytes()),
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(error) => {
                tracing::warn!(%error, command_id = %command.command_id, "the command no longer encodes with the product's codec");
                return;
            }
        };
        let topic = command_topic(&via, &command.command_id);
        let Ok(acked) = self.push(&via, topic, payload, false).await else {
            if command.status == CommandStatus::Sent {
                self.spend_attempt(command).await;
            }
            return;
        };
        let now = self.now();
        let sends = command.sends + 1;
        let next = AsyncCommand {
            status: CommandStatus::Sent,
            sent_at: command.sent_at.or(Some(now)),
            sends,
            next_at: Some(jittered(now, resend_window(sends))),
            ..command.clone()
        };
        if !self.transition(command.status, next.clone()).await {
            return;
        }
        // Only a PUBACK makes a command DELIVERED (with QoS 0 the answer is the only
        // acknowledgement); a command too large for the device is left to its resends and timeout.
        let platform = self.clone();
        tokio::spawn(async move {
            if acked.await == Ok(ioda_mqtt::server::Delivery::Acknowledged) {
                platform.command_delivered(next).await;
            }
        });
    }

    /// A resend that could not go out (the device is away, or busy with another command): the
    /// attempt is spent all the same, so the schedule ends on time.
    async fn spend_attempt(&self, command: AsyncCommand) {
        let sends = command.sends + 1;
        let next = AsyncCommand {
            sends,
            next_at: Some(jittered(self.now(), resend_window(sends))),
            ..command
        };
        self.transition(CommandStatus::Sent, next).await;
    }

    /// The device acknowledged receipt: no more resends; it has until the command's expiry (at
    /// least the last resend window) to send its result.
    async fn command_delivered(&self, sent: AsyncCommand) {
        let now = self.now();
        let deadline =
            (sent.created_at + sent.expire_time * 1000).max(now + resend_window(MAX_SENDS).1);
        let next = AsyncCommand {
            status: CommandStatus::Delivered,
            delivered_at: Some(now),
            next_at: Some(deadline),
            ..sent
        };
        self.transition(CommandStatus::Sent, next).await;
    }

    /// A device's answer to an asynchronous command (its own, or for a gateway its child's).
    /// Returns `false` when it matched none (unknown, or already final: a repeated answer is
    /// never applied twice).
    pub(crate) async fn complete_async_command(
        &self,
        device_id: &str,
        command_id: &str,
        result: Value,
    ) -> Result<bool, EngineError> {
        // The acknowledgement (SENT -> DELIVERED) may race with the answer; retry on a lost race.
        for _ in 0..3 {
            let Some(command) = self.store.command(command_id.to_owned()).await? else {
                return Ok(false);
            };
            if command.device_id != device_id
                && !self.is_child_of(&command.device_id, device_id).await
            {
                return Ok(false);
            }
            if command.status.is_final() {
                return Ok(false);
            }
            let now = self.now();
            let status = if succeeded(&result) {
                CommandStatus::Successful
            } else {
                CommandStatus::Failed
            };
            let next = AsyncCommand {
                status,
                // A fast device can answer before the SENT step is recorded: it was sent all the same.
                sent_at: command.sent_at.or(Some(now)),
                sends: command.sends.max(1),
                delivered_at: command.delivered_at.or(Some(now)),
                response_at: Some(now),
                result: Some(result.clone()),
                next_at: None,
                ..command.clone()
            };
            if self.transition(command.status, next).await {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The scheduler's step for a command whose time has come: expire, resend or time out.
    pub(crate) async fn command_due(self: &Arc<Self>, command: AsyncCommand) {
        let finished = |status| AsyncCommand {
            status,
            next_at: None,
            ..command.clone()
        };
        match command.status {
            CommandStatus::Pending => {
                self.transition(CommandStatus::Pending, finished(CommandStatus::Expired))
                    .await;
            }
            CommandStatus::Sent if command.sends >= MAX_SENDS => {
                self.transition(CommandStatus::Sent, finished(CommandStatus::Timeout))
                    .await;
            }
            // Sent again if the device (or a child's gateway) is connected; otherwise the
            // attempt is spent.
            CommandStatus::Sent if self.link_to_id(&command.device_id).await.is_some() => {
                self.send_async_command(command).await
            }
            CommandStatus::Sent => self.spend_attempt(command).await,
            CommandStatus::Delivered => {
                self.transition(CommandStatus::Delivered, finished(CommandStatus::Timeout))
                    .await;
            }
            _ => {
                let cleared = AsyncCommand {
                    next_at: None,
                    ..command.clone()
                };
                let _ = self.store.transition_command(command.status, cleared).await;
            }
        }
    }
}

fn ioda_command_request(command: &AsyncCommand) -> CommandRequest {
    CommandRequest {
        service_id: command.service_id.clone(),
        command_name: command.command_name.clone(),
        paras: command.paras.clone(),
    }
}
