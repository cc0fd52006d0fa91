//! The ioda platform: everything between the protocol layers and the store.
//!
//! `Platform` owns the caches (products, access keys, projects), the registry of connected devices
//! and the event bus. The API calls its product and device operations; the MQTT layer reaches it
//! through the broker in `access`. It knows neither HTTP nor JSON DTOs.

pub mod access;
pub mod auth;
mod bus;
mod clock;
mod codecs;
mod commands;
mod devices;
mod downlink;
mod events;
mod gateway;
mod gateway_sync;
pub mod https;
pub mod lwm2m;
mod message_trace;
mod messages;
mod products;
mod ratelimit;
mod registry;
mod report_parse;
mod shadow;
mod timers;
pub mod topic;
mod uplink;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ioda_store::{AccessKey, Project, Store, StoreError, TraceEntry};
use ioda_types::{Product, TypesError};

pub use bus::{Bus, BusReceiver, is_device_data};
pub use clock::{Clock, ManualClock, SystemClock};
pub use commands::{
    AsyncCommandRequest, CommandRequest, MAX_EXPIRE_SECS, SYNC_TIMEOUT, SYNC_TIMEOUT_RANGE,
};
pub use devices::{NewDevice, NewDeviceAuth, SecretReset};
pub use message_trace::{DEFAULT_TRACE_SECONDS, MAX_TRACE_SECONDS, TraceState};
pub use messages::{MAX_MESSAGE_BYTES, MESSAGE_CACHE, MessageRequest};
pub use products::{NewProduct, ProductPatch};
pub use registry::Registry;
pub use shadow::{DesiredRequest, shadow_json};

/// Errors the platform reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0} does not exist")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The device has no live connection.
    #[error("the device is not online")]
    DeviceOffline,
    /// The device did not answer in time.
    #[error("the device did not answer in time")]
    DeviceTimeout,
    /// A custom topic the device has not subscribed to.
    #[error("the device has not subscribed to the topic")]
    NotSubscribed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<TypesError> for EngineError {
    fn from(e: TypesError) -> Self {
        EngineError::Invalid(e.to_string())
    }
}

/// Tunables of the platform.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Largest accepted uplink payload, in bytes.
    pub max_payload: usize,
    /// Uplink messages per second per device connection.
    pub rate_limit: u32,
    /// Accepted MQTT keepalive range, in seconds.
    pub keepalive_min: u16,
    pub keepalive_max: u16,
    /// How far a sign-type-1 timestamp may be from the platform clock, in milliseconds.
    pub timestamp_tolerance_ms: i64,
    /// How long stored reports and messages are kept, in milliseconds; 0 keeps them forever.
    pub history_retention_ms: i64,
    /// Silence after which a short-connection (NB-IoT) device is ABNORMAL, and then OFFLINE.
    pub abnormal_after_ms: i64,
    pub offline_after_ms: i64,
    /// Trace the stages of every device's successful traffic, not only of devices whose message
    /// trace has been started (`message_trace`).
    pub trace_all: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_payload: 1024 * 1024,
            rate_limit: 50,
            keepalive_min: 30,
            keepalive_max: 1200,
            timestamp_tolerance_ms: 3_600_000,
            history_retention_ms: 30 * 24 * 3_600_000,
            abnormal_after_ms: 25 * 3_600_000,
            offline_after_ms: 49 * 3_600_000,
            trace_all: false,
        }
    }
}

/// Data forwarding's part in the uplink path: the forwarding a report or message causes is decided
/// here, before the commit, and written in the same transaction as the data itself, so a crash can
/// never keep one without the other. Implemented by `ioda-rules`.
pub trait ForwardStage: Send + Sync + 'static {
    /// The forwarding an uplink event produces; when `trace` wants the routing, also which rules
    /// took it (for the trace entry that records it as stored).
    fn stage(
        &self,
        event: &ioda_types::PlatformEvent,
        now: i64,
        trace: StageTrace,
    ) -> StagedForwarding;
    /// Wakes the workers of these actions once their items are committed.
    fn wake(&self, action_ids: &[String]);
}

/// How much of an uplink's forwarding the device trace takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageTrace {
    /// Nothing: no entry records the data as stored.
    Untraced,
    /// The routing, in the entry that records the data as stored (a report that lost
    /// properties); its deliveries are traced only if they fail or the trace starts meanwhile.
    Routing,
    /// The device's message trace runs: the routing, and each delivery, even one made after
    /// the trace has stopped.
    Traced,
}

