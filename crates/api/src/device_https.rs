//! IoTDA's HTTPS device API (uplink only): `POST /v5/device-auth` for an access token, then
//! messages and property reports with the token in the `access_token` header. Served on its own
//! TLS listener, apart from the application API. Errors keep IoTDA's shape.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, post};
use bytes::Bytes;
use ioda_engine::https::{HttpsAccess, HttpsRefusal, HttpsUplink, TOKEN_LIFETIME_S};
use serde::Deserialize;
use serde_json::json;

/// The router of the HTTPS device API; bodies above `max_payload` bytes are refused (413).
pub fn device_router(access: Arc<HttpsAccess>, max_payload: usize) -> Router {
    Router::new()
        .route("/v5/device-auth", post(authenticate))
        .route(
            "/v5/devices/{device_id}/sys/messages/up",
            uplink_route(HttpsUplink::MessagesUp),
        )
        .route(
            "/v5/devices/{device_id}/sys/properties/report",
            uplink_route(HttpsUplink::PropertiesReport),
        )
        // IoTDA spells it with a hyphen over HTTPS.
        .route(
            "/v5/devices/{device_id}/sys/gateway/sub-devices/properties/report",
            uplink_route(HttpsUplink::SubDevicesReport),
        )
        .fallback(no_such_api)
        // One byte more than allowed reaches the handler, which answers in IoTDA's shape.
        .layer(DefaultBodyLimit::max(max_payload + 1))
        .with_state(access)
}

/// An error in IoTDA's shape.
struct DeviceApiError(StatusCode, &'static str, String);

impl IntoResponse for DeviceApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error_code": self.1, "error_msg": self.2 });
        (self.0, axum::Json(body)).into_response()
    }
}

fn invalid(why: impl Into<String>) -> DeviceApiError {
    DeviceApiError(
        StatusCode::BAD_REQUEST,
        "IOTDA.000006",
        format!("Invalid input data. {}", why.into()),
    )
}

impl From<HttpsRefusal> for DeviceApiError {
    fn from(refusal: HttpsRefusal) -> DeviceApiError {
        use HttpsRefusal::*;
        match refusal {
            AuthenticationFailed(why) => DeviceApiError(
                StatusCode::UNAUTHORIZED,
                "IOTDA.000002",
                format!("Authentication failed: {why}."),
            ),
            InvalidToken => DeviceApiError(
                StatusCode::FORBIDDEN,
                "IOTDA.000004",
                "Invalid access token: authenticate again with POST /v5/device-auth.".to_owned(),
            ),
            Frozen => DeviceApiError(
                StatusCode::FORBIDDEN,
                "IOTDA.000004",
                "The device is frozen.".to_owned(),
            ),
            InvalidInput(why) => invalid(why),
            RateLimited => DeviceApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "IOTDA.021101",
                "The request reached the device's maximum rate limit.".to_owned(),
            ),
            TooLarge => DeviceApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "IOTDA.000006",
                "Invalid input data. The body is larger than the largest payload.".to_owned(),
            ),
            Unavailable => DeviceApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "IOTDA.000000",
                "Internal error: the platform could not store the request.".to_owned(),
            ),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthRequest {
    device_id: String,
    sign_type: u8,
    timestamp: String,
    password: String,
}

async fn authenticate(
    State(access): State<Arc<HttpsAccess>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceApiError> {
    let body = body_of(body)?;
    let request: AuthRequest = serde_json::from_slice(&body)
        .map_err(|e| invalid(format!("The body is not a device-auth request: {e}.")))?;
    if !ioda_engine::auth::is_hour_stamp(&request.timestamp) {
        return Err(invalid("timestamp must be YYYYMMDDHH (10 digits)."));
    }
    if request.sign_type > 1 {
        return Err(invalid("sign_type must be 0 or 1."));
    }
    let token = access
        .authenticate(
            &request.device_id,
            request.sign_type,
            &request.timestamp,
            &request.password,
        )
        .await?;
    let answer = json!({ "access_token": token, "expires_in": TOKEN_LIFETIME_S });
    Ok(axum::Json(answer).into_response())
}

/// The route of one uplink resource: the token, then the body, into the platform.
fn uplink_route(uplink: HttpsUplink) -> MethodRouter<Arc<HttpsAccess>> {
    post(
        move |State(access): State<Arc<HttpsAccess>>,
              Path(device_id): Path<String>,
              headers: HeaderMap,
              body: Result<Bytes, BytesRejection>| async move {
            publish(&access, &device_id, &headers, uplink, body).await
        },
    )
}

async fn publish(
    access: &HttpsAccess,
    device_id: &str,
    headers: &HeaderMap,
    uplink: HttpsUplink,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, DeviceApiError> {
    let token = headers
        .get("access_token")
        .and_then(|v| v.to_str().ok())
        .ok_or(HttpsRefusal::InvalidToken)?;
    let body = body_of(body)?;
    access.publish(token, device_id, uplink, body).await?;
    Ok(StatusCode::OK)
}

/// The body, or why it could not be read (too large, say) in IoTDA's shape.
fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, DeviceApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => HttpsRefusal::TooLarge.into(),
        _ => invalid(rejection.body_text()),
    })
}

async fn no_such_api() -> DeviceApiError {
    DeviceApiError(
        StatusCode::NOT_FOUND,
        "IOTDA.000001",
        "The requested API does not exist. The HTTPS device API takes POST /v5/device-auth, \
         /v5/devices/{device_id}/sys/messages/up and /v5/devices/{device_id}/sys/properties/report."
            .to_owned(),
    )
}
