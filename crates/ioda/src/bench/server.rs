//! The server under test: a child `ioda serve` on ephemeral loopback ports, so its memory and CPU
//! can be read from /proc apart from the load generator's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::ApiClient;

/// A running server process.
pub struct ServerProcess {
    child: Child,
    pub api: ApiClient,
    pub mqtt_addr: String,
    /// None when the server was started with MQTTS off (`--server-args`).
    pub mqtts_addr: Option<String>,
    /// MQTT over WebSocket, plain and secure (None when switched off by `--server-args`).
    pub ws_addr: Option<String>,
    pub wss_addr: Option<String>,
    /// The CA the server made for MQTTS.
    pub tls_ca: std::path::PathBuf,
    _dir: tempfile_dir::TempDir,
}

/// A throwaway directory (the bench keeps nothing).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path =
                std::env::temp_dir().join(format!("ioda-bench-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&path)?;
            Ok(TempDir(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// CPU time (user + system) and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

pub fn usage(pid: u32) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start past the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the name), in clock ticks.
    Usage {
        cpu_seconds: (ticks(11) + ticks(12)) / 100.0,
        rss_bytes: rss_kb * 1024,
    }
}

impl ServerProcess {
    /// Starts `ioda serve` (this very binary) with the given extra flags and waits until it is ready.
    pub fn start(extra: &[&str], env: &[(String, String)]) -> anyhow::Result<ServerProcess> {
        let dir = tempfile_dir::TempDir::new()?;
        let exe: PathBuf = std::env::current_exe().context("locating the ioda binary")?;
        let child = Command::new(exe)
            .args(["serve", "--data-dir"])
            .arg(dir.path())
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--mqtt-addr",
                "127.0.0.1:0",
                "--mqtts-addr",
                "127.0.0.1:0",
                "--wss-addr",
                "127.0.0.1:0",
                "--ws-addr",
                "127.0.0.1:0",
                "--https-addr",
                "off",
                "--coap-addr",
                "127.0.0.1:0",
                "--coaps-addr",
                "127.0.0.1:0",
                "--rate-limit",
                "0",
            ])
            .args(extra)
            // The bench's quiet default first, so `--server-env IODA_LOG=...` can override it.
            .env("IODA_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the server")?;
        let api = wait_ready(dir.path())?;
        let listeners: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("listeners.json"))?)?;
        let mqtt_addr = listeners["mqtt"]
            .as_str()
            .context("no mqtt listener")?
            .to_owned();
        let listener = |name: &str| listeners[name].as_str().map(str::to_owned);
        let (mqtts_addr, ws_addr, wss_addr) = (listener("mqtts"), listener("ws"), listener("wss"));
        Ok(ServerProcess {
            child,
            api,
            mqtt_addr,
            mqtts_addr,
            ws_addr,
            wss_addr,
            tls_ca: dir.path().join("tls").join("ca.pem"),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn usage(&self) -> Usage {
        usage(self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready(dir: &Path) -> anyhow::Result<ApiClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = ApiClient::from_data_dir(dir) {
            return Ok(client);
        }
        if Instant::now() > deadline {
            bail!("the server did not become ready within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
