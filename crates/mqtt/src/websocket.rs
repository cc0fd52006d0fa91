//! MQTT over WebSocket (IoTDA's `wss://{host}:443/mqtt`): an HTTP upgrade on the configured path,
//! then MQTT's bytes carried in binary frames.
//!
//! MQTT runs on a byte stream, so [`WebSocketBytes`] turns the WebSocket back into one: a packet
//! may span frames and a frame may hold several packets (MQTT 5.0 §6.0). The adapter is ours
//! because no maintained crate offers it for tokio: `ws_stream_tungstenite` speaks the `futures`
//! traits over `async-tungstenite`, a second WebSocket stack beside `tokio-tungstenite`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::listener::Upgrade;

/// The path IoTDA's devices open (`wss://…/mqtt`).
pub const MQTT_PATH: &str = "/mqtt";

/// Subprotocols a client may ask for: `mqtt` (3.1.1 and 5.0) and `mqttv3.1` (3.1); the first one
/// the client lists is chosen.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Upgrades a connection already upgraded by `inner` (nothing, or TLS) to MQTT over WebSocket.
pub struct WebSocketUpgrade<U> {
    inner: Arc<U>,
    config: WebSocketConfig,
}

impl<U: Upgrade> WebSocketUpgrade<U> {
    /// `max_packet_size` bounds a message the client may send (one MQTT packet may fill a message).
    pub fn new(inner: Arc<U>, max_packet_size: usize) -> WebSocketUpgrade<U> {
        let mut config = WebSocketConfig::default();
        // tungstenite reserves its read buffer up front: 128 KiB by default, per connection.
        // 1 KiB holds a property report; a larger frame grows it (idle ws connections: 7.1-7.7
        // KB each with 1 KiB, 11.3 KB with 4 KiB; see BENCHMARKS.md).
        config.read_buffer_size = 1024;
        // Each write goes out as it is made; MQTT batches its own writes.
        config.write_buffer_size = 0;
        config.max_message_size = Some(max_packet_size);
        config.max_frame_size = Some(max_packet_size);
        WebSocketUpgrade { inner, config }
    }
}

impl<U: Upgrade> Upgrade for WebSocketUpgrade<U> {
    type Stream = WebSocketBytes<U::Stream>;

    async fn upgrade(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Self::Stream> {
        let stream = self.inner.upgrade(tcp, peer).await?;
        let accepted =
            tokio_tungstenite::accept_hdr_async_with_config(stream, answer, Some(self.config))
                .await;
        match accepted {
            Ok(socket) => Some(WebSocketBytes::new(socket)),
            Err(error) => {
                tracing::debug!(%peer, %error, "mqtt websocket upgrade failed");
                None
            }
        }
    }
}

/// Answers a WebSocket upgrade request: the MQTT path only, and the MQTT subprotocol when the
/// client names subprotocols (a client naming none is served too: some embedded stacks send none).
#[allow(clippy::result_large_err)] // the shape of tungstenite's `Callback`
fn answer(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let path = request.uri().path();
    if path != MQTT_PATH && path != "/mqtt/" {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            format!("MQTT over WebSocket is served on {MQTT_PATH}, not {path}"),
        ));
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(response);
    }
    let Some(chosen) = offered.iter().find(|name| {
        SUBPROTOCOLS
            .iter()
            .any(|ours| name.eq_ignore_ascii_case(ours))
    }) else {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "no subprotocol this server speaks among {offered:?}: offer \"mqtt\" (MQTT 3.1.1 and 5.0)"
            ),
        ));
    };
    if let Ok(value) = HeaderValue::from_str(chosen) {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    Ok(response)
}

fn refusal(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
}

/// A WebSocket read and written as the byte stream MQTT runs on: what arrives in binary frames
/// is read in order; each write goes out as one binary frame.
pub struct WebSocketBytes<S> {
    socket: WebSocketStream<S>,
    /// What the last binary frame held beyond what the reader has taken yet.
    unread: Bytes,
}

impl<S> WebSocketBytes<S> {
    pub fn new(socket: WebSocketStream<S>) -> WebSocketBytes<S> {
        WebSocketBytes {
            socket,
            unread: Bytes::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocketBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.unread.is_empty() {
                let taken = self.unread.len().min(buf.remaining());
                buf.put_slice(&self.unread.split_to(taken));
                return Poll::Ready(Ok(()));
            }
            // Pings are answered by tungstenite as it reads; a close ends the stream.
            match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.unread = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    // MQTT 5.0 §6.0: any other data frame closes the connection.
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "MQTT over WebSocket is carried in binary frames, not text",
                    )));
                }
                Some(Err(error)) => return Poll::Ready(read_error(error)),
            }
        }
    }
}

/// A closed WebSocket is the end of the stream; anything else is an I/O error.
fn read_error(error: WsError) -> std::io::Result<()> {
    match error {
        WsError::ConnectionClosed | WsError::AlreadyClosed => Ok(()),
        WsError::Io(error) => Err(error),
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            other.to_string(),
        )),
    }
}

fn write_error(error: WsError) -> std::io::Error {
    match error {
        WsError::Io(error) => error,
        other => std::io::Error::new(std::io::ErrorKind::BrokenPipe, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WebSocketBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut socket = Pin::new(&mut self.socket);
        ready!(socket.as_mut().poll_ready(cx)).map_err(write_error)?;
        socket
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(write_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket)
            .poll_flush(cx)
            .map_err(write_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match ready!(Pin::new(&mut self.socket).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(write_error(error))),
        }
    }
}