impl StageTrace {
    /// For an uplink of a device whose message trace runs (`traced`) or not, whose stored entry
    /// is written (`entry`: always when traced) or not.
    pub fn of(traced: bool, entry: bool) -> StageTrace {
        match (traced, entry) {
            (true, _) => StageTrace::Traced,
            (false, true) => StageTrace::Routing,
            (false, false) => StageTrace::Untraced,
        }
    }

    /// Whether the routing detail is wanted.
    pub fn routing(self) -> bool {
        self != StageTrace::Untraced
    }
}

/// What data forwarding decided for one uplink event.
#[derive(Default)]
pub struct StagedForwarding {
    /// Messages for actions that keep a queue table: written in the data's own transaction.
    pub rows: Vec<ioda_store::NewForward>,
    /// Hands a property report to the actions that read the report log, once it has committed.
    pub after_commit: Option<ioda_store::AfterCommit>,
    /// Which rules took the data and which actions it was queued for (a detail the uplink puts
    /// in the trace entry that records the data as stored); `None` when no rule has its subject.
    pub routing: Option<ioda_store::TraceDetail>,
}

/// The administrator credentials created on first start.
#[derive(Debug, Clone)]
pub struct AdminCredentials {
    pub project_id: String,
    pub access_key: String,
    pub secret_key: String,
}

/// The platform.
pub struct Platform {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    bus: Bus,
    registry: Registry,
    waiters: downlink::Waiters,
    tick_lock: tokio::sync::Mutex<()>,
    forward_stage: RwLock<Option<Arc<dyn ForwardStage>>>,
    products: RwLock<HashMap<String, Arc<Product>>>,
    /// Compiled codecs by product id (filled on first use, dropped when the product changes).
    codecs: RwLock<HashMap<String, (serde_json::Value, Arc<ioda_codec::Codec>)>>,
    keys: RwLock<HashMap<String, AccessKey>>,
    projects: RwLock<HashMap<String, Project>>,
    traced: message_trace::TracedDevices,
    /// The last version handed to a gateway with its child list (`gateway`).
    children_version: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Shorthand for a validation error.
pub(crate) fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::Invalid(msg.into())
}

/// Random bytes from the OS.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS generator does not fail on supported platforms; a zeroed fallback would be unsafe for
    // secrets, so fail loudly instead.
    if getrandom::fill(&mut bytes).is_err() {
        panic!("the operating system's random generator is unavailable");
    }
    bytes
}

/// Locks a mutex whose holder may have panicked: the state it guards stays usable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The random part of an object id (a report's request id, a forwarded message's id): unique
/// within the process and unpredictable across restarts, without a system call per id (one per
/// id was 2 % of the server's CPU under load). A counter goes through splitmix64, a bijection,
/// from a start drawn from the OS once, so no two ids of a process share these bytes.
pub fn id_bytes() -> [u8; 8] {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| u64::from_le_bytes(random_bytes()));
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    splitmix64(start.wrapping_add(n)).to_be_bytes()
}

