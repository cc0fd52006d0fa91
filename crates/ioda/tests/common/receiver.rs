//! A hand-rolled HTTP receiver for forwarding tests, so a test controls exactly how it answers
//! (and misbehaves): status codes, hangs, dropped connections, slow answers; it counts requests
//! in flight.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    Ok,
    Status(u16),
    Hang,
    Close,
}

/// A hand-rolled HTTP receiver, so tests control exactly how it misbehaves.
#[derive(Clone, Default)]
pub struct Receiver {
    /// Every request seen: the message id header and the JSON body.
    pub seen: Arc<Mutex<Vec<(String, Value)>>>,
    /// Bodies of the requests answered 200.
    pub accepted: Arc<Mutex<Vec<Value>>>,
    pub script: Arc<Mutex<VecDeque<Answer>>>,
    /// How long each answer takes, in milliseconds.
    pub delay_ms: Arc<AtomicU64>,
    /// Requests being answered now, and the most ever at once.
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
}

impl Receiver {
    pub async fn start() -> (Receiver, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/push", listener.local_addr().unwrap());
        let receiver = Receiver::default();
        let handle = receiver.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle.clone().serve(stream));
            }
        });
        (receiver, url)
    }

    pub fn plan(&self, answers: &[Answer]) {
        self.script.lock().unwrap().extend(answers.iter().copied());
    }

    /// Like `start`, but speaking https with the given certificate chain and key.
    pub async fn start_tls(config: rustls::ServerConfig) -> (Receiver, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://localhost:{}/push",
            listener.local_addr().unwrap().port()
        );
        let receiver = Receiver::default();
        let handle = receiver.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (handle, acceptor) = (handle.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        handle.serve(tls).await;
                    }
                });
            }
        });
        (receiver, url)
    }

    pub async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        self,
        mut stream: S,
    ) {
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        let (head_end, length) = loop {
            let Ok(n) = stream.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            data.extend_from_slice(&buf[..n]);
            if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..i]).to_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                break (i + 4, length);
            }
        };
        while data.len() < head_end + length {
            let Ok(n) = stream.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            data.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
        let id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-ioda-message-id:"))
            .unwrap_or("")
            .trim()
            .to_owned();
        let body: Value =
            serde_json::from_slice(&data[head_end..head_end + length]).unwrap_or(Value::Null);
        self.seen.lock().unwrap().push((id, body.clone()));
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight
            .fetch_max(now_in_flight, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Answer::Ok);
        let status = match answer {
            Answer::Ok => 200,
            Answer::Status(code) => code,
            Answer::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            Answer::Close => return,
        };
        if status == 200 {
            self.accepted.lock().unwrap().push(body);
        }
        let _ = stream
            .write_all(
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
    }

    pub fn accepted(&self) -> Vec<Value> {
        self.accepted.lock().unwrap().clone()
    }
}
