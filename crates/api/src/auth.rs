//! Request authentication: the AK/SK signature, then the project in the path.

use axum::body::Body;
use axum::extract::{OriginalUri, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::sign::{RequestParts, verify};
use crate::{AppState, MAX_BODY};

/// Verifies the signature over the buffered body and checks the key may act on the path's project.
pub async fn authenticate(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::Invalid(format!("the request body exceeds {MAX_BODY} bytes")))?;
    // Nesting strips the `/v5/iot/{project_id}` prefix from the URI; the signature covers the original.
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    let platform = &state.platform;
    // Scoped so the borrowed header view is gone before the handler is awaited.
    let access_key = {
        let header = |name: &str| {
            let values: Vec<&str> = parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        };
        let request_parts = RequestParts {
            method: parts.method.as_str(),
            raw_path: uri.path(),
            raw_query: uri.query(),
            header: &header,
            body: &bytes,
        };
        verify(
            &request_parts,
            platform.now(),
            state.signature_window_ms,
            |ak| platform.access_key(ak).map(|k| k.secret_key),
        )
    }
    .map_err(|reason| {
        tracing::info!(%reason, path = uri.path(), "API signature refused");
        ApiError::Unauthorized
    })?;
    let project_id = uri.path().split('/').nth(3).unwrap_or_default();
    if platform.project(project_id).is_none() {
        return Err(ApiError::ProjectNotFound);
    }
    if platform
        .access_key(&access_key)
        .is_none_or(|k| k.project_id != project_id)
    {
        return Err(ApiError::ForeignProject);
    }
    Ok(next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await)
}
