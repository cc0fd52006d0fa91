//! Message tracing, as IoTDA's console has it ("Start Trace" on a device): what goes wrong with a
//! device's traffic is always in its trace (refused properties and topics, malformed payloads,
//! failed forwarding, ...); the stages of traffic that goes right (a report or message stored
//! and where it was routed, a first forwarding attempt that succeeded) are traced while the
//! device's trace is started, or for every device with `EngineConfig::trace_all`.
//!
//! Why not always: those stages are two entries per report, made, kept and written for every
//! report of every device; they were about 6 % of the server's CPU and a third of the p99
//! latency at half the maximum rate (BENCHMARKS.md), to say what the history and the actions'
//! counters say already. Tracing is for the device being looked at.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, Ordering};

use ioda_store::StoreError;

use crate::{EngineError, Platform, invalid, read_lock, write_lock};

/// How long a started trace runs unless told otherwise, in seconds.
pub const DEFAULT_TRACE_SECONDS: i64 = 3600;
/// The longest trace one start gives, in seconds (a week; start it again to go on).
pub const MAX_TRACE_SECONDS: i64 = 7 * 24 * 3600;

/// The devices whose successful traffic is traced, and until when.
#[derive(Debug)]
pub(crate) struct TracedDevices {
    all: bool,
    /// When the last running trace ends (`i64::MIN`: none was started): a report after it, the
    /// common case, costs one load, not a lock and a lookup, also once traces have run out.
    last_until: AtomicI64,
    until: RwLock<HashMap<String, i64>>,
    /// Held across a change's store write and its memory update, so that the two agree whatever
    /// starts, stops and deletions run at once.
    changing: tokio::sync::Mutex<()>,
}

impl TracedDevices {
    pub(crate) fn new(all: bool) -> TracedDevices {
        TracedDevices {
            all,
            last_until: AtomicI64::new(i64::MIN),
            until: RwLock::default(),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn load(&self, started: Vec<(String, i64)>) {
        let mut until = write_lock(&self.until);
        until.extend(started);
        self.note_last(&until);
    }

    fn note_last(&self, traces: &HashMap<String, i64>) {
        let last = traces.values().copied().max().unwrap_or(i64::MIN);
        self.last_until.store(last, Ordering::Relaxed);
    }

    /// Whether the device is traced at the time `now` gives (asked only when a trace may run).
    fn traced(&self, device_id: &str, now: impl FnOnce() -> i64) -> bool {
        self.all || self.until(device_id, now).is_some()
    }

    fn until(&self, device_id: &str, now: impl FnOnce() -> i64) -> Option<i64> {
        let last = self.last_until.load(Ordering::Relaxed);
        if last == i64::MIN {
            return None;
        }
        let now = now();
        if now >= last {
            return None;
        }
        read_lock(&self.until)
            .get(device_id)
            .copied()
            .filter(|until| *until > now)
    }

    /// Sets (or with `None` ends) a device's trace, forgetting the traces that have ended.
    fn set(&self, device_id: &str, until: Option<i64>, now: i64) {
        let mut traces = write_lock(&self.until);
        traces.retain(|_, until| *until > now);
        match until {
            Some(until) => traces.insert(device_id.to_owned(), until),
            None => traces.remove(device_id),
        };
        self.note_last(&traces);
    }
}

/// A device's message trace as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceState {
    /// When the device's started trace ends, if one runs.
    pub until: Option<i64>,
    /// Whether every device's successful traffic is traced (`trace_all`).
    pub all_devices: bool,
}

impl Platform {
    /// Whether the stages of a device's successful traffic are traced now.
    pub fn traces_success(&self, device_id: &str) -> bool {
        self.traced.traced(device_id, || self.now())
    }

    /// A device's message trace now: started or not, and until when.
    pub(crate) fn trace_state(&self, device_id: &str) -> TraceState {
        TraceState {
            until: self.traced.until(device_id, || self.now()),
            all_devices: self.traced.all,
        }
    }

