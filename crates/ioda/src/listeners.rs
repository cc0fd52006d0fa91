//! The device-facing listeners: plain MQTT, MQTTS, MQTT over WebSocket (`ws`) and over secure
//! WebSocket (`wss`), all four to the same broker, and the HTTPS device API. MQTTS, wss and
//! HTTPS share one TLS setup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use ioda_mqtt::server::{Broker, Limits, PlainTcp, Upgrade, serve_upgraded};
use ioda_mqtt::websocket::WebSocketUpgrade;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServeConfig;
use crate::serve::connectable;
use crate::tls::TlsUpgrade;

/// Bound, not yet serving.
pub(crate) struct DeviceListeners {
    plain: TcpListener,
    mqtts: Option<TcpListener>,
    ws: Option<TcpListener>,
    wss: Option<TcpListener>,
    https: Option<TcpListener>,
    /// The handshake MQTTS, wss and HTTPS share, when any is on.
    tls: Option<Arc<TlsUpgrade>>,
}

/// Where the listeners can be reached (None: off).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceAddrs {
    pub plain: SocketAddr,
    pub mqtts: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
}

impl DeviceListeners {
    /// Binds every listener the configuration asks for (the TLS certificate made or loaded first).
    pub(crate) async fn bind(config: &ServeConfig) -> anyhow::Result<DeviceListeners> {
        let tls_on = [config.mqtts_addr, config.wss_addr, config.https_addr];
        let tls = if tls_on.iter().any(Option::is_some) {
            let tls = TlsUpgrade::new(&config.tls, &config.data_dir)
                .context("setting up TLS for MQTTS, MQTT over secure WebSocket and HTTPS")?;
            Some(Arc::new(tls))
        } else {
            None
        };
        let plain = TcpListener::bind(config.mqtt_addr)
            .await
            .with_context(|| {
                format!(
                    "binding MQTT on {} (if another broker such as Mosquitto holds the port, choose one with --mqtt-addr)",
                    config.mqtt_addr
                )
            })?;
        Ok(DeviceListeners {
            plain,
            mqtts: bind_optional(config.mqtts_addr, "MQTTS", "--mqtts-addr").await?,
            ws: bind_optional(config.ws_addr, "MQTT over WebSocket", "--ws-addr").await?,
            wss: bind_optional(config.wss_addr, "MQTT over secure WebSocket", "--wss-addr").await?,
            https: bind_optional(config.https_addr, "HTTPS device access", "--https-addr").await?,
            tls,
        })
    }

    /// The CA devices verify MQTTS and wss with, when ioda made its own certificate.
    pub(crate) fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().and_then(|tls| tls.ca_file.clone())
    }

    pub(crate) fn addrs(&self) -> std::io::Result<DeviceAddrs> {
        let addr_of = |listener: &Option<TcpListener>| -> std::io::Result<Option<SocketAddr>> {
            listener
                .as_ref()
                .map(|l| l.local_addr().map(connectable))
                .transpose()
        };
        Ok(DeviceAddrs {
            plain: connectable(self.plain.local_addr()?),
            mqtts: addr_of(&self.mqtts)?,
            ws: addr_of(&self.ws)?,
            wss: addr_of(&self.wss)?,
            https: addr_of(&self.https)?,
        })
    }

    /// Serves every listener until `stop`; each task ends when its connections have closed.
    pub(crate) fn serve<B: Broker>(
        self,
        broker: Arc<B>,
        limits: Limits,
        https_router: Router,
        stop: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let plain = Arc::new(PlainTcp);
        let max_packet = limits.max_packet_size;
        let mut tasks = Vec::with_capacity(4);
        if let Some(ws) = self.ws {
            let upgrade = WebSocketUpgrade::new(plain.clone(), max_packet);
            tasks.push(spawn(ws, Arc::new(upgrade), &broker, limits, stop));
        }
        tasks.push(spawn(self.plain, plain, &broker, limits, stop));
        let Some(tls) = self.tls else {
            return tasks;
        };
        if let Some(wss) = self.wss {
            let upgrade = WebSocketUpgrade::new(tls.clone(), max_packet);
            tasks.push(spawn(wss, Arc::new(upgrade), &broker, limits, stop));
        }
        if let Some(https) = self.https {
            let serving = crate::https::serve(https, tls.clone(), https_router, stop.clone());
            tasks.push(tokio::spawn(serving));
        }
        if let Some(mqtts) = self.mqtts {
            tasks.push(spawn(mqtts, tls, &broker, limits, stop));
        }
        tasks
    }
}

fn spawn<U: Upgrade, B: Broker>(
    listener: TcpListener,
    upgrade: Arc<U>,
    broker: &Arc<B>,
    limits: Limits,
    stop: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(serve_upgraded(
        listener,
        upgrade,
        broker.clone(),
        limits,
        stop.clone(),
    ))
}

async fn bind_optional(
    addr: Option<SocketAddr>,
    what: &str,
    flag: &str,
) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("binding {what} on {addr} (choose another with {flag}, or off)")
    })?;
    Ok(Some(listener))
}
