//! ioda's REST API v5: the paths, field names, status codes and errors of Huawei IoTDA, so the
//! official application SDK works unchanged. Handlers translate between DTOs and the engine; the
//! platform logic lives in `ioda-engine`.

mod auth;
mod commands;
pub mod device_https;
mod devices;
mod error;
mod extract;
mod legacy;
mod messages;
mod products;
mod routing;
pub mod sign;
mod trace;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::Response;
use axum::routing::{get, post};
use ioda_engine::Platform;
use ioda_rules::Forwarder;

pub use error::ApiError;

/// Shared state of every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub platform: Arc<Platform>,
    pub forwarder: Arc<Forwarder>,
    /// Access tokens of the legacy northbound API.
    pub legacy_tokens: Arc<legacy::Tokens>,
    /// How far `X-Sdk-Date` may be from the server clock, in milliseconds.
    pub signature_window_ms: i64,
}

/// Largest request body accepted.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// The whole API.
pub fn router(
    platform: Arc<Platform>,
    forwarder: Arc<Forwarder>,
    signature_window_ms: i64,
) -> Router {
    let state = AppState {
        platform,
        forwarder,
        legacy_tokens: Arc::default(),
        signature_window_ms,
    };
    let v5 = Router::new()
        .route("/products", post(products::create).get(products::list))
        .route(
            "/products/{product_id}",
            get(products::show)
                .put(products::update)
                .delete(products::delete),
        )
        .route(
            "/products/{product_id}/codec",
            get(products::get_codec)
                .put(products::put_codec)
                .delete(products::delete_codec),
        )
        .route(
            "/products/{product_id}/codec/test",
            post(products::test_codec),
        )
        .route("/devices", post(devices::create).get(devices::list))
        .route(
            "/devices/{device_id}",
            get(devices::show)
                .put(devices::update)
                .delete(devices::delete),
        )
        .route("/devices/{device_id}/action", post(devices::action))
        .route("/devices/{device_id}/freeze", post(devices::freeze))
        .route("/devices/{device_id}/unfreeze", post(devices::unfreeze))
        .route(
            "/devices/{device_id}/shadow",
            get(devices::shadow).put(commands::update_desired),
        )
        .route(
            "/devices/{device_id}/commands",
            post(commands::create_command),
        )
        .route(
            "/devices/{device_id}/async-commands",
            post(commands::create_async_command).get(commands::list_async_commands),
        )
        .route(
            "/devices/{device_id}/async-commands/{command_id}",
            get(commands::show_async_command),
        )
        .route(
            "/devices/{device_id}/properties",
            get(commands::list_properties).put(commands::update_properties),
        )
        .route(
            "/devices/{device_id}/messages",
            post(messages::create).get(messages::list),
        )
        .route(
            "/devices/{device_id}/messages/{message_id}",
            get(messages::show),
        )
        .route("/devices/{device_id}/trace", get(trace::show))
        .route("/devices/{device_id}/trace/start", post(trace::start))
        .route("/devices/{device_id}/trace/stop", post(trace::stop))
        .route(
            "/devices/{device_id}/property-history",
            get(devices::history),
        )
        .route(
            "/routing-rule/rules",
            post(routing::create_rule).get(routing::list_rules),
        )
        .route(
            "/routing-rule/rules/{rule_id}",
            get(routing::show_rule)
                .put(routing::update_rule)
                .delete(routing::delete_rule),
        )
        .route(
            "/routing-rule/actions",
            post(routing::create_action).get(routing::list_actions),
        )
        .route(
            "/routing-rule/actions/{action_id}",
            get(routing::show_action)
                .put(routing::update_action)
                .delete(routing::delete_action),
        )
        .route(
            "/routing-rule/actions/{action_id}/status",
            get(routing::action_status),
        )
        .fallback(no_such_api)
        .layer(from_fn_with_state(state.clone(), auth::authenticate));
    let legacy = Router::new()
        .route(
            "/iocm/app/sub/v1.2.0/subscriptions",
            post(legacy::subscribe).get(legacy::list),
        )
        .route(
            "/iocm/app/sub/v1.2.0/subscriptions/{subscription_id}",
            get(legacy::show).delete(legacy::unsubscribe),
        )
        .layer(from_fn_with_state(state.clone(), legacy::authenticate));
    Router::new()
        .nest("/v5/iot/{project_id}", v5)
        .merge(legacy)
        .route("/iocm/app/sec/v1.1.0/login", post(legacy::login))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(no_such_api)
        .layer(from_fn(request_id))
        .with_state(state)
}

/// The process's metrics in the Prometheus text format. Like `/health`, unsigned: a scraper
/// holds no AK/SK, and it shows counts and timings only.
async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut out = String::new();
            ioda_mqtt::stats::render(&mut out);
            ioda_store::stats::render(&mut out);
            out
        },
    )
}

async fn no_such_api() -> ApiError {
    ApiError::NoSuchApi
}

/// Gives every response an `X-Request-Id`, which the SDK surfaces on its exceptions.
async fn request_id(request: Request, next: Next) -> Response {
    let id = hex::encode(rand_id());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    if response.status().is_client_error() || response.status().is_server_error() {
        tracing::debug!(request_id = %id, %method, %path, status = %response.status(), "request failed");
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

fn rand_id() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    // A request id only needs to be unique enough to find a log line; zeros are an acceptable fallback.
    let _ = getrandom::fill(&mut bytes);
    bytes
}
