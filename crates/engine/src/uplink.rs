//! What a device publishes: property reports (validated against the model, merged into the shadow,
//! kept as history) and messages (kept as they are). The PUBACK waits for the commit.

use bytes::Bytes;
use ioda_mqtt::codec::{Publish, reason};
use ioda_mqtt::server::PublishVerdict;
use ioda_store::{DetailWriter, MessageRecord, ReportRecord, TraceDetail};
use ioda_types::event::{DeviceRef, ReportedService};
use ioda_types::validate::filter_properties;
use ioda_types::{PlatformEvent, time};
use serde_json::{Value, json};
use std::sync::Arc;

use crate::Platform;
use crate::access::DeviceSession;
use crate::access::trace_entry;
use crate::downlink::{ReplyKind, new_request_id};
use crate::events::PAYLOAD_FORMAT_INVALID;
use crate::report_parse::{RawService, parse_report};
use crate::topic::{Uplink, classify_uplink, split_query};
use crate::{StageTrace, StagedForwarding};

/// Inflates a gzip payload, refusing one that would grow past `limit` (a zip bomb costs nothing).
fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut plain = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(data).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut plain)
        .map_err(|e| format!("not valid gzip: {e}"))?;
    if plain.len() > limit {
        return Err(format!(
            "the gzip payload inflates beyond the {limit}-byte limit"
        ));
    }
    Ok(plain)
}

impl DeviceSession {
    pub(crate) async fn handle_uplink(&mut self, publish: Publish) -> PublishVerdict {
        let now = self.platform.now();
        let limit = self.platform.config.max_payload;
        if publish.payload.len() > limit {
            let detail =
                json!({ "topic": publish.topic, "size": publish.payload.len(), "limit": limit });
            self.record("payload_too_large", detail).await;
            return PublishVerdict::Disconnect(reason::PACKET_TOO_LARGE);
        }
        if !self.bucket.try_take(now) {
            let detail = json!({ "topic": publish.topic, "limit_per_second": self.platform.config.rate_limit });
            self.record("rate_limited", detail).await;
            return PublishVerdict::Refuse(reason::QUOTA_EXCEEDED);
        }
        let query = split_query(&publish.topic);
        let request_id = query
            .request_id
            .map_or_else(|| new_request_id(now), str::to_owned);
        // Device SDKs may gzip reports and mark the topic `?encoding=gzip`.
        let payload = if query.gzip {
            match gunzip(&publish.payload, limit) {
                Ok(plain) => Bytes::from(plain),
                Err(error) => {
                    self.record(
                        "payload_rejected",
                        json!({ "topic": publish.topic, "error": error }),
                    )
                    .await;
                    return PublishVerdict::Discard(PAYLOAD_FORMAT_INVALID);
                }
            }
        } else {
            publish.payload.clone()
        };
        let uplink = classify_uplink(&self.device.device_id, query.path);
        if self.takes_downlinks
            && matches!(
                uplink,
                Some(Uplink::PropertiesReport | Uplink::MessagesUp | Uplink::UserTopic(_))
            )
        {
            // Data from the device is the other moment IoTDA delivers what waited for it.
            self.platform.deliver_queued_later(
                &self.device.device_id,
                self.link.clone(),
                std::time::Duration::ZERO,
            );
        }
        if let Some(codec) = self.binary_codec(uplink.as_ref()) {
            return self
                .decode_binary(
                    codec,
                    uplink.as_ref(),
                    &publish.topic,
                    &payload,
                    request_id,
                    now,
                )
                .await;
        }
        match uplink {
            None => {
                self.record("publish_denied", json!({ "topic": publish.topic }))
                    .await;
                PublishVerdict::Refuse(reason::NOT_AUTHORIZED)
            }
            Some(Uplink::PropertiesReport) => {
                self.report_properties(&payload, request_id, now).await
            }
            Some(Uplink::MessagesUp | Uplink::UserTopic(_)) => {
                self.report_message(query.path.to_owned(), payload, request_id, now)
                    .await
            }
            Some(Uplink::CommandResponse { request_id }) => {
                self.on_reply(ReplyKind::Command, request_id, &publish.payload)
                    .await
            }
            Some(Uplink::PropertiesSetResponse { request_id }) => {
                self.on_reply(ReplyKind::PropertiesSet, request_id, &publish.payload)
                    .await
            }
            Some(Uplink::PropertiesGetResponse { request_id }) => {
                self.on_reply(ReplyKind::PropertiesGet, request_id, &publish.payload)
                    .await
            }
            Some(Uplink::ShadowGet { request_id }) => {
                self.on_shadow_get(request_id, &publish.payload).await
            }
            // Boxed: each publish's future is allocated as large as the largest it may await,
            // and these rare ones are large; a report's stays the size it was.
            Some(Uplink::GatewayPropertiesReport) => {
                Box::pin(self.report_sub_devices(&payload, request_id, now)).await
            }
            Some(Uplink::EventsUp) => Box::pin(self.handle_events(&payload, now)).await,
        }
    }

