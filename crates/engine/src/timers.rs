//! The scheduler: everything that happens because time passed. It reads what is due from the store
//! (so a restart resumes exactly where it was) and runs once a second, or when a test calls `tick`.

use std::sync::Arc;
use std::time::Duration;

use ioda_types::{MessageStatus, PlatformEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{EngineError, Platform};

/// Most items handled per kind in one pass; the rest wait for the next second.
const BATCH: i64 = 1000;

impl Platform {
    /// One scheduler pass at the platform clock's current time. Returns how many items it handled.
    pub async fn tick(self: &Arc<Self>) -> Result<usize, EngineError> {
        let _pass = self.tick_lock.lock().await;
        let now = self.now();
        let commands = self.store.due_commands(now, BATCH).await?;
        let mut handled = commands.len();
        for command in commands {
            self.command_due(command).await;
        }
        let stale = self.store.stale_messages(now, BATCH).await?;
        handled += stale.len();
        for message in stale {
            self.finish_message(message, MessageStatus::Timeout, None)
                .await;
        }
        if self.config.history_retention_ms > 0 {
            let cutoff = now - self.config.history_retention_ms;
            handled += self.store.trim_history(cutoff, BATCH).await?;
            // Children deleted as long ago as the oldest history are forgotten with it.
            handled += self.store.trim_child_deletions(cutoff).await?;
        }
        handled += self.silence_statuses(now).await?;
        let lapsed = self.store.lapsed_registrations(now, BATCH).await?;
        handled += lapsed.len();
        for device in lapsed {
            // Registered with an activation timeout and never connected: IoTDA deletes such devices.
            let deleted = self.store.delete_device(device.device_id.clone());
            if self
                .forgetting_trace(&device.device_id, deleted)
                .await
                .is_ok()
            {
                tracing::info!(device_id = %device.device_id, "registration lapsed: the device never connected");
                self.child_deleted(&device, true).await;
                self.bus.publish(PlatformEvent::DeviceDeleted {
                    device: device.reference(),
                    at: now,
                });
            }
        }
        Ok(handled)
    }

    /// NB-IoT devices' status follows their data: ABNORMAL after `abnormal_after_ms` without any,
    /// OFFLINE after `offline_after_ms`.
    async fn silence_statuses(&self, now: i64) -> Result<usize, EngineError> {
        use ioda_types::{DeviceStatus, StatusCause};
        const QUIET: &[DeviceStatus] = &[DeviceStatus::Online];
        const SILENT: &[DeviceStatus] = &[DeviceStatus::Online, DeviceStatus::Abnormal];
        let mut handled = 0;
        for (after, from, to) in [
            (self.config.offline_after_ms, SILENT, DeviceStatus::Offline),
            (self.config.abnormal_after_ms, QUIET, DeviceStatus::Abnormal),
        ] {
            let before = now - after;
            let devices = self.store.silent_devices(before, from, BATCH).await?;
            handled += devices.len();
            for device in devices {
                let set = self
                    .store
                    .set_silent_status(device.device_id.clone(), to, before, now)
                    .await?;
                if !set {
                    continue; // Data arrived meanwhile.
                }
                self.bus.publish(PlatformEvent::DeviceStatusChanged {
                    device: device.reference(),
                    status: to,
                    cause: StatusCause::NoData,
                    at: now,
                });
            }
        }
        Ok(handled)
    }

    /// Runs `tick` every second until `shutdown` turns true.
    pub fn spawn_scheduler(
        self: &Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let platform = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if let Err(error) = platform.tick().await {
                            tracing::warn!(%error, "scheduler pass failed");
                        }
                    }
                    _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                }
            }
        })
    }
}
