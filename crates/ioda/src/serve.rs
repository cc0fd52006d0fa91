//! `ioda serve`: opens the store, starts the listeners, writes the state files, shuts down cleanly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ioda_coap::CoapServer;
use ioda_engine::access::DeviceBroker;
use ioda_engine::https::HttpsAccess;
use ioda_engine::lwm2m::Lwm2mAccess;
use ioda_engine::{AdminCredentials, Clock, Platform, SystemClock};
use ioda_mqtt::server::Limits;
use ioda_rules::Forwarder;
use ioda_store::Store;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServeConfig;
use crate::listeners::DeviceListeners;

/// File names inside the data directory.
pub const LISTENERS_FILE: &str = "listeners.json";
pub const CREDENTIALS_FILE: &str = "admin-credentials.json";
const DATABASE_FILE: &str = "ioda.db";

/// A running server.
pub struct Running {
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// None when MQTTS is off.
    pub mqtts_addr: Option<SocketAddr>,
    /// MQTT over WebSocket (`ws://{addr}/mqtt`); None when off (the default).
    pub ws_addr: Option<SocketAddr>,
    /// MQTT over secure WebSocket (`wss://{addr}/mqtt`); None when off.
    pub wss_addr: Option<SocketAddr>,
    /// HTTPS device access (`https://{addr}/v5/device-auth`); None when off.
    pub https_addr: Option<SocketAddr>,
    /// The CA devices verify MQTTS and wss with, when ioda made its own certificate.
    pub tls_ca_file: Option<PathBuf>,
    pub coap_addr: SocketAddr,
    pub coaps_addr: SocketAddr,
    pub platform: Arc<Platform>,
    pub lwm2m: Arc<Lwm2mAccess>,
    pub forwarder: Arc<Forwarder>,
    /// Set on the very first start only: the credentials that were just created.
    pub admin: Option<AdminCredentials>,
    shutdown: watch::Sender<bool>,
    /// Plain MQTT, MQTTS, ws, wss and HTTPS: those that are on.
    mqtt: Vec<JoinHandle<()>>,
    coap: JoinHandle<()>,
    coaps: JoinHandle<()>,
    scheduler: JoinHandle<()>,
    http: JoinHandle<std::io::Result<()>>,
    config: ServeConfig,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("http_addr", &self.http_addr)
            .field("mqtt_addr", &self.mqtt_addr)
            .field("coap_addr", &self.coap_addr)
            .finish()
    }
}

/// A connectable form of a bound address: the unspecified address becomes loopback.
pub(crate) fn connectable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // The mode applies only to a file this creates: one left behind keeps whatever mode it had.
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// Writes a file atomically (temporary file, then rename), so readers never see half of it.
pub(crate) fn write_atomically(path: &Path, contents: &str, private: bool) -> std::io::Result<()> {
    // `<name>.tmp`, not `<stem>.tmp`: `server.key` and `server.pem` must not share one.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if private {
        write_private(&tmp, contents)?
    } else {
        std::fs::write(&tmp, contents)?
    }
    std::fs::rename(tmp, path)
}

