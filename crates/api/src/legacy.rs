//! The legacy northbound API (OceanConnect `/iocm/app/...`) for subscriptions: log in with the
//! access key and secret, then subscribe a `callbackUrl` to a `notifyType`.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ioda_engine::EngineError;
use ioda_rules::Subscription;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::sign::same;

/// How long an access token lives.
const TOKEN_TTL_MS: i64 = 3_600_000;

/// Issued access tokens: token → (project, access key, expiry).
#[derive(Debug, Default)]
pub struct Tokens(Mutex<HashMap<String, (String, String, i64)>>);

/// A legacy error: `{"error_code", "error_desc"}` as the old platform answered.
#[derive(Debug)]
pub struct LegacyError(StatusCode, &'static str, String);

impl IntoResponse for LegacyError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({ "error_code": self.1, "error_desc": self.2 })),
        )
            .into_response()
    }
}

impl From<EngineError> for LegacyError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(msg) => LegacyError(StatusCode::BAD_REQUEST, "100022", msg),
            EngineError::NotFound(what) => LegacyError(
                StatusCode::NOT_FOUND,
                "100225",
                format!("The {what} does not exist."),
            ),
            other => LegacyError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "100001",
                other.to_string(),
            ),
        }
    }
}

fn unauthorized(msg: &str) -> LegacyError {
    LegacyError(StatusCode::UNAUTHORIZED, "1010005", msg.to_owned())
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte.
fn form_decode(text: &str) -> String {
    String::from_utf8_lossy(&crate::sign::decode_escapes(text, true)).into_owned()
}

fn form_field(body: &str, name: &str) -> Option<String> {
    body.split('&')
        .find_map(|pair| {
            pair.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| form_decode(v))
        })
        .filter(|v| !v.is_empty())
}

/// `POST /iocm/app/sec/v1.1.0/login` with `appId` (the access key) and `secret` (the secret key).
pub async fn login(
    State(state): State<AppState>,
    body: String,
) -> Result<Json<Value>, LegacyError> {
    let (Some(app_id), Some(secret)) = (form_field(&body, "appId"), form_field(&body, "secret"))
    else {
        return Err(LegacyError(
            StatusCode::BAD_REQUEST,
            "100022",
            "appId and secret are required (form-encoded)".into(),
        ));
    };
    let key = state
        .platform
        .access_key(&app_id)
        .filter(|k| same(&k.secret_key, &secret))
        .ok_or_else(|| unauthorized("AppId or secret is not right."))?;
    let mut bytes = [0u8; 16];
    let _ = getrandom::fill(&mut bytes);
    let token = hex::encode(bytes);
    let expires = state.platform.now() + TOKEN_TTL_MS;
    let mut tokens = state
        .legacy_tokens
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let now = state.platform.now();
    tokens.retain(|_, (_, _, expiry)| *expiry > now);
    tokens.insert(token.clone(), (key.project_id, key.access_key, expires));
    Ok(Json(
        json!({ "accessToken": token, "tokenType": "bearer", "expiresIn": TOKEN_TTL_MS / 1000, "refreshToken": token, "scope": "default" }),
    ))
}

/// The project of a request carrying `app_key` and `Authorization: Bearer <token>`.
#[derive(Debug, Clone)]
pub struct LegacyProject(pub String);

pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, LegacyError> {
    let header =
        |h: &HeaderMap, name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let app_key = header(request.headers(), "app_key")
        .ok_or_else(|| unauthorized("The app_key header is missing."))?;
    let token = header(request.headers(), "authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        .ok_or_else(|| unauthorized("Authorization: Bearer <accessToken> is missing."))?;
    let project = {
        let tokens = state
            .legacy_tokens
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        tokens
            .get(&token)
            .filter(|(_, ak, expiry)| *ak == app_key && *expiry > state.platform.now())
            .map(|(p, _, _)| p.clone())
    };
    let project = project.ok_or_else(|| unauthorized("Invalid accessToken."))?;
    request.extensions_mut().insert(LegacyProject(project));
    Ok(next.run(request).await)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeBody {
    notify_type: String,
    callback_url: String,
    app_id: Option<String>,
    #[allow(dead_code)]
    channel: Option<String>,
}

fn view(s: &Subscription) -> Value {
    json!({ "subscriptionId": s.subscription_id, "notifyType": s.notify_type, "callbackUrl": s.callback_url })
}

pub async fn subscribe(
    State(state): State<AppState>,
    axum::Extension(project): axum::Extension<LegacyProject>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), LegacyError> {
    let body: SubscribeBody = serde_json::from_slice(&body).map_err(|e| {
        LegacyError(
            StatusCode::BAD_REQUEST,
            "100022",
            format!("invalid body: {e}"),
        )
    })?;
    let subscription = state
        .forwarder
        .subscribe(
            &project.0,
            &body.notify_type,
            &body.callback_url,
            body.app_id,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(view(&subscription))))
}

pub async fn list(
    State(state): State<AppState>,
    axum::Extension(project): axum::Extension<LegacyProject>,
) -> Json<Value> {
    let subscriptions: Vec<Value> = state
        .forwarder
        .subscriptions(&project.0)
        .iter()
        .map(view)
        .collect();
    Json(
        json!({ "totalCount": subscriptions.len(), "pageNo": 0, "pageSize": subscriptions.len(), "subscriptions": subscriptions }),
    )
}

pub async fn show(
    State(state): State<AppState>,
    axum::Extension(project): axum::Extension<LegacyProject>,
    Path(id): Path<String>,
) -> Result<Json<Value>, LegacyError> {
    let found = state
        .forwarder
        .subscriptions(&project.0)
        .into_iter()
        .find(|s| s.subscription_id == id);
    found
        .map(|s| Json(view(&s)))
        .ok_or_else(|| EngineError::NotFound("subscription").into())
}

pub async fn unsubscribe(
    State(state): State<AppState>,
    axum::Extension(project): axum::Extension<LegacyProject>,
    Path(id): Path<String>,
) -> Result<StatusCode, LegacyError> {
    state.forwarder.unsubscribe(&project.0, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
