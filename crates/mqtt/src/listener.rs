//! Accepting connections: plain TCP, or TCP upgraded first (a TLS handshake) by an [`Upgrade`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::server::{Broker, Limits, run_connection};

/// Turns an accepted TCP connection into the byte stream MQTT runs over (a TLS handshake, say).
/// `None` drops the connection: the upgrade logs why.
pub trait Upgrade: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn upgrade(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Self::Stream>> + Send;
}

/// Plain MQTT on TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTcp;

impl Upgrade for PlainTcp {
    type Stream = TcpStream;

    async fn upgrade(&self, tcp: TcpStream, _peer: SocketAddr) -> Option<TcpStream> {
        Some(tcp)
    }
}

/// Accepts plain MQTT connections until `shutdown` turns true, then waits for every connection to
/// close.
pub async fn serve<B: Broker>(
    listener: TcpListener,
    broker: Arc<B>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    serve_upgraded(listener, Arc::new(PlainTcp), broker, limits, shutdown).await;
}

/// Like [`serve`], each connection upgraded by `upgrade` first; the upgrade and CONNECT share
/// `limits.connect_timeout` each, so a peer that never finishes its handshake is dropped too.
pub async fn serve_upgraded<U: Upgrade, B: Broker>(
    listener: TcpListener,
    upgrade: Arc<U>,
    broker: Arc<B>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let for_connections = shutdown.clone();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let (upgrade, broker, mut shutdown) = (upgrade.clone(), broker.clone(), for_connections.clone());
                    tasks.spawn(async move {
                        // Boxed: the handshake's state is not kept beside an idle connection.
                        let upgrading = timeout(limits.connect_timeout, Box::pin(upgrade.upgrade(tcp, peer)));
                        let stream = tokio::select! {
                            upgraded = upgrading => upgraded.ok().flatten(),
                            _ = stopped(&mut shutdown) => None,
                        };
                        if let Some(stream) = stream {
                            run_connection(stream, peer, broker, limits, shutdown).await;
                        }
                    });
                }
                Err(error) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