    /// Starts a device's message trace for `seconds` (or sets how long a running one has left).
    pub async fn start_trace(
        &self,
        project_id: &str,
        device_id: &str,
        seconds: i64,
    ) -> Result<TraceState, EngineError> {
        if !(1..=MAX_TRACE_SECONDS).contains(&seconds) {
            return Err(invalid(format!(
                "duration must be between 1 and {MAX_TRACE_SECONDS} seconds"
            )));
        }
        self.device(project_id, device_id).await?;
        self.set_trace(device_id, Some(seconds)).await?;
        Ok(self.trace_state(device_id))
    }

    /// Stops a device's message trace (what it recorded stays).
    pub async fn stop_trace(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<TraceState, EngineError> {
        self.device(project_id, device_id).await?;
        self.set_trace(device_id, None).await?;
        Ok(self.trace_state(device_id))
    }

    /// Starts a device's trace for `seconds` from now, or stops it: stored first (a trace the
    /// API said had started must survive a restart; the store refuses a device deleted since it
    /// was looked up), then in memory, under the lock that keeps the two in agreement.
    async fn set_trace(&self, device_id: &str, seconds: Option<i64>) -> Result<(), EngineError> {
        let _changing = self.traced.changing.lock().await;
        let now = self.now();
        let until = seconds.map(|s| now + s * 1000);
        self.store
            .set_device_tracing(device_id.to_owned(), until)
            .await
            .map_err(|e| match e {
                StoreError::NotFound => EngineError::NotFound("device"),
                other => other.into(),
            })?;
        self.traced.set(device_id, until, now);
        Ok(())
    }

    /// Runs a device's deletion and forgets its trace, both under the lock of trace changes (its
    /// row goes with the device; a start racing the deletion has either finished, and is undone
    /// here, or finds no device to store it for; one for a device registered again under the id
    /// waits for both).
    pub(crate) async fn forgetting_trace<T>(
        &self,
        device_id: &str,
        deletion: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let _changing = self.traced.changing.lock().await;
        let deleted = deletion.await?;
        self.traced.set(device_id, None, self.now());
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::TracedDevices;

    #[test]
    fn a_device_is_traced_until_its_trace_ends_or_stops() {
        // (trace_all, started until, asked at, traced)
        let cases = [
            (false, None, 0, false),
            (false, Some(100), 99, true),
            (false, Some(100), 100, false),
            (false, Some(100), 101, false),
            (true, None, 0, true),
            (true, Some(100), 200, true),
        ];
        for (all, until, now, traced) in cases {
            let devices = TracedDevices::new(all);
            if let Some(until) = until {
                devices.set("d", Some(until), 0);
            }
            assert_eq!(devices.traced("d", || now), traced, "{all} {until:?} {now}");
            assert!(
                devices.traced("other", || now) == all,
                "another device: {all} {until:?} {now}"
            );
        }
        let devices = TracedDevices::new(false);
        devices.set("d", Some(100), 0);
        devices.set("d", None, 0);
        assert!(!devices.traced("d", || 50), "a stopped trace");
        devices.set("d", Some(100), 0);
        assert!(
            !devices.traced("d", || 100),
            "a trace that ran out is not looked up"
        );
        let untouched = TracedDevices::new(false);
        assert!(
            !untouched.traced("d", || panic!(
                "no trace ever started: the clock is not read"
            )),
            "never started"
        );
    }

    #[test]
    fn ended_traces_are_forgotten_when_another_changes() {
        let devices = TracedDevices::new(false);
        devices.load(vec![("old".into(), 10), ("new".into(), 1000)]);
        devices.set("third", Some(2000), 500);
        let left: Vec<String> = {
            let mut ids: Vec<String> = super::read_lock(&devices.until).keys().cloned().collect();
            ids.sort();
            ids
        };
        assert_eq!(left, ["new", "third"]);
        devices.set("new", None, 500);
        devices.set("third", None, 500);
        assert_eq!(
            devices
                .last_until
                .load(std::sync::atomic::Ordering::Relaxed),
            i64::MIN,
            "no trace left: reports skip the clock and the lock"
        );
    }
}
