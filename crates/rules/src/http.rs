//! HTTP_FORWARDING: POST the message as JSON to the application's URL, over http or https (with
//! the system's roots or a custom CA). Success is a 2xx answer within the timeout; anything else
//! is a failed attempt the queue retries.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// TLS settings of an https target.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A parsed target.
#[derive(Debug, Clone)]
pub struct Target {
    pub authority: String,
    pub path_and_query: String,
    pub tls: Option<Tls>,
}

fn split(rest: &str, default_port: u16, url: &str) -> Result<(String, String, String), String> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(['@', ' ', '?', '#']) {
        return Err(format!("url has no valid host[:port]: {url:?}"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("url has no valid host[:port]: {url:?}"))?,
        ),
        None => (authority, default_port),
    };
    if host.is_empty() {
        return Err(format!("url has no valid host[:port]: {url:?}"));
    }
    Ok((host.to_owned(), format!("{host}:{port}"), path.to_owned()))
}

fn tls_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("ca_pem is not PEM: {e}"))?;
            if certs.is_empty() {
                return Err("ca_pem holds no certificate".into());
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("ca_pem: {e}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Checks and splits a forwarding URL. For https, `detail` may carry `ca_pem` (the CA that signed
/// the receiver's certificate, PEM) and `cn_name` (the name to verify instead of the host).
pub fn parse_url(url: &str, detail: &Value) -> Result<Target, String> {
    if let Some(rest) = url.strip_prefix("http://") {
        let (_, authority, path_and_query) = split(rest, 80, url)?;
        return Ok(Target {
            authority,
            path_and_query,
            tls: None,
        });
    }
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "url must start with http:// or https://, got {url:?}"
        ));
    };
    let (host, authority, path_and_query) = split(rest, 443, url)?;
    let name = detail
        .get("cn_name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or(&host)
        .to_owned();
    let server_name =
        ServerName::try_from(name).map_err(|e| format!("invalid TLS server name: {e}"))?;
    let config = tls_config(detail.get("ca_pem").and_then(Value::as_str))?;
    Ok(Target {
        authority,
        path_and_query,
        tls: Some(Tls {
            config,
            server_name,
        }),
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn handshake<IO>(io: IO) -> Result<Sender, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn open(target: &Target) -> Result<Sender, String> {
    let stream = TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("connect {}: {e}", target.authority))?;
    let _ = stream.set_nodelay(true);
    match &target.tls {
        None => handshake(stream).await,
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let stream = connector
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            handshake(stream).await
        }
    }
}

/// An HTTP target with a kept-alive connection, reopened whenever the receiver closes it.
#[derive(Debug)]
pub struct HttpSink {
    target: Target,
    sender: Option<Sender>,
}

impl HttpSink {
    pub fn new(target: Target) -> HttpSink {
        HttpSink {
            target,
            sender: None,
        }
    }

    /// Sends one message; `Err` carries a reason fit for an operator.
    pub async fn post(
        &mut self,
        message_id: &str,
        payload: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let attempt = self.attempt(message_id, payload);
        let outcome = tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", timeout.as_secs_f32())));
        if outcome.is_err() {
            self.sender = None;
        }
        outcome
    }

    async fn attempt(&mut self, message_id: &str, payload: &str) -> Result<(), String> {
        let reusable = match self.sender.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            self.sender = Some(open(&self.target).await?);
        }
        let Some(sender) = self.sender.as_mut() else {
            return Err("no connection".into());
        };
        let request = Request::post(&self.target.path_and_query)
            .header("host", &self.target.authority)
            .header("content-type", "application/json; charset=utf-8")
            .header("x-ioda-message-id", message_id)
            .body(Full::new(Bytes::from(payload.to_owned())))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status();
        // Read the body to the end so the connection can carry the next request.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_table() {
        let none = Value::Null;
        let cases: Vec<(&str, Option<(&str, &str, bool)>)> = vec![
            (
                "http://127.0.0.1:8080/push",
                Some(("127.0.0.1:8080", "/push", false)),
            ),
            (
                "http://example.com/a?b=c",
                Some(("example.com:80", "/a?b=c", false)),
            ),
            ("http://host:9", Some(("host:9", "/", false))),
            ("https://localhost/x", Some(("localhost:443", "/x", true))),
            ("ftp://host/x", None),
            ("http://:80/x", None),
            ("http://host:99999/x", None),
            ("http://user@host/x", None),
            ("http:///x", None),
        ];
        for (url, want) in cases {
            let got = parse_url(url, &none)
                .ok()
                .map(|t| (t.authority, t.path_and_query, t.tls.is_some()));
            let want = want.map(|(a, p, tls)| (a.to_owned(), p.to_owned(), tls));
            assert_eq!(got, want, "{url}");
        }
        let bad_ca = serde_json::json!({"ca_pem": "not a certificate"});
        assert!(parse_url("https://localhost/x", &bad_ca).is_err());
    }
}