    /// The codec to apply: a product that declares binary data and has a codec decodes what its
    /// devices report and answer.
    fn binary_codec(
        &self,
        uplink: Option<&Uplink<'_>>,
    ) -> Option<std::sync::Arc<ioda_codec::Codec>> {
        if !matches!(
            uplink,
            Some(Uplink::PropertiesReport | Uplink::MessagesUp | Uplink::CommandResponse { .. })
        ) {
            return None;
        }
        let product = self.platform.cached_product(&self.device.product_id)?;
        if product.data_format != "binary" {
            return None;
        }
        self.platform.product_codec(&product)
    }

    /// Bytes from a binary device: a data report becomes a property report, a command response
    /// answers the command named in the topic; what the codec cannot read is traced with the
    /// reason and dropped.
    async fn decode_binary(
        &mut self,
        codec: std::sync::Arc<ioda_codec::Codec>,
        uplink: Option<&Uplink<'_>>,
        topic: &str,
        payload: &[u8],
        request_id: String,
        now: i64,
    ) -> PublishVerdict {
        // Scripts get the MQTT topic; NB-IoT data has none (as in IoTDA).
        let topic = (!self.is_coap()).then_some(topic);
        // A script may run for a while (up to its operation budget): off the async threads. A
        // declarative codec is quick and decodes right here.
        let decoded = if codec.may_run_long() {
            let (bytes, topic_owned) = (payload.to_vec(), topic.map(str::to_owned));
            tokio::task::spawn_blocking(move || codec.decode(&bytes, topic_owned.as_deref()))
                .await
                .unwrap_or_else(|_| Err(ioda_codec::CodecError::Decode("the codec stopped".into())))
        } else {
            codec.decode(payload, topic)
        };
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(error) => {
                let detail = json!({ "request_id": request_id, "payload_hex": ioda_codec::hex_encode(payload), "error": error.to_string() });
                self.record("codec_failed", detail).await;
                return PublishVerdict::Discard(PAYLOAD_FORMAT_INVALID);
            }
        };
        let json = decoded.json;
        if json["msg_type"] != "command_response" {
            // A report: `services` as an MQTT device would have sent them.
            let body = json!({ "services": json["services"] }).to_string();
            let verdict = self
                .report_properties(body.as_bytes(), request_id, now)
                .await;
            if let Some(answer) = decoded.response {
                self.answer_report(answer);
            }
            return verdict;
        }
        let answered = match uplink {
            Some(Uplink::CommandResponse { request_id }) => Some((*request_id).to_owned()),
            // LwM2M devices answer on their data channel; the mid names the command.
            _ => match json["mid"].as_i64() {
                Some(mid) => {
                    self.platform
                        .command_of_mid(&self.device.device_id, mid)
                        .await
                }
                None => None,
            },
        };
        let Some(command_id) = answered else {
            let detail = json!({ "request_id": request_id, "decoded": json, "why": "no command waits for this mid" });
            self.record("response_ignored", detail).await;
            return PublishVerdict::Accept;
        };
        let result_code = json.get("result_code").or(json.get("errcode")).cloned();
        let body =
            json!({ "result_code": result_code.unwrap_or(json!(0)), "paras": json["paras"] })
                .to_string();
        self.on_reply(ReplyKind::Command, &command_id, body.as_bytes())
            .await
    }

    /// Whether the device is an NB-IoT (CoAP/LwM2M) one.
    fn is_coap(&self) -> bool {
        self.platform
            .cached_product(&self.device.product_id)
            .is_some_and(|p| p.protocol_type == "CoAP")
    }

    /// A codec whose data report defines a response (IoTDA's "Add Response Field") answers each
    /// report of an NB-IoT device with those bytes on `/19/1/0`.
    fn answer_report(&self, answer: Vec<u8>) {
        if !self.is_coap() {
            return;
        }
        let platform = self.platform.clone();
        let device_id = self.device.device_id.clone();
        // Another task: the answer goes through this device's own outbox.
        tokio::spawn(async move {
            let topic = format!("$oc/devices/{device_id}/sys/lwm2m/report_response");
            let _ = platform.push(&device_id, topic, answer, false).await;
        });
    }

    /// A device's answer to a platform request: completes the waiting API call or the asynchronous
    /// command; a late, repeated or unknown answer is recorded and otherwise ignored.
    async fn on_reply(
        &mut self,
        kind: ReplyKind,
        request_id: &str,
        payload: &[u8],
    ) -> PublishVerdict {
        let value: Value = match serde_json::from_slice(payload) {
            Ok(value) => value,
            Err(error) => {
                let detail =
                    json!({ "request_id": request_id, "error": format!("not JSON: {error}") });
                self.record("response_malformed", detail).await;
                return PublishVerdict::Discard(PAYLOAD_FORMAT_INVALID);
            }
        };
        let device_id = self.device.device_id.clone();
        if self
            .platform
            .complete_request(&device_id, request_id, kind, value.clone())
        {
            return PublishVerdict::Accept;
        }
        let matched = match kind {
            ReplyKind::Command => self
                .platform
                .complete_async_command(&device_id, request_id, value)
                .await
                .unwrap_or(false),
            ReplyKind::PropertiesSet => self.platform.desired_push_answered(&self.link, request_id),
            ReplyKind::PropertiesGet => false,
        };
        if !matched {
            let detail = json!({ "request_id": request_id, "kind": format!("{kind:?}"), "why": "no request waits for it (late, repeated or unknown)" });
            self.record("response_ignored", detail).await;
        }
        PublishVerdict::Accept
    }

    async fn on_shadow_get(&mut self, request_id: &str, payload: &[u8]) -> PublishVerdict {
        let service_id = serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
            v.get("service_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let platform = self.platform.clone();
        let device_id = self.device.device_id.clone();
        let request_id = request_id.to_owned();
        // Answered from another task: the answer goes through this connection's own outbox.
        tokio::spawn(async move {
            let _ = platform
                .answer_shadow_get(&device_id, &request_id, service_id.as_deref())
                .await;
        });
        PublishVerdict::Accept
    }

    async fn report_properties(
        &mut self,
        payload: &[u8],
        request_id: String,
        now: i64,
    ) -> PublishVerdict {
        let raw = match parse_report(payload) {
            Ok(raw) => raw,
            Err(error) => {
                self.record(
                    "report_malformed",
                    json!({ "request_id": request_id, "error": error }),
                )
                .await;
                return PublishVerdict::Discard(PAYLOAD_FORMAT_INVALID);
            }
        };
        let device = self.device.clone();
        let submitted = match self.submit_report(&device, raw, request_id, now).await {
            Ok(submitted) => submitted,
            Err(refusal) => return refusal,
        };
        let platform = self.platform.clone();
        let link = self.link.clone();
        PublishVerdict::AcceptAfter(Box::pin(async move {
            // The writer has let go of its copy once this resolves: the report is freed here,
            // where it was built, unless desired state waits to be compared with it.
            let Some(record) = submitted.committed(&platform).await else {
                return reason::UNSPECIFIED;
            };
            // Decided at commit, not on receipt: a shadow loaded in between has to learn of
            // this report (see `report_committed`).
            if platform.report_committed(&link) && !record.services.is_empty() {
                // Another task: a push may wait on this connection's own outbox.
                tokio::spawn(async move {
                    platform
                        .after_report(&record.device_id, &link, &record.services)
                        .await
                });
            }
            reason::SUCCESS
        }))
    }

    /// Validates a report's services against `device`'s model and hands the report to the
    /// store with its forwarding; `device` is this session's device or, for a gateway, one of
    /// its children. Properties the model refuses are traced on `device`.
    pub(crate) async fn submit_report(
        &mut self,
        device: &Arc<DeviceRef>,
        raw: Vec<RawService>,
        request_id: String,
        now: i64,
    ) -> Result<SubmittedReport, PublishVerdict> {
        let Some(product) = self.platform.cached_product(&device.product_id) else {
            let detail = json!({ "request_id": request_id, "error": "the device's product no longer exists" });
            self.record_on(&device.device_id, "report_malformed", detail)
                .await;
            return Err(PublishVerdict::Discard(reason::UNSPECIFIED));
        };
        let mut rejected = Vec::new();
        let mut services = Vec::with_capacity(raw.len());
        for service in raw {
            let model = product.service(&service.service_id);
            let accepted = filter_properties(
                model,
                &service.service_id,
                service.properties,
                &mut rejected,
            );
            if !accepted.is_empty() {
                let event_time = service
                    .event_time
                    .as_deref()
                    .and_then(time::parse_event_time)
                    .unwrap_or(now);
                services.push(ReportedService::new(
                    service.service_id,
                    accepted,
                    event_time,
                ));
            }
        }
        let mut traces: Vec<_> = rejected
            .iter()
            .filter_map(|r| {
                let detail = json!({ "request_id": request_id, "service_id": r.service_id, "property": r.property, "reason": r.reason.to_string() });
                self.trace_on(&device.device_id, "property_rejected", detail)
            })
            .collect();
        let applied = !services.is_empty();
        // The stage record of this report: received, authenticated, validated, stored (shadow and
        // history are written in the same transaction), and where it is forwarded. Made while
        // the device's message trace runs, and for a report that lost properties or kept none
        // (what an operator looks for; then throttled as refusals are, unless traced):
        // `message_trace`.
        let traced = self.platform.traces_success(&device.device_id);
        let stage = (traced || !applied || !rejected.is_empty()).then(|| {
            TraceDetail::object()
                .str("request_id", &request_id)
                .strs(
                    "applied_services",
                    services.iter().map(|s| s.service_id.as_str()),
                )
                .int("rejected_properties", rejected.len() as i64)
        });
        let event = PlatformEvent::PropertiesReported {
            device: device.clone(),
            request_id: request_id.clone(),
            services,
            at: now,
        };
        // Forwarding is decided now and committed with the report.
        let staged = if applied {
            self.platform
                .stage_forwarding(&event, now, StageTrace::of(traced, stage.is_some()))
        } else {
            StagedForwarding::default()
        };
        // The properties go on to the store; the event is kept for the bus only while someone
        // listens for device data (forwarding took its part above).
        let (services, event) = if applied && self.platform.bus().wants_device_data() {
            (services_of(event.clone()), Some(event))
        } else {
            (services_of(event), None)
        };
        let record = Arc::new(ReportRecord {
            device_id: device.device_id.clone(),
            request_id,
            received_at: now,
            services,
        });
        if let Some(stage) = stage {
            let detail = with_routing(stage, &staged);
            if traced {
                traces.push(trace_entry(&device.device_id, now, "report_stored", detail));
            } else {
                traces.extend(self.trace_on(&device.device_id, "report_stored", detail));
            }
        }
        let woken: Vec<String> = staged.rows.iter().map(|f| f.action_id.clone()).collect();
        let Ok(commit) = self
            .platform
            .store
            .submit_report(record.clone(), traces, staged.rows, staged.after_commit)
            .await
        else {
            return Err(PublishVerdict::Refuse(reason::UNSPECIFIED));
        };
        Ok(SubmittedReport {
            commit,
            woken,
            event,
            record,
        })
    }

    async fn report_message(
        &mut self,
        topic: String,
        payload: Bytes,
        request_id: String,
        now: i64,
    ) -> PublishVerdict {
        let event = PlatformEvent::MessageReported {
            device: self.device.clone(),
            request_id: request_id.clone(),
            topic: topic.clone(),
            payload: payload.to_vec().into(),
            at: now,
        };
        // Only property reports are read back from their log; messages keep queue rows.
        let traced = self.platform.traces_success(&self.device.device_id);
        let staged = self
            .platform
            .stage_forwarding(&event, now, StageTrace::of(traced, traced));
        let mut trace = Vec::new();
        if traced {
            let stage = TraceDetail::object()
                .str("request_id", &request_id)
                .str("topic", &topic)
                .int("bytes", payload.len() as i64);
            trace.push(self.stage("message_stored", with_routing(stage, &staged)));
        }
        let StagedForwarding { rows: forwards, .. } = staged;
        let woken: Vec<String> = forwards.iter().map(|f| f.action_id.clone()).collect();
        let event = self.platform.bus().wants_device_data().then_some(event);
        let submitted = self
            .platform
            .store
            .submit_message(
                MessageRecord {
                    device_id: self.device.device_id.clone(),
                    topic,
                    payload: payload.to_vec(),
                    request_id,
                    received_at: now,
                },
                trace,
                forwards,
            )
            .await;
        let Ok(commit) = submitted else {
            return PublishVerdict::Refuse(reason::UNSPECIFIED);
        };
        let platform = self.platform.clone();
        PublishVerdict::AcceptAfter(Box::pin(async move {
            match commit.await {
                Ok(Ok(())) => {
                    if !woken.is_empty() {
                        platform.wake_forwarding(&woken);
                    }
                    if let Some(event) = event {
                        platform.bus().publish(event);
                    }
                    reason::SUCCESS
                }
                _ => reason::UNSPECIFIED,
            }
        }))
    }
}

