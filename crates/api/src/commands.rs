//! Downlink API: synchronous and asynchronous commands, property set/get, shadow desired state.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use ioda_engine::{
    AsyncCommandRequest, CommandRequest, DesiredRequest, SYNC_TIMEOUT, SYNC_TIMEOUT_RANGE,
    shadow_json,
};
use ioda_store::{AsyncCommand, CommandFilter};
use ioda_types::{ids, time};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::devices::DevicePath;
use crate::error::ApiError;
use crate::extract::{Body, Page, Query};

/// `DeviceCommandRequest`, plus ioda's optional `timeout` (seconds the call waits for the answer).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCommandRequest {
    service_id: Option<String>,
    command_name: Option<String>,
    paras: Value,
    timeout: Option<u64>,
}

/// `AsyncDeviceCommandRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncDeviceCommandRequest {
    service_id: Option<String>,
    command_name: Option<String>,
    paras: Value,
    expire_time: Option<i64>,
    send_strategy: Option<String>,
    /// ioda extension: POST every status change here (the legacy `callbackUrl` notification).
    callback_url: Option<String>,
}

/// `DevicePropertiesRequest`, plus ioda's optional `timeout`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePropertiesRequest {
    services: Value,
    timeout: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertiesQuery {
    service_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListCommandsQuery {
    limit: Option<i64>,
    marker: Option<String>,
    offset: Option<i64>,
    start_time: Option<String>,
    end_time: Option<String>,
    status: Option<String>,
    command_name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CommandPath {
    project_id: String,
    device_id: String,
    command_id: String,
}

/// `UpdateDesireds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateDesireds {
    shadow: Vec<UpdateDesired>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateDesired {
    service_id: String,
    desired: Value,
    version: Option<i64>,
}

fn wait_time(timeout: Option<u64>) -> Result<Duration, ApiError> {
    match timeout {
        None => Ok(SYNC_TIMEOUT),
        Some(secs) if SYNC_TIMEOUT_RANGE.contains(&secs) => Ok(Duration::from_secs(secs)),
        Some(_) => Err(ApiError::Invalid(format!(
            "timeout must be between {} and {} seconds",
            SYNC_TIMEOUT_RANGE.start(),
            SYNC_TIMEOUT_RANGE.end()
        ))),
    }
}

pub async fn create_command(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Body(body): Body<DeviceCommandRequest>,
) -> Result<Json<Value>, ApiError> {
    let timeout = wait_time(body.timeout)?;
    let request = CommandRequest {
        service_id: body.service_id,
        command_name: body.command_name,
        paras: body.paras,
    };
    let (command_id, response) = state
        .platform
        .send_command(&path.project_id, &path.device_id, request, timeout)
        .await?;
    Ok(Json(
        json!({ "command_id": command_id, "response": response }),
    ))
}

fn optional_time(t: Option<i64>) -> Value {
    json!(t.map(time::format_compact))
}

/// `ShowAsyncDeviceCommandResponse` (a superset of the create and list shapes).
fn command_view(c: &AsyncCommand, with_details: bool) -> Value {
    let mut v = json!({
        "device_id": c.device_id,
        "command_id": c.command_id,
        "service_id": c.service_id,
        "command_name": c.command_name,
        "expire_time": c.expire_time,
        "status": c.status.as_str(),
        "created_time": time::format_compact(c.created_at),
        "sent_time": optional_time(c.sent_at),
        "delivered_time": optional_time(c.delivered_at),
        "response_time": optional_time(c.response_at),
        "send_strategy": c.send_strategy,
    });
    if with_details {
        v["paras"] = c.paras.clone();
        v["result"] = json!(c.result);
    }
    v
}

pub async fn create_async_command(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Body(body): Body<AsyncDeviceCommandRequest>,
) -> Result<Json<Value>, ApiError> {
    let request = AsyncCommandRequest {
        command: CommandRequest {
            service_id: body.service_id,
            command_name: body.command_name,
            paras: body.paras,
        },
        expire_time: body.expire_time,
        send_strategy: body.send_strategy,
        callback_url: body.callback_url,
    };
    if let Some(url) = &request.callback_url {
        ioda_rules::legacy::check_callback_url(url).map_err(ApiError::Invalid)?;
    }
    let command = state
        .platform
        .create_async_command(&path.project_id, &path.device_id, request)
        .await?;
    Ok(Json(command_view(&command, true)))
}

pub async fn show_async_command(
    State(state): State<AppState>,
    Path(path): Path<CommandPath>,
) -> Result<Json<Value>, ApiError> {
    let command = state
        .platform
        .async_command(&path.project_id, &path.device_id, &path.command_id)
        .await?;
    Ok(Json(command_view(&command, true)))
}

pub async fn list_async_commands(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Query(q): Query<ListCommandsQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_params(q.limit, q.marker.as_deref(), q.offset)?;
    let parse = |name: &str, v: Option<&str>| {
        v.map(|t| {
            time::parse_event_time(t)
                .ok_or_else(|| ApiError::Invalid(format!("{name} must look like 20190528T112233Z")))
        })
        .transpose()
    };
    let filter = CommandFilter {
        device_id: path.device_id.clone(),
        status: q.status,
        command_name: q.command_name,
        created_from: parse("start_time", q.start_time.as_deref())?,
        created_to: parse("end_time", q.end_time.as_deref())?,
    };
    let (commands, count) = state
        .platform
        .list_async_commands(
            &path.project_id,
            filter,
            page.before,
            page.offset,
            page.limit,
        )
        .await?;
    let marker = commands.last().map(|c| ids::marker_of(c.seq));
    let commands: Vec<Value> = commands.iter().map(|c| command_view(c, false)).collect();
    Ok(Json(
        json!({ "commands": commands, "page": { "count": count, "marker": marker } }),
    ))
}

pub async fn update_properties(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Body(body): Body<DevicePropertiesRequest>,
) -> Result<Json<Value>, ApiError> {
    let timeout = wait_time(body.timeout)?;
    let (request_id, response) = state
        .platform
        .set_properties(&path.project_id, &path.device_id, body.services, timeout)
        .await?;
    Ok(Json(
        json!({ "request_id": request_id, "response": response }),
    ))
}

pub async fn list_properties(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Query(q): Query<PropertiesQuery>,
) -> Result<Json<Value>, ApiError> {
    let (request_id, response) = state
        .platform
        .get_properties(
            &path.project_id,
            &path.device_id,
            q.service_id,
            SYNC_TIMEOUT,
        )
        .await?;
    Ok(Json(
        json!({ "request_id": request_id, "response": response }),
    ))
}

pub async fn update_desired(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Body(body): Body<UpdateDesireds>,
) -> Result<Json<Value>, ApiError> {
    if body.shadow.is_empty() {
        return Err(ApiError::Invalid(
            "shadow must name at least one service".into(),
        ));
    }
    let requests = body
        .shadow
        .into_iter()
        .map(|s| DesiredRequest {
            service_id: s.service_id,
            desired: s.desired,
            version: s.version,
        })
        .collect();
    let rows = state
        .platform
        .update_desired(&path.project_id, &path.device_id, requests)
        .await?;
    Ok(Json(
        json!({ "device_id": path.device_id, "shadow": shadow_json(&rows) }),
    ))
}
