//! `/devices/{device_id}/trace` (an ioda extension): what happened to a device's traffic, and its
//! message trace (IoTDA's "Start Trace"), started and stopped here.

use axum::Json;
use axum::extract::{Path, State};
use ioda_engine::{DEFAULT_TRACE_SECONDS, TraceState};
use ioda_types::time;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::devices::{DevicePath, LimitParam, limit_of};
use crate::error::ApiError;
use crate::extract::{Body, Query};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartTrace {
    /// Seconds the trace runs (`DEFAULT_TRACE_SECONDS` when absent).
    duration: Option<i64>,
}

/// The device's trace entries, newest first, and whether its message trace runs.
pub async fn show(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Query(p): Query<LimitParam>,
) -> Result<Json<Value>, ApiError> {
    let (entries, tracing) = state
        .platform
        .device_trace(&path.project_id, &path.device_id, limit_of(p.limit)?)
        .await?;
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| json!({ "id": e.id, "time": time::format_iso_millis(e.at), "kind": e.kind, "detail": e.detail.to_value() }))
        .collect();
    Ok(Json(json!({
        "device_id": path.device_id,
        "tracing": tracing_json(tracing),
        "entries": entries,
    })))
}

/// Starts the device's message trace (or sets how long a running one has left): while it runs,
/// the stages of its successful traffic are traced too.
pub async fn start(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
    Body(body): Body<StartTrace>,
) -> Result<Json<Value>, ApiError> {
    let seconds = body.duration.unwrap_or(DEFAULT_TRACE_SECONDS);
    let tracing = state
        .platform
        .start_trace(&path.project_id, &path.device_id, seconds)
        .await?;
    Ok(Json(
        json!({ "device_id": path.device_id, "tracing": tracing_json(tracing) }),
    ))
}

/// Stops the device's message trace; what it recorded stays.
pub async fn stop(
    State(state): State<AppState>,
    Path(path): Path<DevicePath>,
) -> Result<Json<Value>, ApiError> {
    let tracing = state
        .platform
        .stop_trace(&path.project_id, &path.device_id)
        .await?;
    Ok(Json(
        json!({ "device_id": path.device_id, "tracing": tracing_json(tracing) }),
    ))
}

fn tracing_json(state: TraceState) -> Value {
    json!({
        "started": state.until.is_some(),
        "until": state.until.map(time::format_iso_millis),
        "all_devices": state.all_devices,
    })
}
