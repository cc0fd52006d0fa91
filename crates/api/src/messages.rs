//! Downlink messages: create, show, list.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ioda_engine::MessageRequest;
use ioda_store::DeviceMessage;
use ioda_types::time;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::devices::DevicePath;
use crate::error::ApiError;
use crate::extract::Body;

/// `DeviceMessageRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMessageRequest {
    message_id: Option<String>,
    name: Option<String>,
    message: Value,
    properties: Option<Value>,
    encoding: Option<String>,
    payload_format: Option<String>,
    topic: Option<String>,
    topic_full_name: Option<String>,
    ttl: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct MessagePath {
    project_id: String,
    device_id: String,
    message_id: String,
}

/// `DeviceMessage` of the SDK.
fn view(m: &DeviceMessage) -> Value {
    json!({
        "message_id": m.message_id,
        "name": m.name,
        "message": m.message,
        "encoding": m.encoding.clone().unwrap_or_else(|| "none".into()),
        "payload_format": m.payload_format,
        "topic": m.topic,
        "properties": m.properties,
        "status": m.status.as_str(),
        "error_info": m.error.as_ref().map(|(code, msg)| json!({ "error_code": code, "error_msg": msg })),
        "created_time": time::format_compact(m.created_at),
        "finished_time": m.finished_at.map(time::format_compact),
    })
}

pub async fn create(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Body(body): Body<DeviceMessageRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request = MessageRequest {
        message_id: body.message_id,
        name: body.name,
        message: body.message,
        encoding: body.encoding,
        payload_format: body.payload_format,
        topic: body.topic,
        topic_full_name: body.topic_full_name,
        properties: body.properties,
        ttl: body.ttl,
    };
    let m = state
        .platform
        .create_message(&path.project_id, &path.device_id, request)
        .await?;
    let result = json!({
        "status": m.status.as_str(),
        "created_time": time::format_compact(m.created_at),
        "finished_time": m.finished_at.map(time::format_compact),
    });
    Ok((
        StatusCode::CREATED,
        Json(json!({ "message_id": m.message_id, "result": result })),
    ))
}

pub async fn show(
    State(state): State<AppState>,
    Path(path): Path<MessagePath>,
) -> Result<Json<Value>, ApiError> {
    let m = state
        .platform
        .device_message(&path.project_id, &path.device_id, &path.message_id)
        .await?;
    Ok(Json(view(&m)))
}

pub async fn list(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
) -> Result<Json<Value>, ApiError> {
    let messages = state
        .platform
        .device_messages(&path.project_id, &path.device_id)
        .await?;
    let messages: Vec<Value> = messages.iter().map(view).collect();
    Ok(Json(
        json!({ "device_id": path.device_id, "messages": messages }),
    ))
}
