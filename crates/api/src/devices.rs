//! `/devices`: register, list, show, update, delete, reset secret, freeze, shadow, history.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ioda_engine::{NewDevice, NewDeviceAuth, SecretReset};
use ioda_store::{DeviceFilter, DeviceUpdate};
use ioda_types::{Device, ids, time};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Body, Page, Query};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthInfo {
    auth_type: Option<String>,
    secret: Option<String>,
    fingerprint: Option<String>,
    secure_access: Option<bool>,
    timeout: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitialDesired {
    service_id: String,
    desired: Value,
}

/// `AddDevice` of the SDK.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDevice {
    device_id: Option<String>,
    node_id: String,
    device_name: Option<String>,
    product_id: String,
    auth_info: Option<AuthInfo>,
    description: Option<String>,
    gateway_id: Option<String>,
    app_id: Option<String>,
    extension_info: Option<Value>,
    shadow: Option<Vec<InitialDesired>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthInfoWithoutSecret {
    secure_access: Option<bool>,
    timeout: Option<i64>,
}

/// `UpdateDevice` of the SDK.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateDevice {
    device_name: Option<String>,
    description: Option<String>,
    extension_info: Option<Value>,
    auth_info: Option<AuthInfoWithoutSecret>,
}

/// `ResetDeviceSecret` of the SDK.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetDeviceSecret {
    secret: Option<String>,
    force_disconnect: Option<bool>,
    secret_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    product_id: Option<String>,
    gateway_id: Option<String>,
    is_cascade_query: Option<bool>,
    node_id: Option<String>,
    device_name: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
    offset: Option<i64>,
    start_time: Option<String>,
    end_time: Option<String>,
    app_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionParams {
    action_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitParam {
    pub(crate) limit: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct DevicePath {
    pub project_id: String,
    pub device_id: String,
}

fn app_name(state: &AppState, device: &Device) -> Option<String> {
    state
        .platform
        .project(&device.project_id)
        .filter(|p| p.default_app_id == device.app_id)
        .map(|p| p.default_app_name)
}

/// The fields shared by `QueryDeviceSimplify` (lists) and `ShowDeviceResponse`.
fn summary(state: &AppState, d: &Device) -> Value {
    let product_name = state.platform.product_of(d).map(|p| p.name.clone());
    json!({
        "app_id": d.app_id,
        "app_name": app_name(state, d),
        "device_id": d.device_id,
        "node_id": d.node_id,
        "gateway_id": d.gateway_id,
        "device_name": d.device_name,
        "node_type": if d.gateway_id == d.device_id { "GATEWAY" } else { "ENDPOINT" },
        "description": d.description,
        "fw_version": d.fw_version,
        "sw_version": d.sw_version,
        "device_sdk_version": d.sdk_version,
        "product_id": d.product_id,
        "product_name": product_name,
        "status": d.shown_status().as_str(),
        "tags": [],
    })
}

/// `ShowDeviceResponse`, plus ioda's first/last online/offline times (the SDK ignores extra keys).
fn detail(state: &AppState, d: &Device) -> Value {
    let mut v = summary(state, d);
    let iso = |t: Option<i64>| t.map(time::format_iso_millis);
    v["auth_info"] = json!({
        "auth_type": d.auth.auth_type,
        "secret": d.auth.secret,
        "secondary_secret": d.auth.secondary_secret,
        "fingerprint": d.auth.fingerprint,
        "secondary_fingerprint": d.auth.secondary_fingerprint,
        "secure_access": d.auth.secure_access,
        "timeout": d.auth.timeout,
    });
    v["create_time"] = json!(time::format_compact(d.created_at));
    v["connection_status_update_time"] = json!(iso(d.status_updated_at));
    v["active_time"] = json!(iso(d.first_online_at));
    v["modules"] = json!([]);
    v["extension_info"] = json!(d.extension_info);
    v["first_online_time"] = json!(iso(d.first_online_at));
    v["last_online_time"] = json!(iso(d.last_online_at));
    v["last_offline_time"] = json!(iso(d.last_offline_at));
    v
}

pub async fn create(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Body(body): Body<AddDevice>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let auth = body.auth_info.map(|a| NewDeviceAuth {
        auth_type: a.auth_type,
        secret: a.secret,
        fingerprint: a.fingerprint,
        secure_access: a.secure_access,
        timeout: a.timeout,
    });
    let new = NewDevice {
        device_id: body.device_id,
        node_id: body.node_id,
        product_id: body.product_id,
        device_name: body.device_name,
        description: body.description,
        gateway_id: body.gateway_id,
        app_id: body.app_id,
        extension_info: body.extension_info,
        shadow: body
            .shadow
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.service_id, s.desired))
            .collect(),
        auth: auth.unwrap_or_default(),
    };
    let device = state.platform.add_device(&project_id, new).await?;
    Ok((StatusCode::CREATED, Json(detail(&state, &device))))
}

