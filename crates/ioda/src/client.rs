//! A small REST client that signs requests like Huawei's SDK: used by `ioda api`, the tests and the
//! benchmarks.

use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use ioda_api::sign::{Algorithm, OutgoingRequest, authorization_header};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::serve::{CREDENTIALS_FILE, LISTENERS_FILE};

/// Which signature the client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    Classic,
    /// `V11-HMAC-SHA256` for this region.
    Derived(String),
}

/// A signed REST client bound to one server and one project.
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub addr: String,
    pub access_key: String,
    pub secret_key: String,
    pub project_id: String,
    pub signing: Signing,
}

/// A response: status, parsed JSON body (`Null` when empty) and the request id header.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
    pub request_id: Option<String>,
}

/// A request with every knob a test may want to turn.
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// Overrides `X-Sdk-Date` (to test the replay window).
    pub sdk_date: Option<String>,
    /// Send no `Authorization` header.
    pub unsigned: bool,
    /// Body sent instead of the signed one (to test tampering).
    pub tampered_body: Option<Vec<u8>>,
    /// Further headers, sent as given (not signed).
    pub extra_headers: Vec<(String, String)>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl ApiClient {
    /// Reads the server address and administrator credentials from a data directory.
    pub fn from_data_dir(data_dir: &Path) -> anyhow::Result<ApiClient> {
        let read = |name: &str| -> anyhow::Result<Value> {
            let path = data_dir.join(name);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {} (is the server running?)", path.display()))?;
            Ok(serde_json::from_str(&text)?)
        };
        let listeners = read(LISTENERS_FILE)?;
        let creds = read(CREDENTIALS_FILE)?;
        let field = |v: &Value, k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .with_context(|| format!("{k} missing"))
        };
        Ok(ApiClient {
            addr: field(&listeners, "http")?,
            access_key: field(&creds, "access_key")?,
            secret_key: field(&creds, "secret_key")?,
            project_id: field(&creds, "project_id")?,
            signing: Signing::Classic,
        })
    }

    /// The absolute path for a project-relative one.
    pub fn full_path(&self, path: &str) -> String {
        if path.starts_with("/v5/") || path.starts_with("/health") {
            path.to_owned()
        } else {
            format!("/v5/iot/{}{path}", self.project_id)
        }
    }

    /// A signed JSON call.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<ApiResponse> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        self.send(RawRequest {
            method: method.to_owned(),
            path: self.full_path(path),
            body,
            ..Default::default()
        })
        .await
    }

    /// A GET whose answer is text (`/metrics`).
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let (status, _, bytes) = self
            .send_raw(RawRequest {
                method: "GET".to_owned(),
                path: path.to_owned(),
                ..Default::default()
            })
            .await?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}");
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends a signed request; the answer's status, request id and body.
    async fn send_raw(&self, request: RawRequest) -> anyhow::Result<(u16, Option<String>, Bytes)> {
        let sdk_date = request
            .sdk_date
            .clone()
            .unwrap_or_else(|| ioda_types::time::format_compact(now_ms()));
        let (raw_path, raw_query) = match request.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (request.path.as_str(), None),
        };
        let headers = [
            ("content-type", "application/json"),
            ("host", self.addr.as_str()),
            ("x-project-id", self.project_id.as_str()),
            ("x-sdk-date", sdk_date.as_str()),
        ];
        let algorithm = match &self.signing {
            Signing::Classic => Algorithm::Classic,
            Signing::Derived(region) => Algorithm::Derived {
                date: sdk_date.chars().take(8).collect(),
                region: region.clone(),
                service: "iotdm".into(),
            },
        };
        let outgoing = OutgoingRequest {
            method: &request.method,
            raw_path,
            raw_query,
            headers: &headers,
            body: &request.body,
        };
        let authorization =
            authorization_header(&algorithm, &self.access_key, &self.secret_key, &outgoing);
        let mut builder = Request::builder()
            .method(request.method.as_str())
            .uri(&request.path);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        if !request.unsigned {
            builder = builder.header("authorization", authorization);
        }
        for (name, value) in &request.extra_headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body = request.tampered_body.unwrap_or(request.body);
        let http_request = builder.body(Full::new(Bytes::from(body)))?;
        let stream = TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let response = sender.send_request(http_request).await?;
        let status = response.status().as_u16();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, request_id, bytes))
    }

    /// Sends a request exactly as described and reads its JSON answer.
    pub async fn send(&self, request: RawRequest) -> anyhow::Result<ApiResponse> {
        let (status, request_id, bytes) = self.send_raw(request).await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(_) => bail!(
                    "HTTP {status}: body is not JSON: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            }
        };
        Ok(ApiResponse {
            status,
            body,
            request_id,
        })
    }
}