/// Starts a server; it is ready (listeners bound, state files written) when this returns.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// Starts a server on a given clock (tests move a manual clock to drive timers without waiting).
pub async fn start_with_clock(
    config: ServeConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let _ = std::fs::remove_file(config.data_dir.join(LISTENERS_FILE));
    let store = Store::open(&config.data_dir.join(DATABASE_FILE), config.durability)
        .context("opening the store")?;
    let platform = Platform::open(Arc::new(store), clock, config.engine.clone()).await?;
    let admin = platform.ensure_admin().await?;
    if let Some(admin) = &admin {
        let body = json!({ "project_id": admin.project_id, "access_key": admin.access_key, "secret_key": admin.secret_key });
        write_atomically(
            &config.data_dir.join(CREDENTIALS_FILE),
            &serde_json::to_string_pretty(&body)?,
            true,
        )?;
    }
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", config.http_addr))?;
    let device_listeners = DeviceListeners::bind(&config).await?;
    let tls_ca_file = device_listeners.ca_file();
    let lwm2m = Lwm2mAccess::new(platform.clone());
    let coap_server = CoapServer::bind(config.coap_addr, ioda_coap::Timing::default())
        .await
        .with_context(|| format!("binding CoAP (UDP) on {}", config.coap_addr))?;
    let keys = lwm2m.clone();
    let coaps_server = CoapServer::bind_dtls(
        config.coaps_addr,
        ioda_coap::Timing::default(),
        Arc::new(move |identity: &str| keys.psk(identity)),
        &config.coaps_ciphers,
    )
    .await
    .with_context(|| format!("binding CoAPS (DTLS, UDP) on {}", config.coaps_addr))?;
    let http_addr = connectable(http_listener.local_addr()?);
    let device_addrs = device_listeners.addrs()?;
    let coap_addr = connectable(coap_server.local_addr()?);
    let coaps_addr = connectable(coaps_server.local_addr()?);
    let (shutdown, stop) = watch::channel(false);

    // Forwarding first: it must see every event from the first connection and the first tick on.
    let forwarder = Forwarder::start(platform.clone(), config.forward.clone(), stop.clone())
        .await
        .context("starting data forwarding")?;
    let scheduler = platform.spawn_scheduler(stop.clone());
    let limits = Limits {
        max_packet_size: config.engine.max_payload + 64 * 1024,
        write_timeout: config.mqtt_write_timeout,
        ..Limits::default()
    };
    let broker = Arc::new(DeviceBroker::new(platform.clone()));
    let https_router = ioda_api::device_https::device_router(
        HttpsAccess::new(platform.clone()),
        config.engine.max_payload,
    );
    let mqtt = device_listeners.serve(broker, limits, https_router, &stop);

    lwm2m.serve_on(coap_server.handle(), false);
    lwm2m.serve_on(coaps_server.handle(), true);
    let coap = tokio::spawn(run_coap(coap_server, lwm2m.clone(), stop.clone()));
    let coaps = tokio::spawn(coaps_server.run(lwm2m.clone(), stop.clone()));

    let router = ioda_api::router(
        platform.clone(),
        forwarder.clone(),
        config.signature_window_ms,
    );
    let mut http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(http_listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let mut listeners = json!({ "http": http_addr.to_string(), "mqtt": device_addrs.plain.to_string(), "coap": coap_addr.to_string(), "coaps": coaps_addr.to_string() });
    for (name, addr) in [
        ("mqtts", device_addrs.mqtts),
        ("ws", device_addrs.ws),
        ("wss", device_addrs.wss),
        ("https", device_addrs.https),
    ] {
        if let Some(addr) = addr {
            listeners[name] = json!(addr.to_string());
        }
    }
    write_atomically(
        &config.data_dir.join(LISTENERS_FILE),
        &listeners.to_string(),
        false,
    )?;
    if let Some(ca) = &tls_ca_file {
        tracing::info!(ca = %ca.display(), "MQTTS and wss devices verify the server with this CA");
    }
    tracing::info!(http = %http_addr, mqtt = %device_addrs.plain, mqtts = ?device_addrs.mqtts, ws = ?device_addrs.ws, wss = ?device_addrs.wss, https = ?device_addrs.https, coap = %coap_addr, coaps = %coaps_addr, data_dir = %config.data_dir.display(), "ioda is ready");
    Ok(Running {
        http_addr,
        mqtt_addr: device_addrs.plain,
        mqtts_addr: device_addrs.mqtts,
        ws_addr: device_addrs.ws,
        wss_addr: device_addrs.wss,
        https_addr: device_addrs.https,
        tls_ca_file,
        coap_addr,
        coaps_addr,
        platform,
        lwm2m,
        forwarder,
        admin,
        shutdown,
        mqtt,
        coap,
        coaps,
        scheduler,
        http,
        config,
    })
}

/// Serves CoAP/LwM2M and ends lapsed registrations once a second.
async fn run_coap(server: CoapServer, lwm2m: Arc<Lwm2mAccess>, stop: watch::Receiver<bool>) {
    let sweeper = lwm2m.clone();
    let mut sweep_stop = stop.clone();
    let sweeping = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = every.tick() => sweeper.sweep(),
                _ = async { let _ = sweep_stop.wait_for(|s| *s).await; } => return,
            }
        }
    });
    server.run(lwm2m, stop).await;
    let _ = sweeping.await;
}

impl Running {
    /// Graceful shutdown: stop accepting, disconnect clients (MQTT 5 clients are told why), let
    /// in-flight work finish, flush the store. Gives up waiting after the configured deadline but
    /// always flushes the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(self.config.shutdown_timeout, async {
            for listener in self.mqtt {
                let _ = listener.await;
            }
            let _ = self.coap.await;
            let _ = self.coaps.await;
            let _ = self.http.await;
            let _ = self.scheduler.await;
            // After the listeners: what their last reports queued waits in the store.
            self.forwarder.stopped().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown deadline reached with connections still open");
        }
        self.platform.close().await;
        let _ = std::fs::remove_file(self.config.data_dir.join(LISTENERS_FILE));
        tracing::info!("ioda stopped");
        Ok(())
    }
}
