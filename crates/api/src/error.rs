//! API errors in IoTDA's shape: `{"error_code": "IOTDA.xxxxxx", "error_msg": "..."}` with the HTTP
//! status IoTDA uses. Internal details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ioda_engine::EngineError;
use serde_json::json;

/// Every error the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Authentication failed.")]
    Unauthorized,
    #[error("The project does not exist.")]
    ProjectNotFound,
    #[error("The access key does not belong to this project.")]
    ForeignProject,
    #[error("Invalid input. {0}")]
    BadRequestBody(String),
    #[error("Invalid input data. {0}")]
    Invalid(String),
    #[error("Invalid input. The specified parameter 'limit' is out of range.")]
    LimitOutOfRange,
    #[error("The {0} does not exist.")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("The requested API does not exist.")]
    NoSuchApi,
    #[error("Operation not allowed. The device is not online.")]
    DeviceOffline,
    #[error(
        "Command request timed out. Check whether the device is online and answers with the request_id it was sent."
    )]
    DeviceTimeout,
    #[error("The device has not subscribed to the topic.")]
    NotSubscribed,
    #[error("Internal error.")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "IOTDA.000002"),
            ApiError::ProjectNotFound => (StatusCode::NOT_FOUND, "IOTDA.000005"),
            ApiError::ForeignProject => (StatusCode::FORBIDDEN, "IOTDA.000004"),
            ApiError::BadRequestBody(_) => (StatusCode::BAD_REQUEST, "IOTDA.000008"),
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "IOTDA.000006"),
            ApiError::LimitOutOfRange => (StatusCode::BAD_REQUEST, "IOTDA.000017"),
            ApiError::NotFound("device") => (StatusCode::NOT_FOUND, "IOTDA.014000"),
            ApiError::NotFound("product") => (StatusCode::NOT_FOUND, "IOTDA.013000"),
            ApiError::NotFound("command") => (StatusCode::NOT_FOUND, "IOTDA.014140"),
            ApiError::NotFound("rule") => (StatusCode::NOT_FOUND, "IOTDA.010004"),
            ApiError::NotFound("action") => (StatusCode::NOT_FOUND, "IOTDA.010005"),
            ApiError::NotFound("message") => (StatusCode::NOT_FOUND, "IOTDA.014141"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "IOTDA.000007"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "IOTDA.014115"),
            ApiError::NoSuchApi => (StatusCode::NOT_FOUND, "IOTDA.000001"),
            ApiError::DeviceOffline => (StatusCode::FORBIDDEN, "IOTDA.014016"),
            ApiError::DeviceTimeout => (StatusCode::REQUEST_TIMEOUT, "IOTDA.014111"),
            ApiError::NotSubscribed => (StatusCode::BAD_REQUEST, "IOTDA.014112"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "IOTDA.000000"),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound("project") => ApiError::ProjectNotFound,
            EngineError::NotFound(what) => ApiError::NotFound(what),
            EngineError::Conflict(msg) => ApiError::Conflict(msg),
            EngineError::Invalid(msg) => ApiError::Invalid(msg),
            EngineError::DeviceOffline => ApiError::DeviceOffline,
            EngineError::DeviceTimeout => ApiError::DeviceTimeout,
            EngineError::NotSubscribed => ApiError::NotSubscribed,
            EngineError::Store(store) => ApiError::Internal(store.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error answered with 500");
        }
        (
            status,
            Json(json!({ "error_code": code, "error_msg": self.to_string() })),
        )
            .into_response()
    }
}
