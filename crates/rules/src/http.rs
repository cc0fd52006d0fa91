//! HTTP_FORWARDING: POST the message as JSON to the application's URL. Success is a 2xx answer
//! within the timeout; anything else is a failed attempt the queue retries.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A parsed `http://host:port/path` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub authority: String,
    pub path_and_query: String,
}

/// Checks and splits a forwarding URL. Only plain `http` for now (see the notes in ARCHITECTURE.md).
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err("https forwarding needs TLS, which ioda does not offer yet; use http".into());
    } else {
        return Err(format!("url must start with http://, got {url:?}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host_ok = !authority.is_empty() && !authority.contains(['@', ' ', '?', '#']);
    let port_ok = match authority.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => true,
    };
    if !host_ok || !port_ok {
        return Err(format!("url has no valid host[:port]: {url:?}"));
    }
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(Target {
        authority,
        path_and_query: path.to_owned(),
    })
}

/// Sends one message; `Err` carries a reason fit for an operator.
pub async fn post(
    target: &Target,
    message_id: &str,
    payload: &str,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("connect {}: {e}", target.authority))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        let request = Request::post(&target.path_and_query)
            .header("host", &target.authority)
            .header("content-type", "application/json; charset=utf-8")
            .header("x-ioda-message-id", message_id)
            .body(Full::new(Bytes::from(payload.to_owned())))
            .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status();
        // Drain the body so the connection closes cleanly; its content does not matter.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs_f32()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_table() {
        let ok = |a: &str, p: &str| {
            Ok(Target {
                authority: a.into(),
                path_and_query: p.into(),
            })
        };
        let cases: Vec<(&str, Result<Target, ()>)> = vec![
            (
                "http://127.0.0.1:8080/push",
                ok("127.0.0.1:8080", "/push").map_err(|_: String| ()),
            ),
            (
                "http://example.com/a?b=c",
                ok("example.com:80", "/a?b=c").map_err(|_: String| ()),
            ),
            ("http://host:9", ok("host:9", "/").map_err(|_: String| ())),
            ("https://host/x", Err(())),
            ("ftp://host/x", Err(())),
            ("http://:80/x", Err(())),
            ("http://host:99999/x", Err(())),
            ("http://user@host/x", Err(())),
            ("http:///x", Err(())),
        ];
        for (url, want) in cases {
            assert_eq!(parse_url(url).map_err(|_| ()), want, "{url}");
        }
    }
}