/// splitmix64: a bijection on `u64` that scatters neighbouring inputs.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl Platform {
    /// Loads the caches from the store and repairs the state an unclean stop left behind.
    pub async fn open(
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Result<Arc<Platform>, EngineError> {
        let platform = Platform {
            traced: message_trace::TracedDevices::new(config.trace_all),
            children_version: std::sync::atomic::AtomicI64::new(0),
            store,
            clock,
            config,
            bus: Bus::new(4096),
            registry: Registry::default(),
            waiters: downlink::Waiters::default(),
            tick_lock: tokio::sync::Mutex::new(()),
            forward_stage: RwLock::new(None),
            products: RwLock::new(HashMap::new()),
            codecs: RwLock::new(HashMap::new()),
            keys: RwLock::new(HashMap::new()),
            projects: RwLock::new(HashMap::new()),
        };
        platform.reload().await?;
        let now = platform.now();
        platform
            .traced
            .load(platform.store.traced_devices(now).await?);
        let stale = platform.store.reset_online(now).await?;
        if !stale.is_empty() {
            tracing::info!(
                count = stale.len(),
                "devices left ONLINE by an unclean stop are now OFFLINE"
            );
        }
        Ok(Arc::new(platform))
    }

    async fn reload(&self) -> Result<(), EngineError> {
        let projects = self.store.projects().await?;
        let keys = self.store.access_keys().await?;
        let mut products = HashMap::new();
        for project in &projects {
            let page = self
                .store
                .list_products(
                    project.project_id.clone(),
                    None,
                    None,
                    i64::MAX,
                    0,
                    i64::MAX,
                )
                .await?;
            products.extend(
                page.items
                    .into_iter()
                    .map(|p| (p.product_id.clone(), Arc::new(p))),
            );
        }
        *write_lock(&self.projects) = projects
            .into_iter()
            .map(|p| (p.project_id.clone(), p))
            .collect();
        *write_lock(&self.keys) = keys
            .into_iter()
            .map(|k| (k.access_key.clone(), k))
            .collect();
        *write_lock(&self.products) = products;
        Ok(())
    }

    /// Creates the default project and an administrator key when there is no project yet.
    /// Returns the new credentials (to show once), or `None` when a project already existed.
    pub async fn ensure_admin(&self) -> Result<Option<AdminCredentials>, EngineError> {
        if !read_lock(&self.projects).is_empty() {
            return Ok(None);
        }
        let now = self.now();
        let project_id = hex::encode(random_bytes::<16>());
        let project = Project {
            project_id: project_id.clone(),
            name: "default".into(),
            default_app_id: hex::encode(random_bytes::<16>()),
            default_app_name: "DefaultApp".into(),
            created_at: now,
        };
        let key = AccessKey {
            access_key: hex::encode(random_bytes::<10>()).to_uppercase(),
            secret_key: hex::encode(random_bytes::<20>()),
            project_id: project_id.clone(),
        };
        self.store.create_project(project, key.clone()).await?;
        self.reload().await?;
        Ok(Some(AdminCredentials {
            project_id,
            access_key: key.access_key,
            secret_key: key.secret_key,
        }))
    }

    /// The secret key and project of an access key.
    pub fn access_key(&self, access_key: &str) -> Option<AccessKey> {
        read_lock(&self.keys).get(access_key).cloned()
    }

    /// A project, if it exists.
    pub fn project(&self, project_id: &str) -> Option<Project> {
        read_lock(&self.projects).get(project_id).cloned()
    }

    /// Registers data forwarding's uplink stage.
    pub fn set_forward_stage(&self, stage: Arc<dyn ForwardStage>) {
        *write_lock(&self.forward_stage) = Some(stage);
    }

    /// The forwarding an uplink event causes (nothing when forwarding is not running).
    pub(crate) fn stage_forwarding(
        &self,
        event: &ioda_types::PlatformEvent,
        now: i64,
        trace: StageTrace,
    ) -> StagedForwarding {
        let stage = read_lock(&self.forward_stage).clone();
        stage
            .map(|s| s.stage(event, now, trace))
            .unwrap_or_default()
    }

    /// Wakes forwarding workers after their staged items are committed.
    pub(crate) fn wake_forwarding(&self, action_ids: &[String]) {
        if let Some(stage) = read_lock(&self.forward_stage).clone() {
            stage.wake(action_ids);
        }
    }

    /// The platform clock, Unix milliseconds.
    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The event bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The store (read access for the API's views).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The cached product, if it exists in any project.
    pub(crate) fn cached_product(&self, product_id: &str) -> Option<Arc<Product>> {
        read_lock(&self.products).get(product_id).cloned()
    }

    /// The newest trace entries of a device, and whether its message trace runs.
    pub async fn device_trace(
        &self,
        project_id: &str,
        device_id: &str,
        limit: i64,
    ) -> Result<(Vec<TraceEntry>, TraceState), EngineError> {
        self.device(project_id, device_id).await?;
        let entries = self.store.trace(device_id.to_owned(), limit).await?;
        Ok((entries, self.trace_state(device_id)))
    }

    /// Tells every connected device the server is going away and waits for the store to flush.
    pub async fn close(&self) {
        self.store.close().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn id_bytes_never_repeat_within_a_process() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            assert!(seen.insert(super::id_bytes()), "an id repeated");
        }
    }

    #[test]
    fn what_the_trace_takes_of_an_uplinks_forwarding() {
        use super::StageTrace::{self, Routing, Traced, Untraced};
        // (device traced, stored entry written) -> stage, routing wanted
        let table = [
            ((true, true), Traced, true),
            ((true, false), Traced, true),
            ((false, true), Routing, true),
            ((false, false), Untraced, false),
        ];
        for ((traced, entry), stage, routing) in table {
            assert_eq!(StageTrace::of(traced, entry), stage, "{traced} {entry}");
            assert_eq!(stage.routing(), routing, "{stage:?}");
        }
    }
}
