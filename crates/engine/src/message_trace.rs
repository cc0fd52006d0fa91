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
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{EngineError, Platform, invalid, read_lock, write_lock};

/// How long a started trace runs unless told otherwise, in seconds.
pub const DEFAULT_TRACE_SECONDS: i64 = 3600;
/// The longest trace one start gives, in seconds (a week; start it again to go on).
pub const MAX_TRACE_SECONDS: i64 = 7 * 24 * 3600;

/// The devices whose successful traffic is traced, and until when.
#[derive(Debug, Default)]
pub(crate) struct TracedDevices {
    all: bool,
    /// Whether any device has a trace started: a report of an untraced device then costs one
    /// load, not a lock and a lookup.
    any: AtomicBool,
    until: RwLock<HashMap<String, i64>>,
}

impl TracedDevices {
    pub(crate) fn new(all: bool) -> TracedDevices {
        TracedDevices {
            all,
            ..TracedDevices::default()
        }
    }

    pub(crate) fn load(&self, started: Vec<(String, i64)>) {
        let mut until = write_lock(&self.until);
        until.extend(started);
        self.any.store(!until.is_empty(), Ordering::Release);
    }

    fn traced(&self, device_id: &str, now: i64) -> bool {
        self.all || self.until(device_id, now).is_some()
    }

    fn until(&self, device_id: &str, now: i64) -> Option<i64> {
        if !self.any.load(Ordering::Acquire) {
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
        self.any.store(!traces.is_empty(), Ordering::Release);
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
        self.traced.traced(device_id, self.now())
    }

    /// A device's message trace: started or not, and until when.
    pub async fn trace_state(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<TraceState, EngineError> {
        self.device(project_id, device_id).await?;
        Ok(TraceState {
            until: self.traced.until(device_id, self.now()),
            all_devices: self.traced.all,
        })
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
        let now = self.now();
        let until = now + seconds * 1000;
        // Stored first: a trace the API said had started must survive a restart.
        self.store
            .set_device_tracing(device_id.to_owned(), Some(until))
            .await?;
        self.traced.set(device_id, Some(until), now);
        self.trace_state(project_id, device_id).await
    }

    /// Stops a device's message trace (what it recorded stays).
    pub async fn stop_trace(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<TraceState, EngineError> {
        self.device(project_id, device_id).await?;
        self.store
            .set_device_tracing(device_id.to_owned(), None)
            .await?;
        self.traced.set(device_id, None, self.now());
        self.trace_state(project_id, device_id).await
    }

    /// Forgets a deleted device's trace (its row went with the device).
    pub(crate) fn forget_trace(&self, device_id: &str) {
        self.traced.set(device_id, None, self.now());
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
            assert_eq!(devices.traced("d", now), traced, "{all} {until:?} {now}");
            assert!(
                devices.traced("other", now) == all,
                "another device: {all} {until:?} {now}"
            );
        }
        let devices = TracedDevices::new(false);
        devices.set("d", Some(100), 0);
        devices.set("d", None, 0);
        assert!(!devices.traced("d", 50), "a stopped trace");
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
        assert!(
            !devices.any.load(std::sync::atomic::Ordering::Acquire),
            "no trace left: reports skip the lock"
        );
    }
}