/// A report handed to the store, waiting for its commit.
pub(crate) struct SubmittedReport {
    commit: tokio::sync::oneshot::Receiver<Result<(), ioda_store::StoreError>>,
    /// The forwarding actions that have work once it commits.
    woken: Vec<String>,
    /// For the bus, when someone listens for device data.
    event: Option<PlatformEvent>,
    record: Arc<ReportRecord>,
}

impl SubmittedReport {
    /// Waits for the commit, then wakes forwarding and tells the bus; the report when it was
    /// committed, `None` when it was not.
    pub(crate) async fn committed(self, platform: &Platform) -> Option<Arc<ReportRecord>> {
        match self.commit.await {
            Ok(Ok(())) => {
                if !self.woken.is_empty() {
                    platform.wake_forwarding(&self.woken);
                }
                if let Some(event) = self.event {
                    platform.bus().publish(event);
                }
                Some(self.record)
            }
            _ => None,
        }
    }
}

/// A report event's services, for the store.
fn services_of(event: PlatformEvent) -> Vec<ReportedService> {
    match event {
        PlatformEvent::PropertiesReported { services, .. } => services,
        _ => Vec::new(),
    }
}

/// A stored-data trace entry's detail with the rules the data matched and the actions it was
/// queued for (`routing`), when a rule has the data's subject.
fn with_routing(stage: DetailWriter, staged: &StagedForwarding) -> TraceDetail {
    match &staged.routing {
        Some(routing) => stage.nested("routing", routing).finish(),
        None => stage.finish(),
    }
}