fn time_param(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            time::parse_event_time(v)
                .ok_or_else(|| ApiError::Invalid(format!("{name} must look like 20190528T112233Z")))
        })
        .transpose()
}

pub async fn list(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Query(p): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_params(p.limit, p.marker.as_deref(), p.offset)?;
    if p.is_cascade_query.is_some() && p.gateway_id.is_none() {
        return Err(ApiError::Invalid(
            "is_cascade_query needs gateway_id".into(),
        ));
    }
    let filter = DeviceFilter {
        project_id,
        product_id: p.product_id,
        gateway_id: p.gateway_id,
        node_id: p.node_id,
        device_name: p.device_name,
        app_id: p.app_id,
        created_from: time_param("start_time", p.start_time.as_deref())?,
        created_to: time_param("end_time", p.end_time.as_deref())?,
    };
    if let (Some(from), Some(to)) = (filter.created_from, filter.created_to)
        && from > to
    {
        return Err(ApiError::Invalid(
            "start_time must be earlier than end_time".into(),
        ));
    }
    let result = state
        .platform
        .list_devices(filter, page.before, page.offset, page.limit)
        .await?;
    let marker = result.items.last().map(|d| ids::marker_of(d.seq));
    let devices: Vec<Value> = result.items.iter().map(|d| summary(&state, d)).collect();
    Ok(Json(
        json!({ "devices": devices, "page": { "count": result.count, "marker": marker } }),
    ))
}

pub async fn show(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
) -> Result<Json<Value>, ApiError> {
    let device = state
        .platform
        .device(&path.project_id, &path.device_id)
        .await?;
    Ok(Json(detail(&state, &device)))
}

pub async fn update(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Body(body): Body<UpdateDevice>,
) -> Result<Json<Value>, ApiError> {
    let update = DeviceUpdate {
        device_name: body.device_name,
        description: body.description,
        extension_info: body.extension_info,
        secure_access: body.auth_info.as_ref().and_then(|a| a.secure_access),
        timeout: body.auth_info.as_ref().and_then(|a| a.timeout),
    };
    let device = state
        .platform
        .update_device(&path.project_id, &path.device_id, update)
        .await?;
    Ok(Json(detail(&state, &device)))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
) -> Result<StatusCode, ApiError> {
    state
        .platform
        .delete_device(&path.project_id, &path.device_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn action(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Query(params): Query<ActionParams>,
    Body(body): Body<ResetDeviceSecret>,
) -> Result<Json<Value>, ApiError> {
    if params.action_id != "resetSecret" {
        return Err(ApiError::Invalid("action_id must be resetSecret".into()));
    }
    let reset = SecretReset {
        secret: body.secret,
        force_disconnect: body.force_disconnect.unwrap_or(false),
        secret_type: body.secret_type,
    };
    let (secret, secret_type) = state
        .platform
        .reset_secret(&path.project_id, &path.device_id, reset)
        .await?;
    Ok(Json(
        json!({ "device_id": path.device_id, "secret": secret, "secret_type": secret_type }),
    ))
}

pub async fn freeze(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
) -> Result<StatusCode, ApiError> {
    state
        .platform
        .freeze_device(&path.project_id, &path.device_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn unfreeze(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
) -> Result<StatusCode, ApiError> {
    state
        .platform
        .unfreeze_device(&path.project_id, &path.device_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn shadow(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
) -> Result<Json<Value>, ApiError> {
    state
        .platform
        .device(&path.project_id, &path.device_id)
        .await?;
    let rows = state
        .platform
        .store()
        .shadow(path.device_id.clone())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(
        json!({ "device_id": path.device_id, "shadow": ioda_engine::shadow_json(&rows) }),
    ))
}

pub(crate) fn limit_of(param: Option<i64>) -> Result<i64, ApiError> {
    let limit = param.unwrap_or(100);
    if (1..=1000).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::LimitOutOfRange)
    }
}

/// ioda extension: the device's stored property reports, newest first.
pub async fn history(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Query(p): Query<LimitParam>,
) -> Result<Json<Value>, ApiError> {
    state
        .platform
        .device(&path.project_id, &path.device_id)
        .await?;
    let rows = state
        .platform
        .store()
        .property_history(path.device_id.clone(), limit_of(p.limit)?)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let reports: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "request_id": r.request_id,
                "service_id": r.service_id,
                "properties": r.properties,
                "event_time": time::format_compact(r.event_time),
                "received_time": time::format_iso_millis(r.received_at),
            })
        })
        .collect();
    Ok(Json(
        json!({ "device_id": path.device_id, "reports": reports }),
    ))
}
