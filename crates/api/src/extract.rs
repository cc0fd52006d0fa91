//! Body and query extraction that answers malformed input with IoTDA errors instead of axum's
//! plain-text rejections.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body; unknown fields and wrong types are refused with `IOTDA.000008` and serde's reason.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequestBody(format!("unreadable body: {e}")))?;
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            &b"{}"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes)
            .map(Body)
            .map_err(|e| ApiError::BadRequestBody(format!("malformed JSON body: {e}")))
    }
}

/// Query parameters, refused with `IOTDA.000006` when they do not parse.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::Invalid(e.body_text()))
    }
}

/// The IoTDA pagination parameters, checked against their ranges.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Records with a sequence number below this one.
    pub before: i64,
    pub offset: i64,
    pub limit: i64,
}

impl Page {
    pub fn from_params(
        limit: Option<i64>,
        marker: Option<&str>,
        offset: Option<i64>,
    ) -> Result<Page, ApiError> {
        let limit = limit.unwrap_or(10);
        if !(1..=50).contains(&limit) {
            return Err(ApiError::LimitOutOfRange);
        }
        let offset = offset.unwrap_or(0);
        if !(0..=500).contains(&offset) {
            return Err(ApiError::Invalid("offset must be between 0 and 500".into()));
        }
        let before = match marker {
            None | Some("") => i64::MAX,
            Some(m) => ioda_types::ids::parse_marker(m)
                .ok_or_else(|| ApiError::Invalid("marker must be 24 hex digits".into()))?,
        };
        Ok(Page {
            before,
            offset,
            limit,
        })
    }
}
