//! CoAPS: DTLS 1.2 with pre-shared keys over one UDP socket, through OpenSSL. Each peer gets a
//! session task; the CoAP driver sees plain CoAP datagrams with the peer's authenticated identity.
//!
//! OpenSSL offers exactly IoTDA's two suites: `TLS_PSK_WITH_AES_128_CCM_8` (which OpenSSL 3 keeps
//! below its default security level, so it is enabled explicitly) and
//! `TLS_PSK_WITH_AES_128_CBC_SHA256`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use openssl::ssl::{Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_openssl::SslStream;

/// The pre-shared key of an identity (the device's node id), if it has one.
pub type PskLookup = Arc<dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync>;

/// IoTDA's cipher suites, in OpenSSL's names: `TLS_PSK_WITH_AES_128_CCM_8` and
/// `TLS_PSK_WITH_AES_128_CBC_SHA256`.
pub const SUITES: &[&str] = &["PSK-AES128-CCM8", "PSK-AES128-CBC-SHA256"];
const MTU: u32 = 1200;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A session nobody used for this long is dropped (the device does a new handshake).
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

type Peers = Arc<Mutex<HashMap<SocketAddr, Peer>>>;

struct Peer {
    /// Encrypted datagrams from the peer, for its session task.
    records: mpsc::Sender<Vec<u8>>,
    /// Plain CoAP to encrypt and send, once the handshake is done.
    plain: Option<mpsc::Sender<Vec<u8>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A DTLS listener: decrypted datagrams come out of `recv`, `send` encrypts for a peer.
pub(crate) struct Dtls {
    inbound: mpsc::Receiver<(SocketAddr, String, Vec<u8>)>,
    peers: Peers,
    local: SocketAddr,
}

fn context(psk: PskLookup, suites: &[String]) -> Result<SslContext, openssl::error::ErrorStack> {
    let mut ctx = SslContextBuilder::new(SslMethod::dtls_server())?;
    ctx.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    // CCM8 sits below OpenSSL 3's default security level: it has to be asked for.
    ctx.set_cipher_list(&format!("{}:@SECLEVEL=0", suites.join(":")))?;
    ctx.set_options(SslOptions::NO_QUERY_MTU);
    ctx.set_psk_server_callback(move |_ssl, identity, out| {
        let identity = identity.map(String::from_utf8_lossy).unwrap_or_default();
        let key = psk(&identity).filter(|k| !k.is_empty() && k.len() <= out.len());
        match key {
            Some(key) => {
                out[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            }
            // Zero bytes: OpenSSL fails the handshake (unknown identity).
            None => Ok(0),
        }
    });
    Ok(ctx.build())
}

impl Dtls {
    pub(crate) async fn bind(
        addr: SocketAddr,
        psk: PskLookup,
        suites: &[String],
    ) -> io::Result<Dtls> {
        if let Some(unknown) = suites.iter().find(|s| !SUITES.contains(&s.as_str())) {
            return Err(io::Error::other(format!(
                "cipher suite {unknown} is not offered; choose from {}",
                SUITES.join(", ")
            )));
        }
        let ctx = context(psk, suites).map_err(io::Error::other)?;
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        let local = socket.local_addr()?;
        let (to_driver, inbound) = mpsc::channel(1024);
        let peers: Peers = Arc::default();
        tokio::spawn(demultiplex(socket, ctx, peers.clone(), to_driver));
        Ok(Dtls {
            inbound,
            peers,
            local,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next decrypted datagram: its peer, the peer's PSK identity and the plain bytes.
    pub(crate) async fn recv(&mut self) -> Option<(SocketAddr, String, Vec<u8>)> {
        self.inbound.recv().await
    }

    /// Encrypts and sends to a peer with an established session (dropped otherwise).
    pub(crate) fn send(&self, to: SocketAddr, bytes: Vec<u8>) {
        let plain = lock(&self.peers).get(&to).and_then(|p| p.plain.clone());
        if let Some(plain) = plain {
            let _ = plain.try_send(bytes);
        }
    }
}

/// A DTLS ClientHello (handshake record, epoch 0): a peer starting over.
fn is_client_hello(datagram: &[u8]) -> bool {
    datagram.len() > 13 && datagram[0] == 22 && datagram[3..5] == [0, 0] && datagram[13] == 1
}

async fn demultiplex(
    socket: Arc<UdpSocket>,
    ctx: SslContext,
    peers: Peers,
    to_driver: mpsc::Sender<(SocketAddr, String, Vec<u8>)>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let datagram = buf[..n].to_vec();
        let existing = {
            let peers = lock(&peers);
            peers
                .get(&from)
                .filter(|p| !(p.plain.is_some() && is_client_hello(&datagram)))
                .map(|p| p.records.clone())
        };
        let records = match existing {
            Some(records) if !records.is_closed() => records,
            _ => {
                if !is_client_hello(&datagram) {
                    continue; // Not a session we know, and not the start of one.
                }
                let (records, rx) = mpsc::channel(64);
                lock(&peers).insert(
                    from,
                    Peer {
                        records: records.clone(),
                        plain: None,
                    },
                );
                let session = Session {
                    socket: socket.clone(),
                    peer: from,
                    records: rx,
                };
                tokio::spawn(run_session(
                    ctx.clone(),
                    session,
                    peers.clone(),
                    to_driver.clone(),
                ));
                records
            }
        };
        let _ = records.try_send(datagram);
    }
}

/// One peer's datagrams as a stream OpenSSL can drive: each read yields one datagram, each write
/// sends one.
struct Session {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    records: mpsc::Receiver<Vec<u8>>,
}

impl AsyncRead for Session {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.records.poll_recv(cx) {
            Poll::Ready(Some(datagram)) => {
                let n = datagram.len().min(buf.remaining());
                buf.put_slice(&datagram[..n]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(None) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Session {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.socket.poll_send_to(cx, buf, self.peer)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn run_session(
    ctx: SslContext,
    session: Session,
    peers: Peers,
    to_driver: mpsc::Sender<(SocketAddr, String, Vec<u8>)>,
) {
    let peer = session.peer;
    if let Err(why) = serve_session(ctx, session, &peers, to_driver).await {
        tracing::info!(%peer, why, "DTLS session ended");
    }
    let mut peers = lock(&peers);
    if peers.get(&peer).is_some_and(|p| p.records.is_closed()) {
        peers.remove(&peer);
    }
}

async fn serve_session(
    ctx: SslContext,
    session: Session,
    peers: &Peers,
    to_driver: mpsc::Sender<(SocketAddr, String, Vec<u8>)>,
) -> Result<(), String> {
    let peer = session.peer;
    let mut ssl = Ssl::new(&ctx).map_err(|e| e.to_string())?;
    ssl.set_mtu(MTU).map_err(|e| e.to_string())?;
    let mut stream = SslStream::new(ssl, session).map_err(|e| e.to_string())?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, Pin::new(&mut stream).accept())
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake failed: {e}"))?;
    let identity = stream
        .ssl()
        .psk_identity()
        .map(|i| String::from_utf8_lossy(i).into_owned())
        .unwrap_or_default();
    let (plain_tx, mut plain_rx) = mpsc::channel::<Vec<u8>>(64);
    if let Some(entry) = lock(peers).get_mut(&peer) {
        entry.plain = Some(plain_tx);
    }
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            read = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf)) => {
                let n = match read {
                    Ok(Ok(n)) if n > 0 => n,
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("idle".into()),
                };
                if to_driver.send((peer, identity.clone(), buf[..n].to_vec())).await.is_err() {
                    return Ok(());
                }
            }
            Some(plain) = plain_rx.recv() => {
                stream.write_all(&plain).await.map_err(|e| e.to_string())?;
            }
        }
    }
}
