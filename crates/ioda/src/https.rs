//! The HTTPS device API's listener: TLS (the MQTTS setup), then HTTP/1.1 into the device router.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use ioda_mqtt::server::Upgrade;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::tls::TlsUpgrade;

/// A device that opens a connection must finish its TLS handshake, and then each request's
/// header, within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` turns true; then lets each connection finish the request it is in.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<TlsUpgrade>,
    router: Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let (tls, router, stop) = (tls.clone(), router.clone(), stop.clone());
                    connections.spawn(async move {
                        let upgraded = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.upgrade(tcp, peer)).await;
                        if let Ok(Some(stream)) = upgraded {
                            serve_connection(stream, router, stop).await;
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "https accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<S>(stream: S, router: Router, mut stop: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            // A client sending its body slowly does not hold the stop for long.
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, connection).await;
        }
    }
}

/// Resolves once `stop` turns true (the guard `wait_for` returns is dropped here, not held).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
